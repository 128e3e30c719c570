"""A hostile or unlucky day, on both stores: JSON nested deeper than can be written back, NUL
characters a store cannot hold, and uploads over the limit whatever their framing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import (
    ADMIN_TOKEN,
    FakeVlmRun,
    Process,
    api_env,
    base_env,
    signed,
    submit,
)

pytestmark = pytest.mark.acceptance


@pytest.fixture(params=["sqlite", "postgresql"])
def service(
    request: pytest.FixtureRequest,
    start_service: Callable[..., Process],
    fake_vlmrun: FakeVlmRun,
) -> Process:
    """`receiver serve` on SQLite or on a fresh PostgreSQL database, against the fake API."""
    env = api_env(fake_vlmrun.url)
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_database")
        migrated = subprocess.run(
            [sys.executable, "-m", "receiver", "migrate"],
            env=base_env(RECEIVER_DATABASE_URL=url),
            capture_output=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stderr
        env["RECEIVER_DATABASE_URL"] = url
    return start_service("serve", env=env)


def events(admin: httpx.Client, service: Process, job_id: str) -> list[dict[str, Any]]:
    r = admin.get(f"{service.url}/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["events"]
    return found


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"next": value}
    return value


def test_a_callback_nested_300_deep_is_recorded_and_read_back(
    service: Process, fake_vlmrun: FakeVlmRun, admin: httpx.Client
) -> None:
    """Legal JSON nested 300 levels (orjson writes only 254) is recorded, and the job and the
    event still read back, exactly, instead of a 500 on every read."""
    (job,) = submit(service)
    pred = str(job["prediction_id"])
    prediction = {"id": pred, "status": "completed", "response": nested(300)}
    body = json.dumps(prediction).encode()  # json, not orjson: orjson cannot write it
    answer = httpx.post(fake_vlmrun.callback_urls[pred], content=body, headers=signed(body))
    assert answer.status_code == 200 and answer.json()["status"] == "recorded"
    (event,) = events(admin, service, job["id"])
    assert event["prediction"] == prediction
    one = admin.get(f"{service.url}/v1/events/{event['id']}")
    assert one.status_code == 200 and one.json()["prediction"] == prediction


def test_a_submission_nested_300_deep_is_refused_by_name(
    service: Process, admin: httpx.Client
) -> None:
    """A `config` nested deeper than the service keeps is a 422 naming the limit, not a 500."""
    r = admin.post(
        f"{service.url}/v1/jobs",
        content=json.dumps({"url": "https://e.test/a.pdf", "domain": "a.b", "config": nested(300)}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "nested deeper than 64 levels" in r.json()["error"]


@pytest.mark.parametrize("field", ["id", "status", "domain"])
def test_nul_in_a_prediction_field_is_422_on_both_stores(
    service: Process, fake_vlmrun: FakeVlmRun, admin: httpx.Client, field: str
) -> None:
    """A NUL character in `id`, `status` or `domain` is refused with 422 and the reason (not a
    503 that makes VLM Run retry for nothing); the real callback still records afterwards."""
    (job,) = submit(service)
    pred = str(job["prediction_id"])
    good = {"id": pred, "status": "completed", "domain": "document.invoice"}
    bad = orjson.dumps(good | {field: good[field] + "\x00x"})
    url = fake_vlmrun.callback_urls[pred]
    refused = httpx.post(url, content=bad, headers=signed(bad))
    assert refused.status_code == 422 and "NUL" in refused.json()["error"]
    assert events(admin, service, job["id"]) == []
    body = orjson.dumps(good)
    assert httpx.post(url, content=body, headers=signed(body)).json()["status"] == "recorded"


def test_a_chunked_upload_over_the_limit_is_413(
    start_service: Callable[..., Process], fake_vlmrun: FakeVlmRun
) -> None:
    """With a 1 MiB upload limit, a 5 MiB multipart upload sent chunked (no Content-Length)
    is refused with 413 while it is read, as one with a Content-Length is."""
    limit = 1024 * 1024
    service = start_service(
        "serve",
        env=api_env(fake_vlmrun.url, RECEIVER_MAX_UPLOAD_BYTES=str(limit)),
    )
    boundary = "hardening-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="domain"\r\n\r\na.b\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.pdf"\r\n'
        "Content-Type: application/pdf\r\n\r\n"
    ).encode()
    chunks = [head, *([b"x" * 65536] * 80), f"\r\n--{boundary}--\r\n".encode()]
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:

        def send() -> None:
            try:
                sock.sendall(request)
                for chunk in chunks:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # answered and closed before the rest was sent: what should happen

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        try:  # read while sending: the answer comes before the body ends
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # the server dropped the unread rest of the body, after answering
        sender.join(timeout=30)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:300]
    assert b"upload over 1048576 bytes" in answer
    with_length = httpx.post(
        f"{service.url}/v1/jobs",
        files={"file": ("a.pdf", b"x" * (5 * limit), "application/pdf")},
        data={"domain": "a.b"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert with_length.status_code == 413

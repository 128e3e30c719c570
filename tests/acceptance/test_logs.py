"""Logs: JSON lines with the request's id on each, and no secret or callback token anywhere.

A real `receiver serve` and a real simulator run with known secret values; between them sits
a recording relay that learns every callback URL (so the test knows each job's token). After
submissions, callbacks, deliveries and a collection of errors, every line both processes wrote
is read and searched.
"""

from __future__ import annotations

import base64
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import Process, base_env, free_port, signed
from tests.conftest import read_body

pytestmark = pytest.mark.acceptance


class RecordingRelay:
    """Passes every request on to the simulator, remembering the callback URLs it carries."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.callback_urls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"].endswith("/generate"):
            self.callback_urls.append(orjson.loads(body)["callback_url"])
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        url = self.target + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode()
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(scope["method"], url, content=body, headers=headers)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode())
                    for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def wait_for(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_no_secret_or_token_in_any_log_line_and_requests_share_their_id(
    start_service: Any, asgi_server: Any, webhook_server: Any, tmp_path: Path
) -> None:
    """Submissions, callbacks, deliveries and errors (bad tokens, forged signatures, 401s,
    404s) with known secrets: no line of either process holds a secret or a callback token,
    every service line is JSON, a request's lines share its id, and X-Request-ID is echoed."""
    admin_token = "adm-" + secrets.token_hex(16)
    api_key = "key-" + secrets.token_hex(16)
    webhook_secret = "cbsec-" + secrets.token_hex(16)
    sink_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    sim_port = free_port()
    simulator = Process(
        [
            "simulate",
            "--port",
            str(sim_port),
            "--api-key",
            api_key,
            "--webhook-secret",
            webhook_secret,
            "--delay",
            "0.05",
        ],
        base_env(),
        tmp_path / "simulator.log",
        sim_port,
    )
    try:
        simulator.start("/v1/health")
        relay = RecordingRelay(simulator.url)
        relay_url = asgi_server(relay)
        hook = webhook_server.endpoint()
        sinks = tmp_path / "sinks.toml"
        sinks.write_text(
            f'[[sinks]]\nname = "erp"\nurl = "{hook}"\nsecret = "${{ERP_SINK_SECRET}}"\n'
        )
        service = start_service(
            env={
                "RECEIVER_ADMIN_TOKEN": admin_token,
                "RECEIVER_VLMRUN_API_KEY": api_key,
                "RECEIVER_VLMRUN_BASE_URL": f"{relay_url}/v1",
                "RECEIVER_VLMRUN_WEBHOOK_SECRETS": webhook_secret,
                "RECEIVER_SINKS_FILE": str(sinks),
                "ERP_SINK_SECRET": sink_secret,
                "RECEIVER_LOG_LEVEL": "debug",
            }
        )
        admin = {"Authorization": f"Bearer {admin_token}"}
        base = service.url

        # Submissions: one with our request id, two without, one the API refuses.
        first = httpx.post(
            f"{base}/v1/jobs",
            json={"url": "https://example.com/a.pdf", "domain": "document.invoice"},
            headers={**admin, "X-Request-ID": "logs-submit-1"},
        )
        assert first.status_code == 201, first.text
        assert first.headers["x-request-id"] == "logs-submit-1"
        job = first.json()
        others = [
            httpx.post(
                f"{base}/v1/jobs",
                json={"url": f"https://example.com/{i}.pdf", "domain": "document.invoice"},
                headers=admin,
            )
            for i in range(2)
        ]
        assert all(r.status_code == 201 for r in others)
        assert all(r.headers["x-request-id"].startswith("req_") for r in others)
        refused = httpx.post(
            f"{base}/v1/jobs",
            json={"url": "https://example.com/b.pdf", "domain": "simulate.error-402"},
            headers=admin,
        )
        assert refused.status_code == 402

        # The simulator calls back; every job completes and is delivered to the sink.
        for submitted in [job, *(r.json() for r in others)]:
            wait_for(
                lambda s=submitted: (
                    httpx.get(f"{base}/v1/jobs/{s['id']}", headers=admin).json()["status"]
                    == "completed"
                )
            )
        wait_for(lambda: len(webhook_server.received(hook)) >= 3)
        assert len(relay.callback_urls) == 4  # the refused job had a token too
        tokens = [url.rsplit("/", 1)[1] for url in relay.callback_urls]

        # Errors: forged and missing signatures, unknown token, bad bearer tokens, 404s.
        callback_url = relay.callback_urls[0]
        body = orjson.dumps({"id": job["prediction_id"], "status": "completed"})
        forged = httpx.post(
            callback_url,
            content=body,
            headers={**signed(body, "not-the-secret"), "X-Request-ID": "logs-forged-1"},
        )
        assert forged.status_code == 401
        assert forged.headers["x-request-id"] == "logs-forged-1"
        assert httpx.post(callback_url, content=body).status_code == 401
        wrong_token = secrets.token_urlsafe(32)
        unknown = httpx.post(
            f"{base}/callbacks/vlmrun/{wrong_token}",
            content=body,
            headers=signed(body, webhook_secret),
        )
        assert unknown.status_code == 404
        duplicate = httpx.post(callback_url, content=body, headers=signed(body, webhook_secret))
        assert duplicate.status_code == 200
        assert httpx.get(callback_url).status_code == 405
        assert httpx.post(f"{callback_url}/extra", content=body).status_code in (404, 405)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {admin_token}"},
            {"Authorization": f"Bearer {admin_token}x"},
        ):
            assert httpx.get(f"{base}/v1/jobs", headers=headers).status_code == 401
        assert httpx.get(f"{base}/v1/jobs/job_nope", headers=admin).status_code == 404
        assert httpx.get(f"{base}/nowhere").status_code == 404
        replayed = httpx.post(
            f"{base}/v1/events/{job['id']}/replay", headers=admin, json={"sink": "erp"}
        )
        assert replayed.status_code == 404
    finally:
        simulator_exit = simulator.stop()
    assert (service.stop(), simulator_exit) == (0, 0)

    service_lines = json_lines(service.logs())  # raises if any line is not JSON
    everything = service.logs() + simulator.logs()
    for name, value in {
        "admin token": admin_token,
        "API key": api_key,
        "webhook secret": webhook_secret,
        "sink secret": sink_secret,
        "sink secret (key part)": sink_secret.removeprefix("whsec_"),
        "unknown callback token": wrong_token,
        **{f"callback token {i}": token for i, token in enumerate(tokens)},
    }.items():
        assert value not in everything, f"the {name} appears in a log"

    # One request's lines share its id; the access line knows the job and prediction.
    of_submit = [line for line in service_lines if line.get("request_id") == "logs-submit-1"]
    events = {line["event"]: line for line in of_submit}
    assert {"job.submitted", "http.request"} <= set(events)
    assert events["job.submitted"]["job_id"] == job["id"]
    assert events["http.request"]["job_id"] == job["id"]
    assert events["http.request"]["prediction_id"] == job["prediction_id"]
    of_forged = [
        line["event"] for line in service_lines if line.get("request_id") == "logs-forged-1"
    ]
    assert of_forged == ["callback.rejected", "http.request"]
    recorded = [line for line in service_lines if line["event"] == "callback.recorded"]
    assert len(recorded) == 3
    assert all(line["request_id"].startswith("req_") and line["job_id"] for line in recorded)
    access = [line for line in service_lines if line["event"] == "http.request"]
    assert all(line["request_id"] for line in access)
    assert any(line["path"] == "/callbacks/vlmrun/***" for line in access)  # the 405
    # The last lines of a SIGTERM'd process are not lost in its buffer.
    assert service_lines[-1]["event"] == "service.stopped"

"""The server's own limits, for a service run without a proxy in front: request heads that
never complete, heads too large or with too many headers, and more connections than the
process has descriptors for."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import orjson
import pytest

from tests.acceptance.conftest import (
    FakeVlmRun,
    Process,
    api_env,
    submit,
    terminal_callback,
    wait_for,
)

pytestmark = pytest.mark.acceptance

HEAD_TIMEOUT = 2.0


@pytest.fixture
def service(start_service: Callable[..., Process], fake_vlmrun: FakeVlmRun) -> Iterator[Process]:
    """`receiver serve` with a 256-descriptor limit and a 2 s head timeout."""
    proc = start_service(
        "serve",
        env=api_env(fake_vlmrun.url, RECEIVER_HEAD_TIMEOUT=str(HEAD_TIMEOUT)),
        ready=None,
    )
    proc.stop()  # started by the factory without a limit: start again with one
    proc.max_files = 256
    yield proc.start()
    proc.stop()


def limit_hits(service: Process, reason: str) -> float:
    text = httpx.get(f"{service.url}/metrics").text
    found = re.search(rf'^receiver_http_limits_total{{reason="{reason}"}} ([\d.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def connect(service: Process) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10)


def answer_of(sock: socket.socket) -> bytes:
    """What the server sent before closing (b"" when it closed without a word)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_idle_connections_beyond_the_descriptors_do_not_lock_out_callbacks(
    service: Process, fake_vlmrun: FakeVlmRun
) -> None:
    """300 idle connections against a 256-descriptor process: valid callbacks still get 200
    (the longest-waiting idle connections are closed to admit them), and every idle one is
    closed within the head timeout, counted and logged."""
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(service)) for _ in range(300)]
        assert terminal_callback(service, fake_vlmrun) == 200
        assert terminal_callback(service, fake_vlmrun) == 200
        time.sleep(HEAD_TIMEOUT + 1)
        for sock in idle:
            sock.settimeout(5)
            answer = answer_of(sock)
            assert answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) or answer == b""
    assert limit_hits(service, "evicted") + limit_hits(service, "capacity") >= 300 - 256 + 64
    assert limit_hits(service, "head_timeout") > 0
    assert '"event":"http.limit"' in service.logs()


def test_a_trickled_request_head_is_cut_off_at_the_head_timeout(service: Process) -> None:
    """50 connections sending their head a byte at a time are all answered 408 and closed
    once the head timeout passes, though each keeps sending."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(service)) for _ in range(50)]
        started = time.monotonic()
        closed: set[int] = set()
        for i in range(len(head)):
            for n, sock in enumerate(socks):
                if n not in closed:
                    try:
                        sock.sendall(head[i : i + 1])
                    except OSError:
                        closed.add(n)
            if len(closed) == len(socks) or time.monotonic() - started > HEAD_TIMEOUT + 3:
                break
            time.sleep(0.05)
        answers = [answer_of(sock) for sock in socks]
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in answers)
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 1
    assert time.monotonic() - started < HEAD_TIMEOUT + 4
    assert limit_hits(service, "head_timeout") >= 50


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (b"X-Big: " + b"a" * 1_000_000 + b"\r\n", "head_too_large"),
        (b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)), "headers"),
    ],
)
def test_an_oversized_head_is_431(service: Process, extra: bytes, reason: str) -> None:
    """A 1 MB header, or 100,000 headers, is answered 431 and the connection closed."""
    with connect(service) as sock:
        with contextlib.suppress(OSError):  # refused before all was sent
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert limit_hits(service, reason) == 1
    assert httpx.get(f"{service.url}/healthz").status_code == 200


def test_keep_alive_and_ordinary_requests_are_untouched(service: Process) -> None:
    """Many requests over one kept-alive connection, with bodies, all answered as usual."""
    with httpx.Client(base_url=service.url) as client:
        for _ in range(50):
            assert client.get("/healthz").status_code == 200
        big = client.post("/callbacks/vlmrun/nope", content=b"{" + b" " * 200_000 + b"}")
        assert big.status_code == 404
    assert wait_for(lambda: limit_hits(service, "head_timeout") == 0, 1, "no limit hit")


def test_a_client_gone_mid_body_is_logged_499_not_500(
    service: Process, fake_vlmrun: FakeVlmRun
) -> None:
    """A callback whose sender disconnects before its body is complete is logged as 499
    (client closed request), not as a server error, and nothing is recorded."""
    (job,) = submit(service)
    path = httpx.URL(fake_vlmrun.callback_urls[str(job["prediction_id"])]).path
    with connect(service) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"id": '.encode()
        )
    line = wait_for(
        lambda: next(
            (
                orjson.loads(raw)
                for raw in service.logs().splitlines()
                if '"http.request"' in raw and "/callbacks/" in raw
            ),
            None,
        ),
        10,
        "the callback's access line",
    )
    assert line["status"] == 499 and line["method"] == "POST"

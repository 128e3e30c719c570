"""Shared test helpers: real-service checks and a real local webhook consumer."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn


async def read_body(receive: Any) -> bytes:
    """The whole request body of an ASGI request (test servers read it before answering)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def require_service(host: str, port: int, name: str) -> None:
    """Skip the test when `name` does not answer on host:port; fail instead when CI=true.

    On a laptop a missing Redis should not turn the suite red, but in CI a missing service
    means the pipeline is broken and silently skipping would hide it.
    """
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError:
        message = f"{name} not reachable on {host}:{port}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Reply:
    """How the consumer answers one endpoint."""

    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (timeouts)


@dataclass(frozen=True)
class Received:
    """One request as the consumer saw it: exact body bytes, lower-cased headers."""

    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class WebhookServer:
    """A real HTTP consumer (uvicorn on a free loopback port, in its own thread).

    Each test takes its own endpoint with `endpoint(...)` and reads what arrived there with
    `received(url)`, so tests sharing the server never see each other's requests.
    """

    def __init__(self) -> None:
        self._replies: dict[str, Reply] = {}
        self._received: dict[str, list[Received]] = {}
        self._lock = threading.Lock()
        self.base_url = ""

    def endpoint(
        self,
        status: int = 200,
        body: bytes = b"ok",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> str:
        """A fresh URL on this server that answers `status`/`body`/`headers` after `delay` s."""
        path = f"/hook/{uuid.uuid4().hex}"
        self._replies[path] = Reply(status, body, headers or {}, delay)
        return self.base_url + path

    def received(self, url: str) -> list[Received]:
        path = url.removeprefix(self.base_url)
        with self._lock:
            return list(self._received.get(path, []))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            self._received.setdefault(scope["path"], []).append(
                Received(scope["path"], headers, body, scope["client"][1])
            )
        reply = self._replies.get(scope["path"], Reply(status=404, body=b"no such endpoint"))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        raw_headers = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": reply.body})


@pytest.fixture(scope="session")
def webhook_server() -> Iterator[WebhookServer]:
    """A real local webhook consumer for the whole session."""
    app = WebhookServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test webhook server did not start")
        time.sleep(0.01)
    yield app
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(name="require_service")
def _require_service_fixture() -> Callable[[str, int, str], None]:
    """`require_service` as a fixture.

    Test modules should not `from conftest import ...`: every conftest.py outside a package is
    the module "conftest", so the import finds whichever was loaded last.
    """
    return require_service

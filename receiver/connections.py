"""Connection limits uvicorn does not have: time to receive a request head, the head's size
and header count, and how many connections are open at once.

`receiver serve` may face the internet without a proxy in front. Left to uvicorn alone, a
connection that never completes a request head is never closed, a 1 MB header or 100,000
headers are read, and idle connections can take every file descriptor until valid callbacks
fail. `guarded()` wraps uvicorn's protocol by composition (uvicorn's documented `http=` hook):
each connection's bytes go through a second httptools parser, which only watches where each
request head begins and ends, before uvicorn sees them.

- A request head (from the connection's opening, or from the first byte of the next request
  on a kept-alive one) must be complete within `head_timeout` seconds: else the connection
  gets 408 and is closed. Idle time between requests is uvicorn's `timeout_keep_alive`.
- A head over `max_head_bytes`, or with more than `max_headers` headers, gets 431 and close.
- At `max_connections` open, the connection that has waited longest for its head is closed
  to admit the new one (an idle flood cannot lock out real clients); when none is waiting,
  the new one gets 503 at once, never left hanging.
Each limit hit counts in `receiver_http_limits_total{reason}` and logs `http.limit` (at most
one line a second per reason, with how many were not logged).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
import structlog
from prometheus_client import Counter

log = structlog.get_logger("receiver.connections")

# Descriptors kept for everything but client connections: the store, sinks, the VLM Run API.
RESERVED_DESCRIPTORS = 64

_REASONS = {
    408: b"408 Request Timeout",
    431: b"431 Request Header Fields Too Large",
    503: b"503 Service Unavailable",
}


def default_max_connections() -> int:
    """What the process's descriptor limit allows, less those kept for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, soft - RESERVED_DESCRIPTORS)


@dataclass(frozen=True)
class Limits:
    head_timeout: float
    max_head_bytes: int
    max_headers: int
    max_connections: int


class Guard:
    """The limits, the open connections, and which of them wait for a head (oldest first),
    shared by every connection of one server."""

    def __init__(self, limits: Limits, hits: Counter) -> None:
        self.limits = limits
        self.hits = hits
        self.open = 0
        self.waiting: dict[GuardedConnection, None] = {}  # insertion order: longest first
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line, not logged)

    def hit(self, reason: str, client: Any) -> None:
        self.hits.labels(reason).inc()
        now = time.monotonic()
        last, unlogged = self._logged.get(reason, (-1.0, 0))
        if now - last < 1.0:
            self._logged[reason] = (last, unlogged + 1)
            return
        self._logged[reason] = (now, 0)
        host = client[0] if isinstance(client, tuple) else None
        log.warning("http.limit", reason=reason, client=host, not_logged=unlogged)

    def admit(self) -> bool:
        """Make room for one more connection, closing the longest wait if need be."""
        if self.open >= self.limits.max_connections:
            if not self.waiting:
                return False
            oldest = next(iter(self.waiting))
            self.hit("evicted", oldest.client)
            oldest.refuse(503)
        self.open += 1
        return True


class GuardedConnection(asyncio.Protocol):
    """One client connection: watches its request heads, then hands every byte to `inner`."""

    def __init__(self, inner: asyncio.Protocol, guard: Guard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.client: Any = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.in_head = True  # waiting for, or reading, a request head
        self.head_bytes = 0
        self.headers = 0
        self.body_bytes = 0  # of the chunk being parsed
        self.head_ended = False  # in the chunk being parsed
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client = transport.get_extra_info("peername")
        if not self.guard.admit():
            self.guard.hit("capacity", self.client)
            self.refuse(503)
            return
        self.admitted = True
        self.inner.connection_made(self.transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.parser is not None:
            self.body_bytes, self.head_ended = 0, False
            was_in_head = self.in_head
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._stop_watching()  # not HTTP/1.1 requests any more: uvicorn's to judge
            except httptools.HttpParserError:
                self._stop_watching()  # uvicorn's own parser answers 400
            if was_in_head or self.in_head:
                self.head_bytes += len(data) - self.body_bytes if self.head_ended else len(data)
            limits = self.guard.limits
            if self.head_bytes > limits.max_head_bytes or self.headers > limits.max_headers:
                reason = "head_too_large" if self.headers <= limits.max_headers else "headers"
                self.guard.hit(reason, self.client)
                self.refuse(431)
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle()
        if self.admitted:
            self.admitted = False
            self.guard.open -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # httptools callbacks (request heads only)

    def on_message_begin(self) -> None:
        if not self.in_head:
            self._await_head()

    def on_url(self, url: bytes) -> None:
        self.guard.waiting.pop(self, None)  # bytes are coming: not an idle connection now

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1

    def on_headers_complete(self) -> None:
        self.head_ended = True
        self._settle()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    # the rest

    def _await_head(self) -> None:
        self.in_head, self.head_bytes, self.headers = True, 0, 0
        self.guard.waiting[self] = None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.limits.head_timeout, self._head_timed_out)

    def _settle(self) -> None:
        """The head is in (or the connection is gone): no timer, not waiting."""
        self.in_head = False
        self.guard.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop_watching(self) -> None:
        self.parser = None
        self._settle()

    def _head_timed_out(self) -> None:
        self.timer = None
        self.guard.hit("head_timeout", self.client)
        self.refuse(408)

    def refuse(self, status: int) -> None:
        """Answer `status` and close. Only ever called while no response is under way: at the
        door, or while a request head is awaited."""
        self._settle()
        if self.transport is None or self.transport.is_closing():
            return
        reason = _REASONS[status]
        body = b'{"error": "%s"}' % reason[4:].lower()
        head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n" % reason
        head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(head + body)
        self.transport.close()


def guarded(inner: Callable[..., asyncio.Protocol], guard: Guard) -> Callable[..., Any]:
    """A protocol factory for uvicorn's `http=`: uvicorn's arguments go to `inner` unchanged,
    and each connection it makes is wrapped in a GuardedConnection."""

    def make(**uvicorn_arguments: Any) -> GuardedConnection:
        return GuardedConnection(inner(**uvicorn_arguments), guard)

    return make

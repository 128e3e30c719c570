"""The HTTP server protocol (receiver.server) under a real uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from receiver.server import FLUSH_BYTES, OneWriteHttpToolsProtocol, _GatheredWrites

BIG = b"x" * (3 * FLUSH_BYTES + 123)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/big":  # streamed in chunks, past the gathering limit
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(0, len(BIG), 10_000):
            await send(
                {"type": "http.response.body", "body": BIG[i : i + 10_000], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"status":"recorded"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"21")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def port(unused_tcp_port: int) -> AsyncIterator[int]:
    config = uvicorn.Config(
        app, port=unused_tcp_port, http=OneWriteHttpToolsProtocol, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # up within 5 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield unused_tcp_port
    server.should_exit = True
    await task


async def request(port: int, path: str, close: bool = False) -> tuple[bytes, bytes]:
    """The first chunk read from the socket, and the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = b"close" if close else b"keep-alive"
    writer.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nhost: x\r\nconnection: " + connection + b"\r\n\r\n"
    )
    first = await reader.read(1 << 20)
    rest = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.3 if not close else 5):
            while chunk := await reader.read(1 << 20):
                rest += chunk
    writer.close()
    return first, first + rest


class Recording(asyncio.Transport):
    """What the real transport would be asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_a_response_leaves_in_one_write() -> None:
    """Headers and body written in one pass of the loop reach the socket as one write; a
    large body goes at once; close sends what is gathered first."""
    recording = Recording()
    gathered = _GatheredWrites(recording, asyncio.get_running_loop())
    gathered.write(b"HTTP/1.1 200 OK\r\n\r\n")
    gathered.write(b"{}")
    assert recording.writes == []
    await asyncio.sleep(0)
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    gathered.write(BIG)
    assert recording.writes[-1] == BIG
    gathered.write(b"bye")
    gathered.close()
    assert recording.writes[-1] == b"bye" and recording.closed


async def test_a_small_answer_arrives_whole(port: int) -> None:
    """Through a real server: status line, headers and body, nothing missing."""
    _, whole = await request(port, "/")
    assert whole.startswith(b"HTTP/1.1 200 OK\r\n")
    assert whole.endswith(b'\r\n\r\n{"status":"recorded"}')


async def test_a_large_streamed_body_arrives_whole_and_in_order(port: int) -> None:
    """A body past the gathering limit is sent as it comes; the client gets every byte in order."""
    _, whole = await request(port, "/big")
    head, _, body = whole.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks, data = body, b""
    while True:  # decode the chunked body
        size_line, _, chunks = chunks.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        data, chunks = data + chunks[:size], chunks[size + 2 :]
    assert data == BIG


async def test_connection_close_sends_the_answer_before_closing(port: int) -> None:
    """With `Connection: close` the gathered answer is written before the socket closes."""
    _, whole = await request(port, "/", close=True)
    assert whole.endswith(b'{"status":"recorded"}')

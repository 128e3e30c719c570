"""The HTTP server protocol: uvicorn's httptools protocol, one socket write per response.

uvicorn writes a response's status line and headers as soon as the app starts the response,
then the body in a second write. For the small JSON answers this service gives (a callback's
200), that second system call and TCP segment took about a tenth of the event loop's time
on the callback route (py-spy). Here a connection's writes are gathered until the event loop
has run what is ready, then sent in one write; past `FLUSH_BYTES` (a large body), or on
close or end of stream, what is gathered goes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024


class _GatheredWrites:
    """A transport whose writes leave together, at the end of the loop's current pass."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts, self._size = [], 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes]) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """Pass to uvicorn as `http=`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gathered = _GatheredWrites(transport, self.loop)
        super().connection_made(cast(asyncio.Transport, gathered))

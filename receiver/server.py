"""The HTTP protocol `receiver serve` gives uvicorn: uvicorn's own httptools protocol, as is.

A subclass of it once gathered each response's writes into one socket write. On the bench
with both servers pinned to one core it was worth 4 % (median of 8 alternating rounds,
0.98-1.20; docs/performance.md): less than the 10 % a trick must earn to keep a subclass of
uvicorn's internals, so it went.
"""

from __future__ import annotations

HTTP_PROTOCOL = "httptools"

# The name `receiver serve` (receiver/cli.py) imports; it can pass "httptools" itself and drop
# this module.
OneWriteHttpToolsProtocol = HTTP_PROTOCOL

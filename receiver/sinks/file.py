"""JSONL file sink: `file:///abs/path.jsonl`, one event envelope per line.

A send returns only after the line is on disk (write, then fsync). The file is opened with
O_APPEND and each line goes out in one unbuffered write, so there is no user-space buffer to
flush and concurrent processes appending to the same file do not overwrite each other; within
this process an asyncio.Lock serialises writers so lines never interleave. The blocking calls
run in a worker thread to keep the event loop free. The directory must exist.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from receiver.config import SinkConfig
from receiver.errors import SinkError
from receiver.sinks import Message, Receipt


class FileSink:
    def __init__(self, config: SinkConfig) -> None:
        self.name = config.name
        self.path = Path(unquote(urlsplit(config.url).path))
        self._fd: int | None = None
        self._lock = asyncio.Lock()

    async def send(self, message: Message) -> Receipt:
        if b"\n" in message.body:
            # A JSONL reader would see two broken records; retrying cannot change the body.
            raise SinkError(f"sink {self.name}: body contains a newline", permanent=True)
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, message.body + b"\n")
            except OSError as exc:  # disk full, permissions, missing directory: may be fixed
                reason = f"sink {self.name}: cannot write {self.path}: {exc.strerror}"
                raise SinkError(reason) from exc
        return Receipt(snippet=str(self.path))

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        view = memoryview(line)
        while view:  # os.write may write less than asked (e.g. on a signal); finish the line
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    async def close(self) -> None:
        async with self._lock:  # never close under a write in progress
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

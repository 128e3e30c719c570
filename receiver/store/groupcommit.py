"""Group commit: concurrent writes recorded together, in one transaction, by one writer.

A commit costs a disk flush (SQLite) or a round trip and a WAL flush (PostgreSQL); paying it
once per batch instead of once per callback is most of what makes recording fast. Each caller
still waits for its own result, which is set only after the batch's transaction committed: a
2xx is never sent for a callback that is not durable.

The writer is a task on the event loop. It takes everything queued, writes it, and while it
does, what arrives queues up for the next batch: the busier the service, the larger the batch.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from receiver.errors import StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")
MAX_BATCH = 1024

# Writes a batch; one result (or the error that is that item's answer) per item, in order.
WriteBatch = Callable[[list[Item]], Awaitable[list[Result | BaseException]]]


class GroupCommit(Generic[Item, Result]):
    def __init__(self, write: WriteBatch[Item, Result], max_batch: int = MAX_BATCH) -> None:
        self._write = write
        self._max_batch = max_batch
        self._queue: collections.deque[tuple[Item, asyncio.Future[Result]]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def submit(self, item: Item) -> Result:
        """Queue `item`; its result once the batch it went into has committed."""
        if self._closing:
            raise StoreUnavailable("the store is closing")
        if self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._writer = asyncio.create_task(self._run(), name="group-commit")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Write what is queued, then stop; submit() may start it again afterwards."""
        writer = self._writer
        if writer is not None and not writer.done():
            self._closing = True
            assert self._wake is not None
            self._wake.set()
            await asyncio.gather(writer, return_exceptions=True)
        self._writer = None
        self._closing = False
        while self._queue:  # only if the writer was cancelled with items queued
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(StoreUnavailable("the store is closed"))

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            try:
                results = await self._write([item for item, _ in batch])
            except BaseException as exc:
                results = [exc] * len(batch)
                if not isinstance(exc, Exception):  # cancelled: answer, then stop
                    _settle(batch, results)
                    raise
            _settle(batch, results)


def _settle(
    batch: list[tuple[Item, asyncio.Future[Result]]], results: list[Result | BaseException]
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

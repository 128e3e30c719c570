"""SQLite backend: one file, WAL, and group commit through a single writer.

Why group commit: SQLite allows one writer at a time, and a commit costs an fsync. Every write
is a function handed to the writer, which runs everything queued in one transaction and
commits once, then wakes each caller with its own result. So concurrent callbacks share one
fsync, and each caller still hears back only after its data is committed
(`synchronous=FULL`: committed means on disk). Reads use a second connection in a thread of
their own (WAL lets them proceed during writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from receiver.errors import StoreError, StoreUnavailable
from receiver.models import Claimed, Event, Incoming, Job, RecordResult, Route
from receiver.store import Attempt, Page, Stats, sql
from receiver.store.schema import MIGRATIONS, VERSION_TABLE, render

T = TypeVar("T")
log = structlog.get_logger(__name__)
_MAX_BATCH = 512
_Item = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_Result = tuple[Any, BaseException | None]


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # The hot indexes (token hash, prediction id) should stay in memory: 64 MiB of page cache.
    conn.execute("PRAGMA cache_size=-65536")
    return conn


class _Writer:
    """The one writer. `submit(fn)` runs `fn(conn)` inside a transaction shared with every
    other write queued meanwhile, and returns once that transaction has committed.

    The statements run on the event loop thread: each takes microseconds, and running them
    here avoids a thread hop and a fight over the GIL per statement. Only BEGIN (which may
    wait for another process's lock) and COMMIT (the fsync) go to a thread; while a commit is
    on disk, the next batch gathers.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")

    def start(self) -> None:
        self._conn = _connect(self._path)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sqlite-writer")

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, fut))
        self._wake.set()
        return await fut

    async def stop(self) -> None:
        if self._task is not None:
            self._closing = True  # the writer commits what is queued, then returns
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._io.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            if self._pending or self._closing:
                self._wake.set()
            if not batch and self._closing:
                return
            if batch:
                results = await self._run_batch(batch)
                for (_, fut), (value, err) in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if err is not None:
                        fut.set_exception(err)
                    else:
                        fut.set_result(value)

    async def _in_thread(self, statement: str) -> None:
        conn = self._conn
        assert conn is not None
        await asyncio.get_running_loop().run_in_executor(self._io, conn.execute, statement)

    async def _run_batch(self, batch: list[_Item]) -> list[_Result]:
        conn = self._conn
        assert conn is not None
        try:
            await self._in_thread("BEGIN IMMEDIATE")
            results: list[_Result] = [(fn(conn), None) for fn, _ in batch]
            await self._in_thread("COMMIT")
            return results
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                return [(None, _wrap(exc))]
        # One item failed and took the batch down with it: redo each alone so only it fails.
        return [(await self._run_batch([item]))[0] for item in batch]


def _wrap(exc: Exception) -> Exception:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        wrapped: Exception = StoreUnavailable(f"sqlite: {exc}")
    elif isinstance(exc, sqlite3.Error):
        wrapped = StoreError(f"sqlite: {exc}")
    else:
        return exc
    wrapped.__cause__ = exc
    return wrapped


class SqliteStore:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `sqlite:///:memory:` (tests only)."""

    def __init__(self, url: str, routes: Sequence[Route] = ()) -> None:
        self.path = url.removeprefix("sqlite://").removeprefix("/") or ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.routes = tuple(routes)
        self._work = asyncio.Event()
        self._writer = _Writer(self.path)
        self._reader: sqlite3.Connection | None = None
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._started = False

    # -- plumbing ---------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._started:
            try:
                self._writer.start()
                self._reader = _connect(self.path)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
            self._started = True

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        return await self._writer.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        reader = self._reader
        assert reader is not None

        def run() -> T:
            try:
                return fn(reader)
            except Exception as exc:
                raise _wrap(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._reads, run)

    async def close(self) -> None:
        if self._started:
            await self._writer.stop()
            if self._reader is not None:
                self._reader.close()
            self._started = False
        self._reads.shutdown(wait=False)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def migrate(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute(render(VERSION_TABLE, "sqlite"))
            row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
            current = int(row[0])
            for version, name, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        conn.execute(render(statement, "sqlite"))
                    conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
                    current = version
            return current

        return await self._write(run)

    # -- jobs --------------------------------------------------------------------------------

    async def create_job(self, job: Job, token_hash: str) -> None:
        await self._write(lambda c: sql.create_job(c, job, token_hash))

    async def set_submitted(
        self, job_id: str, prediction_id: str | None, status: str, error: str | None, now: float
    ) -> Job:
        return await self._write(
            lambda c: sql.set_submitted(c, job_id, prediction_id, status, error, now)
        )

    async def get_job(self, job_id: str) -> tuple[Job, list[Event]] | None:
        return await self._read(lambda c: sql.get_job(c, job_id))

    async def list_jobs(
        self, status: str | None, domain: str | None, limit: int, cursor: str | None
    ) -> Page:
        return await self._read(lambda c: sql.list_jobs(c, status, domain, limit, cursor))

    # -- events ------------------------------------------------------------------------------

    async def record(self, incoming: Incoming) -> RecordResult:
        result = await self._write(lambda c: sql.record(c, incoming, self.routes))
        if result.sinks:
            self._work.set()  # wake the dispatcher: new deliveries are due now
        return result

    async def get_event(self, event_id: str) -> Event | None:
        return await self._read(lambda c: sql.get_event(c, event_id))

    # -- outbox ------------------------------------------------------------------------------

    async def claim(
        self, now: float, limit: int, lease_seconds: float, skip_sinks: Sequence[str] = ()
    ) -> list[Claimed]:
        return await self._write(lambda c: sql.claim(c, now, limit, lease_seconds, skip_sinks))

    async def finish(self, attempts: Sequence[Attempt], now: float) -> None:
        await self._write(lambda c: sql.finish(c, attempts, now))

    async def requeue(
        self,
        now: float,
        *,
        delivery_id: int | None = None,
        event_id: str | None = None,
        sink: str | None = None,
        since: float | None = None,
        only_dead: bool = True,
    ) -> int:
        count = await self._write(
            lambda c: sql.requeue(c, now, delivery_id, event_id, sink, since, only_dead)
        )
        if count:
            self._work.set()
        return count

    async def list_deliveries(
        self, state: str | None, sink: str | None, limit: int, cursor: str | None
    ) -> Page:
        return await self._read(lambda c: sql.list_deliveries(c, state, sink, limit, cursor))

    async def wait_for_work(self, timeout: float) -> None:
        self._start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout)
        self._work.clear()

    # -- reconciliation and upkeep -----------------------------------------------------------

    async def overdue_jobs(self, now: float, limit: int) -> list[Job]:
        return await self._read(lambda c: sql.overdue_jobs(c, now, limit))

    async def schedule_poll(self, job_id: str, next_poll_at: float | None, attempts: int) -> None:
        await self._write(lambda c: sql.schedule_poll(c, job_id, next_poll_at, attempts))

    async def time_out(self, job_id: str, now: float) -> None:
        await self._write(lambda c: sql.time_out(c, job_id, now))

    async def prune(self, before: float, batch: int = 1000) -> int:
        """Attempts, delivered rows and payloads nobody awaits, older than `before`."""
        total = 0
        for statement in sql.PRUNE:  # in this order: deleted deliveries free their payloads
            run = functools.partial(
                sql.prune_batch, statement=statement, before=before, limit=batch
            )
            while True:
                n = await self._write(run)
                total += n
                if n < batch:
                    break
        return total

    async def stats(self, now: float) -> Stats:
        return await self._read(lambda c: sql.stats(c, now))

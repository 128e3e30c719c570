"""SQLite backend: one file, WAL, and group commit through a single writer.

Why group commit: SQLite allows one writer at a time, and a commit costs an fsync. Writes are
handed to the writer thread, which takes everything queued at once and commits it together,
then wakes each caller with its own result. So concurrent callbacks share one fsync, and each
caller still hears back only after its data is committed (`synchronous=FULL`: committed means
on disk). Recording callbacks, the hot path, is a few statements per batch (see `sql.RECORDER`).
Reads use a second connection in a thread of their own (WAL lets them proceed during writes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import sqlite3
import threading
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
A = TypeVar("A")
log = structlog.get_logger(__name__)
_MAX_BATCH = 1024
_SQLITE_NEEDED = (3, 38)
# A write: an operation that takes the connection and the arguments of every request queued
# for it, and returns one result per argument, in order.
_Op = Callable[[sqlite3.Connection, list[Any]], list[Any]]
_Item = tuple[_Op, Any, "asyncio.Future[Any]"]
_Result = tuple[Any, BaseException | None]


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # The hot indexes (token hash, prediction id) should stay in memory: 64 MiB of page cache.
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def _in_transaction(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    """The plain writes queued together, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        values = [fn(conn) for fn in fns]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return values


class _Checkpointer:
    """Copies the WAL back into the database file from a thread of its own, at most every
    `interval` seconds while writes go on (`PRAGMA wal_checkpoint(PASSIVE)`: it never blocks
    the writer). SQLite's default does it inside a writer's commit every 1000 pages, which,
    measured, cost the writer a quarter of its time per callback.
    """

    def __init__(self, path: str, interval: float = 0.1) -> None:
        self._path = path
        self._interval = interval
        self._written = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._closing.clear()  # a store can be opened again after close()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def written(self) -> None:
        if not self._written.is_set():
            self._written.set()

    def stop(self) -> None:
        if self._thread is not None:
            self._closing.set()
            self._written.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._written.wait()
                self._written.clear()
                if self._closing.is_set():
                    return
                try:
                    conn = conn or _connect(self._path)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except Exception as exc:  # the next commit wakes us to try again
                    log.warning("sqlite.checkpoint_failed", error=str(exc))
                if self._closing.wait(self._interval):
                    return
        finally:
            if conn is not None:
                conn.close()


class _Writer:
    """The one writer: a thread with its own connection. `submit(op, arg)` queues a write;
    each caller hears back once its write has committed.

    Every request queued meanwhile for the same operation runs as one call,
    `op(conn, [arg, ...])`, which commits them together (so they share an fsync; recording
    commits once more per prediction that comes again in the batch) and returns one result
    per argument. The thread takes the next batch as soon as one is done, without waiting for
    the event loop, and SQLite releases the GIL while it works and while it waits for the
    disk: the loop answers one batch while the next is being written.
    """

    def __init__(self, path: str, setup: Sequence[str] = ()) -> None:
        self._path = path
        self._setup = setup
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkpointer = _Checkpointer(path)

    def start(self) -> None:
        self._closing = False  # a store can be opened again after close()
        self._conn = _connect(self._path)
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job
        for statement in self._setup:
            self._conn.execute(statement)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._checkpointer.start()

    async def submit(self, op: Callable[[sqlite3.Connection, list[A]], list[T]], arg: A) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, arg, fut))
        if not self._wake.is_set():  # the writer clears it before it takes what is queued
            self._wake.set()
        return await fut

    async def stop(self) -> None:
        if self._thread is not None:
            self._closing = True  # the writer commits what is queued, then returns
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        while self._queue:  # queued after the writer's last look: never written
            _, _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(StoreUnavailable("the store is closed"))
        await asyncio.to_thread(self._checkpointer.stop)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        """The writer's thread."""
        assert self._loop is not None
        while True:
            self._wake.wait()
            self._wake.clear()
            batch: list[_Item] = []
            while self._queue and len(batch) < _MAX_BATCH:
                batch.append(self._queue.popleft())
            if self._queue or self._closing:  # stop() may have been cleared above
                self._wake.set()
            if not batch:
                if self._closing:
                    return
                continue
            results = self._write(batch)
            self._checkpointer.written()
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                self._loop.call_soon_threadsafe(_settle, batch, results)

    def _write(self, batch: list[_Item]) -> list[_Result]:
        """In the writer's thread: one call per operation."""
        results: list[_Result] = []
        for op, items in itertools.groupby(batch, key=lambda item: item[0]):
            results += self._call(op, [arg for _, arg, _ in items])
        return results

    def _call(self, op: _Op, args: list[Any]) -> list[_Result]:
        conn = self._conn
        assert conn is not None
        try:
            return [(value, None) for value in op(conn, args)]
        except Exception as exc:
            if len(args) == 1:
                return [(None, _wrap(exc))]
        # One request failed and took the others down with it: redo each alone, so only it fails.
        return [self._call(op, [arg])[0] for arg in args]


def _settle(batch: list[_Item], results: list[_Result]) -> None:
    for (_, _, fut), (value, err) in zip(batch, results, strict=True):
        if fut.done():
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)


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
        self._writer = _Writer(self.path, setup=sql.RECORDER)
        self._reader: sqlite3.Connection | None = None
        self._reads: ThreadPoolExecutor | None = None
        self._started = False

    # -- plumbing ---------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._started:
            if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
                raise StoreError(
                    f"SQLite {'.'.join(map(str, _SQLITE_NEEDED))} or newer is needed (JSON"
                    f" operators, UPDATE ... FROM); this Python has {sqlite3.sqlite_version}."
                    " Use PostgreSQL, or a Python built with a newer SQLite."
                )
            try:
                self._writer.start()
                self._reader = _connect(self.path)
                self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
            self._started = True

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        return await self._writer.submit(_in_transaction, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        reader, reads = self._reader, self._reads
        assert reader is not None and reads is not None

        def run() -> T:
            try:
                return fn(reader)
            except Exception as exc:
                raise _wrap(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(reads, run)

    async def close(self) -> None:
        if self._started:
            await self._writer.stop()
            if self._reader is not None:
                self._reader.close()
            self._started = False
        if self._reads is not None:
            self._reads.shutdown(wait=False)
            self._reads = None

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
        self._start()
        found = await self._writer.submit(sql.record, sql.prepare(incoming, self.routes))
        result = sql.outcome(incoming, found)
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

    async def poll_outstanding(self, now: float) -> int:
        return await self._write(lambda c: sql.poll_outstanding(c, now))

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

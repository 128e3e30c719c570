"""SQLite backend: one file, WAL, and group commit through a single writer.

Why group commit: SQLite allows one writer at a time, and a commit costs a disk flush. Writes
are queued; the writer takes everything queued at once and commits it in one transaction,
then each caller hears its own result. So concurrent callbacks share one flush, and each
caller still hears back only after its data is committed (`synchronous=FULL`: committed means
on disk). The statements run on the event loop (they are quick: pages in memory); only the
COMMIT, which waits for the disk, runs in a thread, so the loop serves requests meanwhile.
Recording callbacks is `receiver.store.recording`, shared with PostgreSQL.
Reads use a second connection in a thread of their own (WAL lets them proceed during writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from receiver.errors import StoreError, StoreUnavailable
from receiver.models import Claimed, DeliveryAttempt, Event, Incoming, Job, RecordResult, Route
from receiver.store import Attempt, Overview, Page, Stats, recording, sql
from receiver.store.groupcommit import GroupCommit
from receiver.store.recording import Row, Statement
from receiver.store.schema import MIGRATIONS, VERSION_TABLE, render

T = TypeVar("T")
log = structlog.get_logger(__name__)
_SQLITE_NEEDED = (3, 38)
# A write: an operation that takes the connection and the arguments of every request queued
# for it, and returns one result per argument, in order.
_Op = Callable[[sqlite3.Connection, list[Any]], Awaitable[list[Any]]]


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # The hot indexes (token hash, prediction id) should stay in memory: 64 MiB of page cache.
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def _probe(conn: sqlite3.Connection) -> None:
    """The smallest real write: the header's user_version, set to what it is."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.execute(f"PRAGMA user_version = {int(version)}")


def _path(url: str) -> str:
    return url.removeprefix("sqlite://").removeprefix("/") or ":memory:"


def database_missing(url: str) -> str | None:
    """Why `receiver serve` must not start on `url`: a SQLite file that is not there. Only
    `receiver migrate` creates one, so a database lost under a running service is not
    silently replaced by an empty one at the next start."""
    if not url.startswith("sqlite:"):
        return None
    path = _path(url)
    if path == ":memory:" or Path(path).exists():
        return None
    return (
        f"no database at {path}: `receiver migrate` creates one. If this service ran on it "
        "before, it is gone: restore it from a backup (docs/operations.md) instead."
    )


async def _each(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    """Plain writes (a job created, a claim, ...), one after the other."""
    return [fn(conn) for fn in fns]


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


class _Rows:
    """The writer's connection as recording uses it: a batch's rows bound as `VALUES` lists."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def run(self, statement: Statement, rows: Sequence[Row]) -> list[Row]:
        found: list[Row] = []
        for piece in _pieces(rows):
            params = [value for row in piece for value in row]
            found += self._conn.execute(statement.sqlite(len(piece)), params).fetchall()
        return found


# A statement takes at most FILL_ROWS rows and FILL_BYTES of bodies (or one larger body alone),
# in pieces of 1, 2, 4, ... rows: a few statement shapes in the connection's cache, each keeping
# the values last bound to it (SQLite copies them), so what stays in memory is bounded too.
FILL_ROWS = 64
FILL_BYTES = 1024 * 1024


def _pieces(rows: Sequence[Row]) -> Iterator[Sequence[Row]]:
    sizes = [sum(len(v) for v in row if isinstance(v, bytes)) for row in rows]
    start = 0
    while start < len(rows):
        take, size = 1, sizes[start]
        while take * 2 <= min(FILL_ROWS, len(rows) - start):
            size += sum(sizes[start + take : start + take * 2])
            if size > FILL_BYTES:
                break
            take *= 2
        yield rows[start : start + take]
        start += take


class _Writer:
    """The one writer: a connection written to on the event loop, batch by batch (group
    commit), with each batch's COMMIT (the disk flush) in a thread of its own, so the loop
    serves requests while the disk works.

    A write is an operation and an argument; the operations queued together run in one
    transaction, consecutive requests of one operation as one call (`op(conn, [arg, ...])`,
    one result per argument). If the transaction fails, each request is run again alone, so
    only the one at fault fails.
    """

    def __init__(self, path: str, check: Callable[[], None]) -> None:
        self._path = path
        self._check = check  # raises StoreUnavailable when the file is no longer ours
        self.failing: Exception | None = None  # why the last transaction failed, until one works
        self._conn: sqlite3.Connection | None = None
        self._commits: ThreadPoolExecutor | None = None
        self._checkpointer = _Checkpointer(path)
        self._group: GroupCommit[tuple[_Op, Any], Any] = GroupCommit(self._write)

    def start(self) -> None:
        self._conn = _connect(self._path)
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
        self._checkpointer.start()

    async def submit(self, op: _Op, arg: Any) -> Any:
        return await self._group.submit((op, arg))

    async def stop(self) -> None:
        await self._group.close()
        await asyncio.to_thread(self._checkpointer.stop)
        if self._commits is not None:
            self._commits.shutdown(wait=True)
            self._commits = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _write(self, batch: list[tuple[_Op, Any]]) -> list[Any]:
        conn, commits = self._conn, self._commits
        if conn is None or commits is None:
            return [StoreUnavailable("the store is closed")] * len(batch)
        try:
            self._check()
        except StoreUnavailable as exc:
            return [exc] * len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            results: list[Any] = []
            for op, items in itertools.groupby(batch, key=lambda item: item[0]):
                results += await op(conn, [arg for _, arg in items])
            await asyncio.get_running_loop().run_in_executor(commits, conn.execute, "COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                wrapped = _wrap(exc)
                self.failing = wrapped if isinstance(wrapped, StoreUnavailable) else None
                return [wrapped]
            return [(await self._write([item]))[0] for item in batch]
        self.failing = None
        self._checkpointer.written()
        return results


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
        self.path = _path(url)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.routes = tuple(routes)
        self._work = asyncio.Event()
        self._writer = _Writer(self.path, self._check_identity)
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._lost: str | None = None  # why the file is no longer ours
        self._reader: sqlite3.Connection | None = None
        self._lookups: sqlite3.Connection | None = None  # quick reads, on the event loop
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
                self._lookups = _connect(self.path)
                self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
                if self.path != ":memory:":
                    found = os.stat(self.path)
                    self._identity = (found.st_dev, found.st_ino)
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
            self._started = True

    def _check_identity(self) -> None:
        """Raise StoreUnavailable, from now on, once the database file was removed or replaced
        under us: what we would write could never be read back at the next start."""
        if self._lost is None and self._identity is not None:
            try:
                found = os.stat(self.path)
                if (found.st_dev, found.st_ino) != self._identity:
                    self._lost = f"{self.path} was replaced by another file"
            except FileNotFoundError:
                self._lost = f"{self.path} was removed"
            if self._lost is not None:
                log.error("store.lost", path=self.path, reason=self._lost)
        if self._lost is not None:
            raise StoreUnavailable(f"the database is gone: {self._lost}; restart once restored")

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        result: T = await self._writer.submit(_each, fn)
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._start()
        if self._lost is not None:
            self._check_identity()
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
            for conn in (self._reader, self._lookups):
                if conn is not None:
                    conn.close()
            self._reader = self._lookups = None
            self._started = False
        if self._reads is not None:
            self._reads.shutdown(wait=False)
            self._reads = None

    async def ping(self) -> None:
        """Raise StoreUnavailable while the file is gone or writes fail (a full disk); a
        failing store is probed with a write, so it passes again by itself once they work."""
        self._start()
        self._check_identity()
        if self._writer.failing is not None:
            await self._write(_probe)
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
        self,
        status: str | None,
        domain: str | None,
        limit: int,
        cursor: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
        search: str | None = None,
    ) -> Page:
        query, params = sql.jobs_query(status, domain, since, until, search, cursor, limit)
        return await self._read(lambda c: sql.list_jobs(c, query, params, limit))

    # -- events ------------------------------------------------------------------------------

    async def find_job(self, token_hash: str) -> str | None:
        # One indexed read, on the event loop: a thread hop would cost more than the read.
        self._start()
        assert self._lookups is not None
        try:
            row = self._lookups.execute(sql.JOB_BY_TOKEN, (token_hash,)).fetchone()
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        return None if row is None else str(row[0])

    async def record(self, incoming: Incoming) -> RecordResult:
        self._start()
        result: RecordResult = await self._writer.submit(self._record, incoming)
        if result.sinks:
            self._work.set()  # wake the dispatcher: new deliveries are due now
        return result

    async def _record(self, conn: sqlite3.Connection, batch: list[Incoming]) -> list[Any]:
        return await recording.record(_Rows(conn), batch, self.routes)

    async def get_event(self, event_id: str) -> Event | None:
        return await self._read(lambda c: sql.get_event(c, event_id))

    async def attempts_of(self, delivery_ids: Sequence[int]) -> list[DeliveryAttempt]:
        return await self._read(lambda c: sql.attempts_of(c, delivery_ids))

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
        self,
        state: str | None,
        sink: str | None,
        limit: int,
        cursor: str | None,
        event_id: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> Page:
        where = sql.deliveries_where(state, sink, event_id, since, until)
        return await self._read(lambda c: sql.list_deliveries(c, where, limit, cursor))

    async def count_requeueable(
        self,
        state: str | None,
        sink: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[int, int | None]:
        where = sql.deliveries_where(state, sink, None, since, until)
        return await self._read(lambda c: sql.count_requeueable(c, where))

    async def requeue_matching(
        self,
        now: float,
        upto: int,
        state: str | None,
        sink: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> int:
        where = sql.deliveries_where(state, sink, None, since, until)
        count = await self._write(lambda c: sql.requeue_where(c, now, where, upto))
        if count:
            self._work.set()
        return count

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

    async def overview(self, now: float) -> Overview:
        return await self._read(lambda c: sql.overview(c, now))

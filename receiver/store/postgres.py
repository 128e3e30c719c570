"""PostgreSQL backend (asyncpg): the scale-out store, shared by any number of processes.

The statements are those of `receiver.store.sql`, numbered for PostgreSQL, so both backends
run the same SQL and map rows with the same helpers. What differs is concurrency: several
processes write at once here, so

- `record()` is group commit, as on SQLite: the callbacks that arrive while a batch is being
  written go into the next one, one transaction of a few set-based statements (one array
  per column, `unnest`ed) whatever its size (`receiver.store.recording`). The batch's jobs
  are locked first, in id order, so one transaction at a time judges a job's callbacks, and
  the events' unique key decides what is a duplicate. Another replica writing a prediction
  of another job meanwhile is caught and the batch run again;
- `claim()` picks rows with `FOR UPDATE SKIP LOCKED` and returns them with their events in one
  statement: workers never wait for, nor share, a row;
- writes that make work due `NOTIFY receiver_outbox` inside their transaction (delivered on
  commit), and `wait_for_work()` listens on a connection of its own;
- `migrate()` runs under an advisory lock, so replicas starting together apply it once;
- `overdue_jobs()` answers only in the process holding the reconciler lock (a session advisory
  lock on a connection of its own, freed when that process dies): however many workers run,
  one polls VLM Run, so `reconcile_rate_per_minute` holds for the whole deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from receiver.errors import StoreError, StoreUnavailable
from receiver.models import (
    TERMINAL_RANK,
    TIMED_OUT,
    Claimed,
    DeliveryAttempt,
    Event,
    Incoming,
    Job,
    RecordResult,
    Route,
    status_rank,
)
from receiver.store import Attempt, Overview, Page, Stats, recording, sql
from receiver.store.groupcommit import GroupCommit
from receiver.store.recording import Row, Statement
from receiver.store.schema import MIGRATIONS, VERSION_TABLE, render

log = structlog.get_logger(__name__)

CHANNEL = "receiver_outbox"
_NOTIFY = f"NOTIFY {CHANNEL}"
_MIGRATE_LOCK = 0x7265636569766572  # "receiver": one key for every process sharing the database
_RECONCILE_LOCK = _MIGRATE_LOCK + 1
_PRUNE_BATCH = 1000
_RACES = 5  # times a batch is run again after losing a race, before it is an error
_CONNECT_TIMEOUT = 10.0

# Errors that mean "the database cannot be reached right now": callers answer 503 and retry.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
)

# Any other driver error (InternalClientError: e.g. the pool closed under a query).
_DRIVER: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)

# `?` -> `$n` once per distinct statement (the dynamic ones have a handful of shapes each).
_pg = functools.cache(sql.numbered)

_JOBS_BY_TOKEN = "SELECT token_hash, id FROM jobs WHERE token_hash = ANY($1::text[])"
_ATTEMPTS_OF = (  # through the index on attempts (delivery_id)
    f"SELECT {sql.ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = ANY($1::bigint[])"
    " ORDER BY delivery_id, attempt, id"
)
_APPLIED = "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)"
_PROBE = (
    "UPDATE schema_version SET applied_at = applied_at"
    " WHERE version = (SELECT max(version) FROM schema_version)"
)


class _Rows:
    """A connection as recording uses it: a batch's rows bound as one array per column."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def run(self, statement: Statement, rows: Sequence[Row]) -> list[Row]:
        columns = [list(column) for column in zip(*rows, strict=True)]
        found: list[Row] = await self._conn.fetch(statement.postgres, *columns)
        return found


@functools.cache
def _claim_query(skipped: int) -> str:
    """CLAIM (FOR UPDATE SKIP LOCKED), returning each row with its event, due first."""
    claim = sql.claim_query(["?"] * skipped, lock="FOR UPDATE SKIP LOCKED")
    delivery = sql.qualified("c", sql.DELIVERY_COLUMNS)
    event = sql.qualified("e", sql.EVENT_COLUMNS)
    return sql.numbered(
        f"WITH c AS ({claim}) SELECT {delivery}, {event}, c.lease"
        " FROM c JOIN events e ON e.id = c.event_id ORDER BY c.next_attempt_at, c.id"
    )


# Housekeeping in bounded batches, so no statement holds many row locks for long; rows locked
# by a worker right now are skipped and left for the next prune.
_PRUNE = (
    "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts WHERE started_at < $1"
    " LIMIT $2 FOR UPDATE SKIP LOCKED)",
    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = 'delivered'"
    " AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
    "UPDATE events SET body = NULL WHERE id IN (SELECT id FROM events WHERE received_at < $1"
    " AND body IS NOT NULL AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id ="
    " events.id AND d.state <> 'delivered') LIMIT $2 FOR UPDATE SKIP LOCKED)",
)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Driver errors as the project's own, chained (`from exc`)."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"postgres: {type(exc).__name__}: {exc}") from exc
    except _DRIVER as exc:
        raise StoreError(f"postgres: {type(exc).__name__}: {exc}") from exc


def _count(status: str) -> int:
    """Rows touched, from a command tag such as "UPDATE 3" or "INSERT 0 1"."""
    return int(status.rsplit(" ", 1)[-1])


def redacted(url: str) -> str:
    """The URL with its password masked: the only form of it fit for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore:
    """`postgresql://user:password@host:port/db` (or `postgres://`); connects on first use."""

    def __init__(self, url: str, routes: Sequence[Route] = (), pool_size: int = 10) -> None:
        self.url = url
        self.routes = tuple(routes)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._recorder: GroupCommit[Incoming, RecordResult] = GroupCommit(self._record_batch)
        self._finder: GroupCommit[str, str | None] = GroupCommit(self._find_jobs)
        self._listener: asyncpg.Connection | None = None
        self._work = asyncio.Event()
        self._leader: asyncpg.Connection | None = None  # holds the reconciler lock (or tries)
        self._leading = False

    def __repr__(self) -> str:
        return f"PostgresStore({redacted(self.url)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                with _translated():
                    self._pool = await asyncpg.create_pool(
                        self.url, min_size=1, max_size=self._pool_size, timeout=_CONNECT_TIMEOUT
                    )
            return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; each statement commits on its own."""
        pool = self._pool if self._pool is not None else await self._get_pool()
        with _translated():
            async with pool.acquire() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction (READ COMMITTED), committed on exit."""
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        await self._recorder.close()
        await self._finder.close()
        for conn in (self._listener, self._leader):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)
        self._listener = self._leader = None
        self._leading = False
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()  # a connection still checked out: do not hang on shutdown

    async def ping(self) -> None:
        """Raise unless the database takes a write: a real one (a row rewritten as it is), so
        a full disk or a read-only database fails readiness, which passes again by itself."""
        async with self._tx() as conn:
            await conn.execute(_PROBE)

    async def migrate(self) -> int:
        async with self._tx() as conn:
            # Held until commit: a second process waits here, then finds nothing left to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await conn.execute(render(VERSION_TABLE, "postgres"))
            current = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            )
            for version, name, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        await conn.execute(render(statement, "postgres"))
                    await conn.execute(_APPLIED, version, name, time.time())
                    current = version
            return current

    # -- jobs --------------------------------------------------------------------------------

    async def create_job(self, job: Job, token_hash: str) -> None:
        values = sql.metadata_values(job)
        async with self._tx() as conn:
            await conn.execute(_pg(sql.INSERT_JOB), *sql.job_params(job, token_hash))
            if values:
                await conn.executemany(
                    _pg(sql.INSERT_METADATA), [(v, job.created_at, job.id) for v in values]
                )

    async def set_submitted(
        self, job_id: str, prediction_id: str | None, status: str, error: str | None, now: float
    ) -> Job:
        params = sql.submitted_params(job_id, prediction_id, status, error, now)
        async with self._tx() as conn:
            row = await conn.fetchrow(_pg(sql.SET_SUBMITTED), *params)
            if prediction_id is not None:
                await conn.execute(
                    _pg(sql.INSERT_PREDICTION),
                    *(prediction_id, job_id, status, status_rank(status), now),
                )
        return sql.job_from_row(row)

    async def get_job(self, job_id: str) -> tuple[Job, list[Event]] | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(_pg(sql.SELECT_JOB), job_id)
            if row is None:
                return None
            events = await conn.fetch(_pg(sql.EVENTS_OF_JOB), job_id)
        return sql.job_from_row(row), [sql.event_from_row(e) for e in events]

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
        async with self._conn() as conn:
            return sql.jobs_page(await conn.fetch(_pg(query), *params), limit)

    # -- events ------------------------------------------------------------------------------

    async def find_job(self, token_hash: str) -> str | None:
        return await self._finder.submit(token_hash)

    async def _find_jobs(self, token_hashes: list[str]) -> list[str | BaseException | None]:
        """The lookups of concurrent callbacks, batched like their recording: one query."""
        async with self._conn() as conn:
            rows = await conn.fetch(_JOBS_BY_TOKEN, token_hashes)
        found = dict(rows)
        return [found.get(token_hash) for token_hash in token_hashes]

    async def record(self, incoming: Incoming) -> RecordResult:
        return await self._recorder.submit(incoming)

    async def _record_batch(self, batch: list[Incoming]) -> list[RecordResult | BaseException]:
        """One transaction for the batch; run again if it lost a race (`recording.LostRace`,
        or a deadlock PostgreSQL broke); if it fails otherwise, each callback alone, so only
        the one at fault fails."""
        for _ in range(_RACES):
            try:
                async with self._tx() as conn:
                    results = await recording.record(_Rows(conn), batch, self.routes)
                    if any(r.sinks for r in results):
                        await conn.execute(_NOTIFY)  # delivered on commit
                return list(results)
            except recording.LostRace:
                continue
            except StoreUnavailable:
                raise
            except StoreError as exc:
                if isinstance(exc.__cause__, asyncpg.exceptions.DeadlockDetectedError):
                    continue
                if len(batch) == 1:
                    raise
                return [(await self._alone(item)) for item in batch]
        raise StoreError(f"postgres: recording lost {_RACES} races in a row")

    async def _alone(self, item: Incoming) -> RecordResult | BaseException:
        try:
            [result] = await self._record_batch([item])
        except StoreError as exc:
            return exc
        return result

    async def get_event(self, event_id: str) -> Event | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(_pg(sql.SELECT_EVENT), event_id)
        return sql.event_from_row(row) if row else None

    async def attempts_of(self, delivery_ids: Sequence[int]) -> list[DeliveryAttempt]:
        async with self._conn() as conn:
            rows = await conn.fetch(_ATTEMPTS_OF, list(delivery_ids))
        return [DeliveryAttempt(*row) for row in rows]

    # -- outbox ------------------------------------------------------------------------------

    async def claim(
        self, now: float, limit: int, lease_seconds: float, skip_sinks: Sequence[str] = ()
    ) -> list[Claimed]:
        lease_until = now + lease_seconds
        async with self._conn() as conn:
            # One statement, committed on its own: the lease is the lock from here on.
            rows = await conn.fetch(
                _claim_query(len(skip_sinks)), lease_until, now, now, now, *skip_sinks, limit
            )
        return [sql.claimed_from_row(r, lease_until) for r in rows]

    async def finish(self, attempts: Sequence[Attempt], now: float) -> None:
        # In id order, so two transactions finishing overlapping rows cannot deadlock.
        ordered = sorted(attempts, key=lambda a: a.delivery_id)
        rows = [sql.finish_params(a, now) for a in ordered]
        tried = [r[0] for r, a in zip(rows, ordered, strict=True) if not a.released]
        async with self._tx() as conn:
            if tried:
                await conn.executemany(_pg(sql.INSERT_ATTEMPT), tried)
            await conn.executemany(_pg(sql.FINISH), [r[1] for r in rows])
            if any(a.state == "pending" for a in ordered):
                await conn.execute(_NOTIFY)

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
        query, params = sql.requeue_query(delivery_id, event_id, sink, since, only_dead)
        async with self._tx() as conn:
            count = _count(await conn.execute(_pg(query), now, now, *params))
            if event_id is not None and sink is not None and count == 0:
                # Replaying an event to a sink it never went to (a sink added later).
                status = await conn.execute(_pg(sql.INSERT_DELIVERY), event_id, sink, now, now, now)
                count = _count(status)
            if count:
                await conn.execute(_NOTIFY)
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
        query, params = sql.page_query(
            f"SELECT {sql.DELIVERY_COLUMNS} FROM deliveries", where, cursor, limit, int_ids=True
        )
        async with self._conn() as conn:
            return sql.deliveries_page(await conn.fetch(_pg(query), *params), limit)

    async def count_requeueable(
        self,
        state: str | None,
        sink: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[int, int | None]:
        query, params = sql.count_query(sql.deliveries_where(state, sink, None, since, until))
        async with self._conn() as conn:
            count, newest = await conn.fetchrow(_pg(query), *params)
        return int(count), newest

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
        query, params = sql.requeue_where_query(where, upto)
        async with self._tx() as conn:
            count = _count(await conn.execute(_pg(query), now, now, *params))
            if count:
                await conn.execute(_NOTIFY)
        return count

    async def wait_for_work(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        await self._listen(min(timeout, _CONNECT_TIMEOUT))
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), remaining)
        self._work.clear()

    async def _listen(self, connect_timeout: float) -> None:
        """Keep a LISTEN connection open; without one, waits simply run to their timeout."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self.url, timeout=max(connect_timeout, 0.1))
            await conn.add_listener(CHANNEL, self._on_notify)
        except (*_UNAVAILABLE, *_DRIVER) as exc:
            log.warning("store.listen_failed", error=f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.terminate()
            return
        self._listener = conn
        # Whatever was notified while nobody listened is lost: have the caller look once.
        self._work.set()

    def _on_notify(self, *_: Any) -> None:
        self._work.set()

    # -- reconciliation and upkeep -----------------------------------------------------------

    async def overdue_jobs(self, now: float, limit: int) -> list[Job]:
        """The overdue jobs, in the one process that holds the reconciler lock; [] elsewhere."""
        if not await self._lead():
            return []
        async with self._conn() as conn:
            return [sql.job_from_row(r) for r in await conn.fetch(_pg(sql.OVERDUE), now, limit)]

    async def _lead(self) -> bool:
        """Hold the reconciler lock, or try to take it (once per call).

        A session advisory lock on a connection of its own: it lasts as long as that
        connection, so a process that dies (or loses the connection) hands the role on to the
        next process that asks. Re-checked on every call with one round trip.
        """
        conn = self._leader
        try:
            if conn is None or conn.is_closed():
                self._leading = False
                conn = self._leader = await asyncpg.connect(self.url, timeout=_CONNECT_TIMEOUT)
            if self._leading:
                await conn.fetchval("SELECT 1")  # still connected: still holding it
            else:
                self._leading = bool(
                    await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RECONCILE_LOCK)
                )
                if self._leading:
                    log.info("reconcile.leading")
        except (*_UNAVAILABLE, *_DRIVER) as exc:
            if conn is not None:
                conn.terminate()
            self._leader, self._leading = None, False
            raise StoreUnavailable(f"postgres: {type(exc).__name__}: {exc}") from exc
        return self._leading

    async def schedule_poll(self, job_id: str, next_poll_at: float | None, attempts: int) -> None:
        async with self._conn() as conn:
            await conn.execute(_pg(sql.SCHEDULE_POLL), next_poll_at, attempts, job_id)

    async def poll_outstanding(self, now: float) -> int:
        async with self._conn() as conn:
            status: str = await conn.execute(_pg(sql.POLL_OUTSTANDING), now, now)
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE <n>"

    async def time_out(self, job_id: str, now: float) -> None:
        async with self._conn() as conn:
            await conn.execute(_pg(sql.TIME_OUT), TIMED_OUT, now, job_id)

    async def prune(self, before: float) -> int:
        """Forget what is old and settled: attempts, delivered rows, and payloads nobody awaits."""
        total = 0
        async with self._conn() as conn:
            for statement in _PRUNE:  # in this order: deleted deliveries free their payloads
                while True:
                    n = _count(await conn.execute(statement, before, _PRUNE_BATCH))
                    total += n
                    if n < _PRUNE_BATCH:
                        break
        return total

    async def stats(self, now: float) -> Stats:
        async with self._conn() as conn:
            row = await conn.fetchrow(_pg(sql.STATS), now, now, TERMINAL_RANK)
        due, oldest, dead, outstanding = row
        return Stats(due, max(0.0, now - oldest) if oldest else 0.0, dead, outstanding)

    async def overview(self, now: float) -> Overview:
        since = sql.window_start(now)
        async with self._conn() as conn:
            deliveries = await conn.fetch(sql.DELIVERIES_BY_SINK)
            oldest: dict[str, float] = {}
            for sink, state in sql.waiting(deliveries, ("pending", "leased")):
                at = await conn.fetchval(_pg(sql.OLDEST_IN_STATE), sink, state)
                oldest[sink] = min(at, oldest.get(sink, at))
            errors: dict[str, tuple[str, float]] = {}
            for sink in sorted({sink for sink, _ in sql.waiting(deliveries, ("pending", "dead"))}):
                row = await conn.fetchrow(_pg(sql.LAST_ERROR), sink)
                if row is not None:
                    errors[sink] = (row[0], row[1])
            minute = functools.partial(sql.per_minute, dialect="postgres")
            return sql.overview_of(
                await conn.fetch(sql.JOBS_BY_STATUS),
                deliveries,
                oldest,
                errors,
                await conn.fetchrow(_pg(sql.RECONCILER_QUEUE), now),
                await conn.fetch(
                    _pg(minute(sql.CALLBACKS_PER_MINUTE, column="received_at")),
                    since,
                    sql.first_event_id(since),
                    since,
                ),
                await conn.fetch(
                    _pg(minute(sql.DELIVERED_PER_MINUTE, column="next_attempt_at")), since, since
                ),
                await conn.fetch(
                    _pg(minute(sql.FAILED_PER_MINUTE, column="a.started_at")), since, since, since
                ),
                await conn.fetch(_pg(sql.LATENCIES), since, sql.LATENCY_SAMPLE),
                since,
            )

"""The store: the single source of truth for jobs, events and the outbox.

Backends are picked by URL scheme (`sqlite:`, `postgresql:`) and import their driver lazily.
Each backend translates driver errors into `StoreError` / `StoreUnavailable` (chained).
The protocol is split by concern so each part stays small; a backend implements all of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from receiver.models import (
    Claimed,
    Delivery,
    DeliveryAttempt,
    Event,
    Incoming,
    Job,
    RecordResult,
    Route,
)


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a listing, newest first; `next_cursor` fetches the next page (None: last)."""

    items: list[Job] | list[Delivery]
    next_cursor: str | None


@dataclass(slots=True)
class Attempt:
    """The outcome of one delivery attempt, as the dispatcher reports it."""

    delivery_id: int
    attempt: int
    started_at: float
    duration_ms: float
    status_code: int | None
    error: str | None
    snippet: str
    # What happens next: "delivered", "pending" (retry at next_attempt_at) or "dead".
    state: str
    next_attempt_at: float
    lease_until: float  # from the claim: when it runs out
    lease: int  # from the claim: a lost lease (the row claimed again since) makes this a no-op
    released: bool = False  # handed back unsent (sink paused): no attempt is counted


@dataclass(frozen=True, slots=True)
class Stats:
    """Gauges for /metrics, read in one round trip."""

    outbox_due: int
    oldest_due_age: float
    dead: int
    jobs_outstanding: int


class JobStore(Protocol):
    async def create_job(self, job: Job, token_hash: str) -> None: ...
    async def find_job(self, token_hash: str) -> str | None:
        """The id of the job whose callback token has this hash (None: no such job)."""
        ...

    async def set_submitted(
        self, job_id: str, prediction_id: str | None, status: str, error: str | None, now: float
    ) -> Job: ...
    async def get_job(self, job_id: str) -> tuple[Job, list[Event]] | None: ...
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
        """Jobs newest first (created_at, then id): of `status` and `domain`, created in
        [since, until), and with `search` as their id, a prediction's id or a top-level string
        value of their metadata."""
        ...


class EventStore(Protocol):
    async def record(self, incoming: Incoming) -> RecordResult:
        """Record a verified prediction state, idempotently, with its outbox rows, in one commit."""
        ...

    async def get_event(self, event_id: str) -> Event | None: ...
    async def attempts_of(self, delivery_ids: Sequence[int]) -> list[DeliveryAttempt]:
        """Every recorded send of these deliveries, by delivery, then in order."""
        ...


class Outbox(Protocol):
    async def claim(
        self, now: float, limit: int, lease_seconds: float, skip_sinks: Sequence[str] = ()
    ) -> list[Claimed]:
        """Lease due deliveries, except those of `skip_sinks` (paused or disabled sinks)."""
        ...

    async def finish(self, attempts: Sequence[Attempt], now: float) -> None:
        """Record attempts and move each delivery on, in one commit."""
        ...

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
        """Put deliveries back in the queue (replay); returns how many."""
        ...

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
        """Deliveries newest first (created_at, then id). `state` is a stored state or
        `retrying` (pending after a failed attempt); [since, until) bounds created_at."""
        ...

    async def count_requeueable(
        self,
        state: str | None,
        sink: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[int, int | None]:
        """How many deliveries `requeue_matching` with these filters would requeue (all but
        those in flight), and the newest one's id (None: none)."""
        ...

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
        """Requeue every delivery these filters match, up to id `upto` (what was counted), in
        one statement; returns how many."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when new deliveries may be due, or after `timeout` seconds."""
        ...


class Reconciliation(Protocol):
    async def overdue_jobs(self, now: float, limit: int) -> list[Job]: ...
    async def schedule_poll(
        self, job_id: str, next_poll_at: float | None, attempts: int
    ) -> None: ...
    async def poll_outstanding(self, now: float) -> int:
        """Make every unfinished job that has a prediction due now; returns how many."""
        ...

    async def time_out(self, job_id: str, now: float) -> None: ...
    async def prune(self, before: float) -> int: ...


class Store(JobStore, EventStore, Outbox, Reconciliation, Protocol):
    routes: Sequence[Route]

    async def stats(self, now: float) -> Stats:
        """Gauges for /metrics."""
        ...

    async def migrate(self) -> int:
        """Bring the schema up to date; returns the version now in force."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None: ...

    async def overview(self, now: float) -> Overview:
        """What the dashboard's overview shows from the store: counts and the last hour."""
        ...


_BACKENDS = {
    "sqlite": "receiver.store.sqlite:SqliteStore",
    "postgresql": "receiver.store.postgres:PostgresStore",
    "postgres": "receiver.store.postgres:PostgresStore",
}


def open_store(url: str, routes: Sequence[Route] = ()) -> Store:
    """The backend for `url` (not yet connected: call `migrate()` or any method)."""
    scheme = url.split(":", 1)[0]
    module_name, _, class_name = _BACKENDS[scheme].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    store: Store = cls(url, routes)
    return store


# -- the dashboard's overview --------------------------------------------------------------------

OVERVIEW_MINUTES = 60  # the activity charts' window


@dataclass(slots=True)
class Minute:
    """One minute of the last hour: callbacks recorded, deliveries delivered, sends failed."""

    start: float
    callbacks: int = 0
    delivered: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Overview:
    """The store's part of the dashboard's overview (the breakers and the reconciler's pause
    live in the process that runs the dispatcher, not here)."""

    jobs: dict[str, int]  # status -> jobs
    deliveries: dict[str, dict[str, int]]  # sink -> state -> deliveries
    oldest_undelivered: dict[str, float]  # sink -> created_at of its oldest pending or leased row
    last_errors: dict[str, tuple[str, float]]  # sink -> (error, when), on a row pending or dead
    overdue: int  # outstanding jobs whose poll is due now
    next_poll_at: float | None  # the earliest poll scheduled
    minutes: list[Minute]  # the last OVERVIEW_MINUTES, oldest first
    latencies: list[tuple[float, float]]  # (delivered at, seconds since the event was recorded)

"""Recording callbacks: the rule that says what a prediction state is (new, duplicate, stale,
conflict) and the statements that write a batch of them. Both backends run this code.

A batch is every callback that arrived while the previous batch was being committed (group
commit). It is recorded in one transaction, top to bottom:

1. read the batch's jobs (locked on PostgreSQL, so one transaction at a time decides for a
   job) and the predictions already recorded;
2. judge each callback in the order it arrived (`judge`, the only place the rule lives), so a
   batch ends exactly as if its callbacks had come one by one;
3. insert the accepted events: the unique (prediction_id, status) key drops what is already
   recorded, and that is what makes a callback a duplicate;
4. from the events that went in: move the predictions and jobs forward, queue one delivery
   per sink that wants the event.

Each statement takes the batch's rows as a table named `batch`; how they get there differs by
backend (`Statement.sqlite`, `Statement.postgres`), what is done with them does not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from receiver.errors import StoreError
from receiver.models import (
    TERMINAL_RANK,
    Incoming,
    Outcome,
    RecordResult,
    Route,
    new_id,
    status_rank,
)

Row = Sequence[Any]


@dataclass(frozen=True)
class Statement:
    """SQL over a table `batch` of rows with `columns` (PostgreSQL types beside them).

    `{lock}` in the text is `FOR UPDATE` on PostgreSQL and nothing on SQLite, whose single
    writer needs no row locks.
    """

    columns: tuple[tuple[str, str], ...]
    text: str

    def _head(self) -> str:
        return f"WITH batch({', '.join(name for name, _ in self.columns)}) AS"

    @functools.cache  # noqa: B019 (a handful of module-level statements, kept for good)
    def sqlite(self, rows: int) -> str:
        """The rows bound as `VALUES (?, ...), ...`: one statement per batch size."""
        one = f"({', '.join('?' * len(self.columns))})"
        values = ", ".join([one] * rows)
        return f"{self._head()} (VALUES {values})\n{self.text.format(lock='')}"

    @functools.cached_property
    def postgres(self) -> str:
        """The rows bound as one array per column, `unnest`ed: one statement whatever the size."""
        arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(self.columns, 1))
        text = self.text.format(lock="FOR UPDATE")
        return f"{self._head()} (SELECT * FROM unnest({arrays}))\n{text}"


# Jobs are found by id or by callback token hash (the two never look alike), each through its
# index: an OR of the two would have PostgreSQL scan every job.
JOBS = Statement(
    (("key", "text"),),
    """SELECT id, domain, status_rank, prediction_id, token_hash FROM jobs
    WHERE id IN (SELECT key FROM batch UNION ALL
        SELECT j.id FROM batch JOIN jobs j ON j.token_hash = batch.key)
    ORDER BY id {lock}""",
)
PREDICTIONS = Statement(
    (("id", "text"),),
    "SELECT id, job_id, status, status_rank FROM predictions WHERE id IN (SELECT id FROM batch)",
)
EVENTS = Statement(
    (
        ("id", "text"),
        ("job_id", "text"),
        ("prediction_id", "text"),
        ("status", "text"),
        ("domain", "text"),
        ("source", "text"),
        ("verification", "text"),
        ("received_at", "float8"),
        ("body", "bytea"),
    ),
    # `WHERE true`: SQLite's parser needs it between a SELECT and ON CONFLICT.
    """INSERT INTO events (id, job_id, prediction_id, status, domain, source, verification,
        received_at, body)
    SELECT * FROM batch WHERE true
    ON CONFLICT DO NOTHING
    RETURNING id""",
)
# Every row here changes its prediction (`judge` saw to it); one that does not is another
# job's prediction written since it was read, and the batch is run again (`LostRace`).
ADVANCE_PREDICTIONS = Statement(
    (
        ("id", "text"),
        ("job_id", "text"),
        ("status", "text"),
        ("status_rank", "int4"),
        ("updated_at", "float8"),
    ),
    """INSERT INTO predictions (id, job_id, status, status_rank, updated_at)
    SELECT * FROM batch WHERE true
    ON CONFLICT (id) DO UPDATE SET status = excluded.status,
        status_rank = excluded.status_rank, updated_at = excluded.updated_at
    WHERE predictions.job_id = excluded.job_id
      AND predictions.status_rank < excluded.status_rank
    RETURNING id""",
)
ADVANCE_JOBS = Statement(
    (
        ("id", "text"),
        ("status", "text"),
        ("status_rank", "int4"),
        ("updated_at", "float8"),
        ("prediction_id", "text"),
    ),
    f"""UPDATE jobs SET status = batch.status, status_rank = batch.status_rank,
        updated_at = batch.updated_at,
        prediction_id = COALESCE(jobs.prediction_id, batch.prediction_id),
        completed_at = CASE WHEN batch.status_rank >= {TERMINAL_RANK} THEN batch.updated_at
            ELSE jobs.completed_at END,
        next_poll_at = CASE WHEN batch.status_rank >= {TERMINAL_RANK} THEN NULL
            ELSE jobs.next_poll_at END
    FROM batch WHERE jobs.id = batch.id AND jobs.status_rank < batch.status_rank""",
)
QUEUE_DELIVERIES = Statement(
    (("event_id", "text"), ("sink", "text"), ("due", "float8")),
    """INSERT INTO deliveries (event_id, sink, state, attempts, next_attempt_at, created_at,
        updated_at)
    SELECT event_id, sink, 'pending', 0, due, due, due FROM batch WHERE true
    ON CONFLICT (event_id, sink) DO NOTHING""",
)


class Rows(Protocol):
    """A connection inside the recording transaction, as recording uses it."""

    async def run(self, statement: Statement, rows: Sequence[Row]) -> list[Row]:
        """Run `statement` over `rows` (not empty); the rows it returns."""
        ...


class LostRace(StoreError):
    """Another transaction wrote one of the batch's predictions after it was read (only on
    PostgreSQL, by a callback of another job): the batch must be run again."""


@dataclass(slots=True)
class Known:
    """A prediction as recorded: whose it is and how far along."""

    job_id: str
    status: str
    rank: int


@dataclass(slots=True)
class _Job:
    id: str
    domain: str
    rank: int
    prediction_id: str | None


def judge(incoming: Incoming, job_id: str, known: Known | None) -> Outcome | None:
    """Why a state is refused, given its prediction as recorded (None: not refused; the unique
    key then tells a new state from a duplicate).

    A prediction belongs to one job; its status only moves to a higher rank, so a different
    status at or below the recorded one is stale.
    """
    if known is None:
        return None
    if known.job_id != job_id:
        return Outcome.CONFLICT
    if incoming.status != known.status and status_rank(incoming.status) <= known.rank:
        return Outcome.STALE
    return None


async def record(
    db: Rows, batch: Sequence[Incoming], routes: Sequence[Route]
) -> list[RecordResult]:
    """Record `batch` inside the caller's transaction; one result per callback, in order."""
    # 1. What is known.
    keys = {i.job_id or i.token_hash for i in batch} - {None}
    jobs: dict[str, _Job] = {}
    for id_, domain, rank, prediction_id, token_hash in await db.run(JOBS, [(k,) for k in keys]):
        jobs[id_] = jobs[token_hash] = _Job(id_, domain, rank, prediction_id)
    predictions = {
        id_: Known(job_id, status, rank)
        for id_, job_id, status, rank in await db.run(
            PREDICTIONS, [(p,) for p in {i.prediction_id for i in batch}]
        )
    }

    # 2. The rule, callback by callback.
    results: list[RecordResult | None] = [None] * len(batch)
    accepted: dict[tuple[str, str], int] = {}
    events: list[Row] = []
    moves_prediction: list[bool] = []  # per event: a new prediction, or a higher status
    for pos, item in enumerate(batch):
        job = jobs.get(item.job_id or item.token_hash or "")
        if job is None:
            results[pos] = RecordResult(Outcome.UNKNOWN_TOKEN)
            continue
        known = predictions.get(item.prediction_id)
        verdict = judge(item, job.id, known)
        if verdict is None and (item.prediction_id, item.status) in accepted:
            verdict = Outcome.DUPLICATE  # the same state twice in this batch
        if verdict is not None:
            results[pos] = RecordResult(verdict, job.id)
            continue
        rank = status_rank(item.status)
        moves_prediction.append(known is None or rank > known.rank)
        if moves_prediction[-1]:
            predictions[item.prediction_id] = Known(job.id, item.status, rank)
        accepted[item.prediction_id, item.status] = pos
        domain = item.domain if item.domain is not None else job.domain
        events.append(
            (
                new_id("evt"),
                job.id,
                item.prediction_id,
                item.status,
                domain,
                item.source,
                item.verification,
                item.received_at,
                item.body,
            )
        )

    # 3. The events; the unique key drops those already recorded.
    inserted = {row[0] for row in await db.run(EVENTS, events)} if events else set()

    # 4. What the new events move forward, in arrival order.
    advanced_predictions: dict[str, Row] = {}
    advanced_jobs: dict[str, Row] = {}
    deliveries: list[Row] = []
    for event, moves in zip(events, moves_prediction, strict=True):
        event_id, job_id, prediction_id, status, domain, *_, received_at, _body = event
        pos = accepted[prediction_id, status]
        if event_id not in inserted:
            if moves:  # the state is newer than its prediction as read: written meanwhile
                raise LostRace("a prediction was written by another transaction meanwhile")
            results[pos] = RecordResult(Outcome.DUPLICATE, job_id)
            continue
        rank = status_rank(status)
        if moves:
            advanced_predictions[prediction_id] = (
                prediction_id,
                job_id,
                status,
                rank,
                received_at,
            )
        job = jobs[job_id]
        if rank > job.rank:
            job.rank = rank
            job.prediction_id = job.prediction_id or prediction_id
            advanced_jobs[job_id] = (job_id, status, rank, received_at, job.prediction_id)
        sinks = tuple(r.sink for r in routes if r.matches(status, domain))
        deliveries += [(event_id, sink, received_at) for sink in sinks]
        results[pos] = RecordResult(Outcome.RECORDED, job_id, event_id, sinks)

    if advanced_predictions:
        rows = list(advanced_predictions.values())
        if len(await db.run(ADVANCE_PREDICTIONS, rows)) != len(rows):
            raise LostRace("a prediction was written by another job's callback meanwhile")
    if advanced_jobs:
        await db.run(ADVANCE_JOBS, list(advanced_jobs.values()))
    if deliveries:
        await db.run(QUEUE_DELIVERIES, deliveries)
    done = [r for r in results if r is not None]
    assert len(done) == len(batch), "every callback has its result"
    return done

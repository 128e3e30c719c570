"""The store's statements, and the operations built from them over a DB-API connection.

The statements are written once with `?` placeholders and portable SQL (ON CONFLICT,
RETURNING); the PostgreSQL backend numbers the placeholders (`numbered`) and runs the same
text, except where it must lock (claiming). Recording callbacks, shared by both backends too,
is `receiver.store.recording`. The functions below are the SQLite operations; each runs
inside the writer's (or the reader's) transaction and never commits on its own.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from receiver.models import (
    TERMINAL_RANK,
    TIMED_OUT,
    Claimed,
    Delivery,
    DeliveryAttempt,
    Event,
    Job,
    status_rank,
)
from receiver.store import OVERVIEW_MINUTES, Attempt, Minute, Overview, Page, Stats

JOB_COLUMNS = (
    "id, kind, domain, status, prediction_id, created_at, updated_at, request, error,"
    " completed_at, next_poll_at, poll_attempts"
)
EVENT_COLUMNS = "id, job_id, prediction_id, status, domain, source, verification, received_at, body"
DELIVERY_COLUMNS = (
    "id, event_id, sink, state, attempts, next_attempt_at, created_at, updated_at, last_error,"
    " delivered_at"
)

INSERT_JOB = f"""
INSERT INTO jobs ({JOB_COLUMNS}, token_hash, status_rank)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
SET_SUBMITTED = f"""
UPDATE jobs SET prediction_id = COALESCE(prediction_id, ?),
    status = CASE WHEN status_rank < ? THEN ? ELSE status END,
    status_rank = CASE WHEN status_rank < ? THEN ? ELSE status_rank END,
    error = ?, updated_at = ?,
    completed_at = CASE WHEN ? >= {TERMINAL_RANK} THEN COALESCE(completed_at, ?)
        ELSE completed_at END,
    next_poll_at = CASE WHEN ? >= {TERMINAL_RANK} THEN NULL ELSE next_poll_at END
WHERE id = ?
RETURNING {JOB_COLUMNS}
"""
INSERT_PREDICTION = """
INSERT INTO predictions (id, job_id, status, status_rank, updated_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
JOB_BY_TOKEN = "SELECT id FROM jobs WHERE token_hash = ?"
SELECT_EVENT = f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?"
EVENTS_OF_JOB = f"SELECT {EVENT_COLUMNS} FROM events WHERE job_id = ? ORDER BY received_at, id"
INSERT_DELIVERY = """
INSERT INTO deliveries (event_id, sink, state, attempts, next_attempt_at, created_at, updated_at)
VALUES (?, ?, 'pending', 0, ?, ?, ?)
ON CONFLICT (event_id, sink) DO NOTHING
"""
CLAIM = f"""
UPDATE deliveries SET state = 'leased', lease = lease + 1, lease_until = ?, updated_at = ?
WHERE id IN (
    SELECT id FROM deliveries
    WHERE ((state = 'pending' AND next_attempt_at <= ?) OR (state = 'leased' AND lease_until <= ?))
      {{skip}}
    ORDER BY next_attempt_at LIMIT ? {{lock}}
)
RETURNING {DELIVERY_COLUMNS}, lease
"""
ATTEMPT_COLUMNS = "delivery_id, attempt, started_at, duration_ms, status_code, error, snippet"
ATTEMPTS_OF = (  # through the index on attempts (delivery_id)
    f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id IN (SELECT value FROM json_each(?))"
    " ORDER BY delivery_id, attempt, id"
)
INSERT_ATTEMPT = """
INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, snippet)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
# The lease guard: a worker whose lease ran out (and whose row another worker claimed, which
# counted `lease` up) cannot overwrite the newer attempt's outcome.
FINISH = """
UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL,
    last_error = ?, updated_at = ?,
    delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END
WHERE id = ? AND state = 'leased' AND lease = ?
"""
SCHEDULE_POLL = "UPDATE jobs SET next_poll_at = ?, poll_attempts = ? WHERE id = ?"
# After downtime: every outstanding job with a prediction is due now (its callback may have
# come and gone while nobody listened); those without one can only wait for their callback.
POLL_OUTSTANDING = (
    "UPDATE jobs SET next_poll_at = ? WHERE next_poll_at > ? AND prediction_id IS NOT NULL"
    f" AND status_rank < {TERMINAL_RANK}"
)
TIME_OUT = (
    f"UPDATE jobs SET status = ?, status_rank = {TERMINAL_RANK}, updated_at = ?,"
    f" next_poll_at = NULL WHERE id = ? AND status_rank < {TERMINAL_RANK}"
)
STATS = """
SELECT
  (SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased') AND next_attempt_at <= ?),
  (SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?),
  (SELECT COUNT(*) FROM deliveries WHERE state = 'dead'),
  (SELECT COUNT(*) FROM jobs WHERE status_rank < ?)
"""

_PLACEHOLDER = re.compile(r"\?")


def qualified(alias: str, columns: str) -> str:
    """`a, b` as `t.a, t.b`."""
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def numbered(statement: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...`."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", statement)


def job_from_row(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        kind=row[1],
        domain=row[2],
        status=row[3],
        prediction_id=row[4],
        created_at=row[5],
        updated_at=row[6],
        request=orjson.loads(row[7]),
        error=row[8],
        completed_at=row[9],
        next_poll_at=row[10],
        poll_attempts=row[11],
    )


def event_from_row(row: Sequence[Any]) -> Event:
    i, job, pred, status, domain, source, verification, received_at, body = row
    return Event(
        i, job, pred, status, domain, source, verification, received_at, bytes(body or b"null")
    )


def delivery_from_row(row: Sequence[Any]) -> Delivery:
    return Delivery(*row)


DELIVERY_WIDTH = len(DELIVERY_COLUMNS.split(","))


def claimed_from_row(row: Sequence[Any], lease_until: float) -> Claimed:
    """A row of a delivery's columns, its event's, then the claim's lease token."""
    delivery, event = row[:DELIVERY_WIDTH], row[DELIVERY_WIDTH:-1]
    return Claimed(delivery_from_row(delivery), event_from_row(event), lease_until, row[-1])


def job_params(job: Job, token_hash: str) -> tuple[Any, ...]:
    return (
        job.id,
        job.kind,
        job.domain,
        job.status,
        job.prediction_id,
        job.created_at,
        job.updated_at,
        orjson.dumps(job.request).decode(),
        job.error,
        job.completed_at,
        job.next_poll_at,
        job.poll_attempts,
        token_hash,
        status_rank(job.status),
    )


def submitted_params(
    job_id: str, prediction_id: str | None, status: str, error: str | None, now: float
) -> tuple[Any, ...]:
    rank = status_rank(status)
    return (prediction_id, rank, status, rank, rank, error, now, rank, now, rank, job_id)


# -- SQLite operations (run by the writer or reader thread) ---------------------------------


def create_job(conn: sqlite3.Connection, job: Job, token_hash: str) -> None:
    conn.execute(INSERT_JOB, job_params(job, token_hash))
    values = metadata_values(job)
    if values:
        conn.executemany(INSERT_METADATA, [(v, job.created_at, job.id) for v in values])


def set_submitted(
    conn: sqlite3.Connection,
    job_id: str,
    prediction_id: str | None,
    status: str,
    error: str | None,
    now: float,
) -> Job:
    row = conn.execute(
        SET_SUBMITTED, submitted_params(job_id, prediction_id, status, error, now)
    ).fetchone()
    if prediction_id is not None:
        conn.execute(INSERT_PREDICTION, (prediction_id, job_id, status, status_rank(status), now))
    return job_from_row(row)


def get_job(conn: sqlite3.Connection, job_id: str) -> tuple[Job, list[Event]] | None:
    row = conn.execute(SELECT_JOB, (job_id,)).fetchone()
    if row is None:
        return None
    events = conn.execute(EVENTS_OF_JOB, (job_id,)).fetchall()
    return job_from_row(row), [event_from_row(e) for e in events]


# -- lists: newest first by (created_at, id), a page at a time -----------------------------------
#
# Every filter below is a range of one index read in (created_at, id) order (migration 3), so a
# page costs its own rows whatever the filters match; the cursor is the last row's
# `created_at:id` (the time as repr(), which reads back exactly).

_CURSOR_TIME = r"^[0-9]{1,20}(\.[0-9]{1,20})?(e[+-]?[0-9]{1,3})?:"
JOB_CURSOR_PATTERN = _CURSOR_TIME + r"[A-Za-z0-9_-]{1,100}$"
DELIVERY_CURSOR_PATTERN = _CURSOR_TIME + r"[0-9]{1,18}$"
# A job found by text: its id, one of its predictions' ids, or one of its metadata values
# (each top-level string value of the metadata it was submitted with: job_metadata).
JOB_BY_ID = "SELECT ? UNION SELECT job_id FROM predictions WHERE id = ?"
# Delivery states as filters: the stored states, and `retrying` (pending after at least one
# failed attempt). A bulk retry leaves `leased` rows alone: they are being sent right now.
RETRYING = "retrying"
REQUEUEABLE = "state IN ('dead', 'delivered', 'pending')"
# A delivery back in the queue: due now (both parameters: the time), attempts from zero.
REQUEUE = (
    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
)


@dataclass(frozen=True, slots=True)
class Where:
    """A list's WHERE clauses and their parameters, `?` placeholders."""

    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return f" WHERE {' AND '.join(self.clauses)}" if self.clauses else ""


def cursor_of(created_at: float, row_id: object) -> str:
    return f"{created_at!r}:{row_id}"


def parse_cursor(cursor: str) -> tuple[float, str]:
    created_at, _, row_id = cursor.partition(":")
    return float(created_at), row_id


def created_between(where: Where, since: float | None, until: float | None) -> None:
    if since is not None:
        where.add("created_at >= ?", since)
    if until is not None:
        where.add("created_at < ?", until)


def jobs_where(
    status: str | None,
    domain: str | None,
    since: float | None = None,
    until: float | None = None,
) -> Where:
    where = Where()
    if status is not None:
        where.add("status = ?", status)
    if domain is not None:
        where.add("domain = ?", domain)
    created_between(where, since, until)
    return where


def jobs_query(
    status: str | None,
    domain: str | None,
    since: float | None,
    until: float | None,
    search: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """A page of the jobs `where` matches and, with `search`, whose id, a prediction's id or
    a metadata value it is. The jobs by metadata come from job_metadata's key (value,
    created_at, job_id), already newest first, merged with the few found by id: a common
    value (half the jobs "prod") costs a page, not a sort of every match."""
    base = f"SELECT {JOB_COLUMNS} FROM jobs"
    where = jobs_where(status, domain, since, until)
    if search is None:
        return page_query(base, where, cursor, limit)
    by_id = Where(list(where.clauses), list(where.params))
    by_id.add(f"id IN ({JOB_BY_ID})", search, search)
    # By metadata: job_metadata's key read backwards from the cursor, each row's job checked
    # against the other filters, until a page is full (its own ORDER BY and LIMIT, so that
    # PostgreSQL too walks the index rather than joining every match and sorting).
    tagged = Where(["m.value = ?"], [search])
    if since is not None:
        tagged.add("m.created_at >= ?", since)
    if until is not None:
        tagged.add("m.created_at < ?", until)
    tagged.add(f"m.job_id NOT IN ({JOB_BY_ID})", search, search)  # each job once
    if cursor is not None:
        created_at, row_id = parse_cursor(cursor)
        by_id.add("(created_at, id) < (?, ?)", created_at, row_id)
        tagged.add("(m.created_at, m.job_id) < (?, ?)", created_at, row_id)
    for clause, value in (("j.status = ?", status), ("j.domain = ?", domain)):
        if value is not None:
            tagged.add(clause, value)
    columns = [c.strip() for c in JOB_COLUMNS.split(",")]
    renamed = {"id": "m.job_id", "created_at": "m.created_at"}
    from_metadata = ", ".join(renamed.get(c, f"j.{c}") for c in columns)
    query = (
        f"{base}{by_id.sql()} UNION ALL SELECT * FROM (SELECT {from_metadata}"
        f" FROM job_metadata m JOIN jobs j ON j.id = m.job_id{tagged.sql()}"
        " ORDER BY m.created_at DESC, m.job_id DESC LIMIT ?) AS by_metadata"
        " ORDER BY created_at DESC, id DESC LIMIT ?"
    )
    return query, [*by_id.params, *tagged.params, limit + 1, limit + 1]


def deliveries_where(
    state: str | None,
    sink: str | None,
    event_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Where:
    where = Where()
    if state == RETRYING:
        where.add("state = 'pending' AND attempts > 0")
    elif state is not None:
        where.add("state = ?", state)
    if sink is not None:
        where.add("sink = ?", sink)
    if event_id is not None:
        where.add("event_id = ?", event_id)
    created_between(where, since, until)
    return where


def page_query(
    base: str, where: Where, cursor: str | None, limit: int, int_ids: bool = False
) -> tuple[str, list[Any]]:
    """`base` filtered, newest first, after `cursor`, one row more than a page (to tell
    whether another page follows)."""
    where = Where(list(where.clauses), list(where.params))
    if cursor is not None:
        created_at, row_id = parse_cursor(cursor)
        where.add("(created_at, id) < (?, ?)", created_at, int(row_id) if int_ids else row_id)
    query = f"{base}{where.sql()} ORDER BY created_at DESC, id DESC LIMIT ?"
    return query, [*where.params, limit + 1]


def jobs_page(rows: Sequence[Sequence[Any]], limit: int) -> Page:
    jobs = [job_from_row(r) for r in rows]
    last = jobs[limit - 1] if len(jobs) > limit else None
    return Page(jobs[:limit], cursor_of(last.created_at, last.id) if last else None)


def deliveries_page(rows: Sequence[Sequence[Any]], limit: int) -> Page:
    items = [delivery_from_row(r) for r in rows]
    last = items[limit - 1] if len(items) > limit else None
    return Page(items[:limit], cursor_of(last.created_at, last.id) if last else None)


def count_query(where: Where) -> tuple[str, list[Any]]:
    """How many deliveries a bulk retry of `where` would requeue, and the newest one's id: the
    retry takes no row newer than what was counted."""
    where = Where([*where.clauses, REQUEUEABLE], list(where.params))
    return f"SELECT COUNT(*), MAX(id) FROM deliveries{where.sql()}", where.params


def requeue_where_query(where: Where, upto: int) -> tuple[str, list[Any]]:
    """Every delivery `where` matches, up to id `upto`, back in the queue: one statement."""
    where = Where([*where.clauses, REQUEUEABLE, "id <= ?"], [*where.params, upto])
    return f"{REQUEUE}{where.sql()}", where.params


def metadata_values(job: Job) -> list[str]:
    """The values a job can be found by: its metadata's top-level strings, once each."""
    metadata = job.request.get("metadata")
    if not isinstance(metadata, dict):
        return []
    return sorted({v for v in metadata.values() if isinstance(v, str) and v})


INSERT_METADATA = "INSERT INTO job_metadata (value, created_at, job_id) VALUES (?, ?, ?)"


def list_jobs(conn: sqlite3.Connection, query: str, params: Sequence[Any], limit: int) -> Page:
    return jobs_page(conn.execute(query, params).fetchall(), limit)


def attempts_of(conn: sqlite3.Connection, delivery_ids: Sequence[int]) -> list[DeliveryAttempt]:
    rows = conn.execute(ATTEMPTS_OF, (orjson.dumps(list(delivery_ids)),)).fetchall()
    return [DeliveryAttempt(*row) for row in rows]


def get_event(conn: sqlite3.Connection, event_id: str) -> Event | None:
    row = conn.execute(SELECT_EVENT, (event_id,)).fetchone()
    return event_from_row(row) if row else None


def claim_query(skip_sinks: Sequence[str], lock: str = "") -> str:
    """CLAIM without the rows of `skip_sinks`; `lock` locks the candidates (PostgreSQL:
    "FOR UPDATE SKIP LOCKED"; SQLite needs none, its writer is the only one)."""
    skip = f"AND sink NOT IN ({', '.join('?' * len(skip_sinks))})" if skip_sinks else ""
    return CLAIM.format(skip=skip, lock=lock)


# SQLite's claim and write-back take JSON arrays of rows: a few statements whatever the
# number of rows, where RETURNING or executemany step once per row, each step handing the GIL
# from the writer's thread to the event loop and back.
#
# The due pending rows and the expired leases each come from the index in order, with their
# own LIMIT. The single OR of CLAIM made SQLite sort every due row on every claim (5 ms at 40k
# due rows, against 0.06 ms this way). PostgreSQL keeps CLAIM: it must lock candidates
# (FOR UPDATE SKIP LOCKED), which a UNION cannot.
SQLITE_CLAIMABLE = """
SELECT json_group_array(id) FROM (
    SELECT id, next_attempt_at FROM (SELECT id, next_attempt_at FROM deliveries
        WHERE state = 'pending' AND next_attempt_at <= ? {skip} ORDER BY next_attempt_at LIMIT ?)
    UNION ALL
    SELECT id, next_attempt_at FROM (SELECT id, next_attempt_at FROM deliveries
        WHERE state = 'leased' AND lease_until <= ? {skip} ORDER BY next_attempt_at LIMIT ?)
    ORDER BY next_attempt_at LIMIT ?)
"""
SQLITE_LEASE = """
UPDATE deliveries SET state = 'leased', lease = lease + 1, lease_until = ?, updated_at = ?
WHERE id IN (SELECT value FROM json_each(?))
"""
# The claimed rows come back as rows, not JSON: bodies may be large (and JSON would round the
# times to 15 digits).
SQLITE_CLAIMED = f"""
SELECT {qualified("d", DELIVERY_COLUMNS)}, {qualified("e", EVENT_COLUMNS)}, d.lease
FROM json_each(?) c JOIN deliveries d ON d.id = c.value JOIN events e ON e.id = d.event_id
ORDER BY d.next_attempt_at, d.id
"""


def claim(
    conn: sqlite3.Connection,
    now: float,
    limit: int,
    lease_seconds: float,
    skip_sinks: Sequence[str],
) -> list[Claimed]:
    lease_until = now + lease_seconds
    skip = f"AND sink NOT IN ({', '.join('?' * len(skip_sinks))})" if skip_sinks else ""
    params = (now, *skip_sinks, limit, now, *skip_sinks, limit, limit)
    (ids,) = conn.execute(SQLITE_CLAIMABLE.format(skip=skip), params).fetchone()
    if ids == "[]":
        return []
    conn.execute(SQLITE_LEASE, (lease_until, now, ids))
    rows = conn.execute(SQLITE_CLAIMED, (ids,)).fetchall()
    return [claimed_from_row(row, lease_until) for row in rows]


def attempt_row(a: Attempt) -> tuple[Any, ...]:
    return (
        a.delivery_id,
        a.attempt,
        a.started_at,
        a.duration_ms,
        a.status_code,
        a.error,
        a.snippet,
    )


def finish_params(a: Attempt, now: float) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    update = (
        a.state,
        a.attempt,
        a.next_attempt_at,
        a.error,
        now,
        a.state,
        now,
        a.delivery_id,
        a.lease,
    )
    return attempt_row(a), update


SQLITE_INSERT_ATTEMPTS = """
INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, snippet)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6
FROM json_each(?)
"""
# FINISH for many rows, with its lease guard (the claim's token). `+state`: find each row by
# its id; the index on state would have SQLite walk every leased row for each one.
SQLITE_FINISH = """
UPDATE deliveries SET state = a.state, attempts = a.attempt, next_attempt_at = a.next_at,
    lease_until = NULL, last_error = a.error, updated_at = ?1,
    delivered_at = CASE WHEN a.state = 'delivered' THEN ?1 ELSE delivered_at END
FROM (SELECT value ->> 0 AS id, value ->> 1 AS state, value ->> 2 AS attempt,
    value ->> 3 AS next_at, value ->> 4 AS error, value ->> 5 AS lease
    FROM json_each(?2)) AS a
WHERE deliveries.id = a.id AND +deliveries.state = 'leased' AND deliveries.lease = a.lease
"""


def finish(conn: sqlite3.Connection, attempts: Sequence[Attempt], now: float) -> None:
    tried = [attempt_row(a) for a in attempts if not a.released]
    if tried:
        conn.execute(SQLITE_INSERT_ATTEMPTS, (orjson.dumps(tried),))
    outcomes = [
        (a.delivery_id, a.state, a.attempt, a.next_attempt_at, a.error, a.lease) for a in attempts
    ]
    conn.execute(SQLITE_FINISH, (now, orjson.dumps(outcomes)))


def requeue_query(
    delivery_id: int | None,
    event_id: str | None,
    sink: str | None,
    since: float | None,
    only_dead: bool,
) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for clause, value in (
        ("id = ?", delivery_id),
        ("event_id = ?", event_id),
        ("sink = ?", sink),
        ("updated_at >= ?", since),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    clauses.append("state = 'dead'" if only_dead else REQUEUEABLE)
    return f"{REQUEUE} WHERE {' AND '.join(clauses)}", params


def requeue(
    conn: sqlite3.Connection,
    now: float,
    delivery_id: int | None,
    event_id: str | None,
    sink: str | None,
    since: float | None,
    only_dead: bool,
) -> int:
    query, params = requeue_query(delivery_id, event_id, sink, since, only_dead)
    count = conn.execute(query, [now, now, *params]).rowcount
    if event_id is not None and sink is not None and count == 0:
        # Replaying an event to a sink it never went to (a sink added later).
        count = conn.execute(INSERT_DELIVERY, (event_id, sink, now, now, now)).rowcount
    return int(count)


def list_deliveries(conn: sqlite3.Connection, where: Where, limit: int, cursor: str | None) -> Page:
    query, params = page_query(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries", where, cursor, limit, int_ids=True
    )
    return deliveries_page(conn.execute(query, params).fetchall(), limit)


def count_requeueable(conn: sqlite3.Connection, where: Where) -> tuple[int, int | None]:
    query, params = count_query(where)
    count, newest = conn.execute(query, params).fetchone()
    return int(count), newest


def requeue_where(conn: sqlite3.Connection, now: float, where: Where, upto: int) -> int:
    query, params = requeue_where_query(where, upto)
    return int(conn.execute(query, [now, now, *params]).rowcount)


OVERDUE = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE next_poll_at IS NOT NULL AND next_poll_at <= ? AND status_rank < {TERMINAL_RANK}
ORDER BY next_poll_at LIMIT ?
"""


def overdue_jobs(conn: sqlite3.Connection, now: float, limit: int) -> list[Job]:
    return [job_from_row(r) for r in conn.execute(OVERDUE, (now, limit)).fetchall()]


def schedule_poll(
    conn: sqlite3.Connection, job_id: str, next_poll_at: float | None, attempts: int
) -> None:
    conn.execute(SCHEDULE_POLL, (next_poll_at, attempts, job_id))


def poll_outstanding(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute(POLL_OUTSTANDING, (now, now)).rowcount


def time_out(conn: sqlite3.Connection, job_id: str, now: float) -> None:
    conn.execute(TIME_OUT, (TIMED_OUT, now, job_id))


# Retention, one bounded batch per statement and call: the caller loops, committing between
# batches, so a large first prune never holds the writer (and the callbacks) for long.
PRUNE = (
    "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts WHERE started_at < ? LIMIT ?)",
    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = 'delivered'"
    " AND updated_at < ? LIMIT ?)",
    "UPDATE events SET body = NULL WHERE id IN (SELECT id FROM events WHERE received_at < ?"
    " AND body IS NOT NULL AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id ="
    " events.id AND d.state <> 'delivered') LIMIT ?)",
)


def prune_batch(conn: sqlite3.Connection, statement: str, before: float, limit: int) -> int:
    """Forget one batch of what is old and settled; returns how many rows it touched."""
    return int(conn.execute(statement, (before, limit)).rowcount)


def stats(conn: sqlite3.Connection, now: float) -> Stats:
    due, oldest, dead, outstanding = conn.execute(STATS, (now, now, TERMINAL_RANK)).fetchone()
    return Stats(due, max(0.0, now - oldest) if oldest else 0.0, dead, outstanding)


# -- the dashboard's overview (receiver/ui/overview.py) ---------------------------------------
# Counts over indexed columns: jobs (status, created_at, id) and deliveries (sink, state)
# answer from the index alone; the undelivered rows and the overdue jobs are few. The last
# hour's activity:
# - events by their id, which starts with the time it was made in ms (`models.new_id`): the
#   primary key bounds the scan to the hour (received_at has no index, to spare callbacks);
# - deliveries delivered, through (state, next_attempt_at): a delivered row keeps the time
#   its send ended as next_attempt_at (FINISH);
# - failed sends, through the deliveries sent in the hour (FAILED_PER_MINUTE).
# `{minute}` is the dialect's whole minutes since the window opened: SQLite's CAST truncates,
# PostgreSQL's rounds, so it is FLOOR there.
OVERVIEW_MINUTE = {
    "sqlite": "CAST(({column} - ?) / 60 AS INTEGER)",
    "postgres": "FLOOR(({column} - ?) / 60)",
}
JOBS_BY_STATUS = "SELECT status, COUNT(*) FROM jobs GROUP BY status"
DELIVERIES_BY_SINK = "SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state"
# Ids count up as rows are made: a sink's oldest row in a state is the one with the lowest id
# (SQLite reads it first from the index on (sink, state), whose entries it orders by rowid;
# PostgreSQL sorts the sink's rows in that state, the waiting ones, which are few).
# MIN(created_at) would read every waiting row on both.
OLDEST_IN_STATE = (
    "SELECT created_at FROM deliveries WHERE sink = ? AND state = ? ORDER BY id LIMIT 1"
)
# A delivered row's error is cleared, so a sink's last error is on a row still waiting or dead.
LAST_ERROR = (
    "SELECT last_error, updated_at FROM deliveries WHERE sink = ? AND state IN ('pending', 'dead')"
    " AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 1"
)
RECONCILER_QUEUE = (
    "SELECT COUNT(CASE WHEN next_poll_at <= ? THEN 1 END), MIN(next_poll_at) FROM jobs"
    f" WHERE next_poll_at IS NOT NULL AND status_rank < {TERMINAL_RANK}"
)
CALLBACKS_PER_MINUTE = (
    "SELECT {minute} AS m, COUNT(*) FROM events"
    " WHERE id >= ? AND received_at >= ? AND source = 'callback' GROUP BY m"
)
DELIVERED_PER_MINUTE = (
    "SELECT {minute} AS m, COUNT(*) FROM deliveries"
    " WHERE state = 'delivered' AND next_attempt_at >= ? GROUP BY m"
)
# Every write of a delivery leaves next_attempt_at at or after its last attempt (the end of a
# send, a retry's due time, a requeue's now), so a send of the last hour is an attempt of a
# row that (state, next_attempt_at) finds: the hour's rows and the retry backlog, not the
# whole attempt log (kept `retention_days`), which has no index by time.
FAILED_PER_MINUTE = """
SELECT {minute} AS m, COUNT(*) FROM deliveries d JOIN attempts a ON a.delivery_id = d.id
WHERE d.state IN ('pending', 'leased', 'delivered', 'dead') AND d.next_attempt_at >= ?
  AND a.started_at >= ? AND a.error IS NOT NULL
GROUP BY m
"""
LATENCIES = """
SELECT d.next_attempt_at, d.delivered_at - e.received_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.state = 'delivered' AND d.next_attempt_at >= ?
ORDER BY d.next_attempt_at DESC LIMIT ?
"""
LATENCY_SAMPLE = 5000  # the most recent deliveries of the hour the percentiles are taken over
EVENT_ID_SLACK = 600.0  # seconds: ids are made by the clock of the process that recorded them


def window_start(now: float) -> float:
    """Where the overview's hour starts: whole minutes, the last one the minute of `now`."""
    return (now // 60 - (OVERVIEW_MINUTES - 1)) * 60


def per_minute(statement: str, dialect: str, column: str) -> str:
    return statement.format(minute=OVERVIEW_MINUTE[dialect].format(column=column))


def first_event_id(since: float) -> str:
    """The smallest event id made at `since` less the slack (see `models.new_id`)."""
    return f"evt_{max(0, int((since - EVENT_ID_SLACK) * 1000)):012x}"


def waiting(deliveries: Sequence[Sequence[Any]], states: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (sink, state) pairs of DELIVERIES_BY_SINK's rows in `states`."""
    return sorted((sink, state) for sink, state, _ in deliveries if state in states)


def overview_of(
    jobs: Sequence[Sequence[Any]],
    deliveries: Sequence[Sequence[Any]],
    oldest: dict[str, float],
    last_errors: dict[str, tuple[str, float]],
    reconciler: Sequence[Any],
    callbacks: Sequence[Sequence[Any]],
    delivered: Sequence[Sequence[Any]],
    failed: Sequence[Sequence[Any]],
    latencies: Sequence[Sequence[Any]],
    since: float,
) -> Overview:
    """The overview from the rows of the statements above (the same for both backends)."""
    by_sink: dict[str, dict[str, int]] = {}
    for sink, state, count in deliveries:
        by_sink.setdefault(sink, {})[state] = int(count)
    minutes = [Minute(since + 60 * i) for i in range(OVERVIEW_MINUTES)]
    for rows, name in ((callbacks, "callbacks"), (delivered, "delivered"), (failed, "failed")):
        for index, count in rows:
            if 0 <= int(index) < OVERVIEW_MINUTES:
                setattr(minutes[int(index)], name, int(count))
    overdue, next_poll_at = reconciler
    return Overview(
        jobs={status: int(count) for status, count in jobs},
        deliveries=by_sink,
        oldest_undelivered=oldest,
        last_errors=last_errors,
        overdue=int(overdue or 0),
        next_poll_at=next_poll_at,
        minutes=minutes,
        latencies=[(float(at), float(seconds)) for at, seconds in latencies],
    )


def overview(conn: sqlite3.Connection, now: float) -> Overview:
    since = window_start(now)
    deliveries = conn.execute(DELIVERIES_BY_SINK).fetchall()
    oldest: dict[str, float] = {}
    for sink, state in waiting(deliveries, ("pending", "leased")):
        (at,) = conn.execute(OLDEST_IN_STATE, (sink, state)).fetchone()
        oldest[sink] = min(at, oldest.get(sink, at))
    errors: dict[str, tuple[str, float]] = {}
    for sink in sorted({sink for sink, _ in waiting(deliveries, ("pending", "dead"))}):
        row = conn.execute(LAST_ERROR, (sink,)).fetchone()
        if row is not None:
            errors[sink] = (row[0], row[1])
    return overview_of(
        conn.execute(JOBS_BY_STATUS).fetchall(),
        deliveries,
        oldest,
        errors,
        conn.execute(RECONCILER_QUEUE, (now,)).fetchone(),
        conn.execute(
            per_minute(CALLBACKS_PER_MINUTE, "sqlite", "received_at"),
            (since, first_event_id(since), since),
        ).fetchall(),
        conn.execute(
            per_minute(DELIVERED_PER_MINUTE, "sqlite", "next_attempt_at"), (since, since)
        ).fetchall(),
        conn.execute(
            per_minute(FAILED_PER_MINUTE, "sqlite", "a.started_at"), (since, since, since)
        ).fetchall(),
        conn.execute(LATENCIES, (since, LATENCY_SAMPLE)).fetchall(),
        since,
    )

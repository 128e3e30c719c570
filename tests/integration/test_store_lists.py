"""The store's lists as the dashboard and /v1 use them, on SQLite and PostgreSQL: filters by
time, by text (job id, prediction id, metadata value) and by delivery state, keyset pages, the
bulk retry by filter, and migration 3's backfill of job metadata."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from receiver.models import Job, Route, hash_token, new_callback_token, new_id
from receiver.store import Attempt, Store, open_store, sql
from receiver.store.schema import MIGRATIONS, VERSION_TABLE, render
from tests.integration.test_store import ROUTES, T0, callback


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated store, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'receiver.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    opened = open_store(url, ROUTES)
    await opened.migrate()
    yield opened
    await opened.close()


async def job_at(store: Store, created_at: float, **metadata: Any) -> Job:
    job = Job(
        id=new_id("job"),
        kind="document",
        domain="document.invoice",
        status="submitting",
        prediction_id=None,
        created_at=created_at,
        updated_at=created_at,
        request={"url": "https://e.test/a.pdf", "metadata": metadata},
    )
    await store.create_job(job, hash_token(new_callback_token()))
    return job


async def walk(store: Store, limit: int, **filters: Any) -> list[str]:
    """Every job the filters match, page by page."""
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_jobs(None, None, limit, cursor, **filters)
        seen += [j.id for j in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


async def test_jobs_come_newest_first_by_creation_time_and_page_once(store: Store) -> None:
    """Jobs list by creation time, newest first (ties by id), and the cursor walks each once,
    also where many share a creation time."""
    jobs = [await job_at(store, T0 + (i // 3)) for i in range(10)]
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    for limit in (1, 3, 4, 50):
        assert await walk(store, limit) == expected


async def test_jobs_in_a_time_range(store: Store) -> None:
    """since is included, until is not."""
    jobs = [await job_at(store, T0 + i * 60) for i in range(5)]
    found = await walk(store, 2, since=T0 + 60, until=T0 + 240)
    assert found == [jobs[3].id, jobs[2].id, jobs[1].id]


async def test_a_job_is_found_by_id_prediction_or_metadata_value(store: Store) -> None:
    """`search` matches the job's id, any of its predictions' ids, or a top-level string
    value of its metadata; nothing else (not a part of a value, not a number)."""
    mine = await job_at(store, T0, session_id="sess-1", team="blue", pages=3)
    other = await job_at(store, T0 + 1, team="blue")
    await store.set_submitted(mine.id, "pred_mine", "pending", None, T0 + 2)
    found = await store.record(callback(None, "pred_again", "completed", job_id=mine.id))
    assert found.event_id is not None

    async def search(text: str) -> list[str]:
        return await walk(store, 10, search=text)

    assert await search(mine.id) == [mine.id]
    assert await search("pred_mine") == [mine.id]
    assert await search("pred_again") == [mine.id]  # a second prediction of the same job
    assert await search("sess-1") == [mine.id]
    assert await search("blue") == [other.id, mine.id]
    assert await search("sess") == [] and await search("3") == []
    assert await walk(store, 10, search="blue", since=T0 + 1) == [other.id]


async def dead(store: Store, n: int, at: float) -> list[int]:
    """`n` events of new jobs whose deliveries (one per route) all died at `at`."""
    for i in range(n):
        job = await job_at(store, at)
        await store.record(callback(None, new_id("pred"), "completed", at=at + i, job_id=job.id))
    claimed = await store.claim(at + n, 1000, 30)
    await store.finish(
        [
            Attempt(
                c.delivery.id, 1, at, 1.0, 500, "HTTP 500", "", "dead", at, c.lease_until, c.lease
            )
            for c in claimed
        ],
        at + n,
    )
    return [c.delivery.id for c in claimed]


async def test_deliveries_by_state_sink_and_time(store: Store) -> None:
    """Deliveries filter by state (retrying: pending after a failed attempt), sink and
    creation time, newest first, and page by cursor."""
    await dead(store, 2, T0)
    job = await job_at(store, T0 + 100)
    await store.record(callback(None, "pred_retry", "completed", at=T0 + 100, job_id=job.id))
    claimed = await store.claim(T0 + 100, 1000, 30)
    await store.finish(
        [
            Attempt(
                c.delivery.id,
                1,
                T0,
                1.0,
                503,
                "HTTP 503",
                "",
                "pending",
                T0 + 200,
                c.lease_until,
                c.lease,
            )
            for c in claimed
        ],
        T0 + 100,
    )
    retrying = await store.list_deliveries("retrying", None, 100, None)
    assert {d.id for d in retrying.items} == {c.delivery.id for c in claimed}
    dead_all = await store.list_deliveries("dead", None, 100, None)
    assert len(dead_all.items) == 6  # 2 events x 3 sinks
    dead_late = await store.list_deliveries("dead", "all", 100, None, since=T0 + 1)
    assert [d.created_at for d in dead_late.items] == [T0 + 1]
    first = await store.list_deliveries("dead", None, 4, None)
    rest = await store.list_deliveries("dead", None, 4, first.next_cursor)
    ids = [d.id for d in first.items + rest.items]
    assert ids == [d.id for d in dead_all.items] and rest.next_cursor is None
    assert await store.list_deliveries("pending", None, 100, None, until=T0 + 100) is not None


async def test_a_bulk_retry_requeues_what_was_counted(store: Store) -> None:
    """count_requeueable says how many match and the newest id; requeue_matching requeues
    those and none newer, leaves in-flight rows alone, and makes them due now."""
    await dead(store, 3, T0)
    count, newest = await store.count_requeueable("dead", "all")
    assert count == 3 and newest is not None
    await dead(store, 1, T0 + 50)  # dies after the count
    assert await store.requeue_matching(T0 + 60, newest, "dead", "all") == 3
    pending = await store.list_deliveries("pending", "all", 100, None)
    assert len(pending.items) == 3 and all(d.attempts == 0 for d in pending.items)
    assert all(d.next_attempt_at == T0 + 60 for d in pending.items)
    assert (await store.count_requeueable("dead", "all"))[0] == 1
    # What a worker holds right now is not counted, nor requeued.
    leased = await store.claim(T0 + 60, 1, 30)
    assert len(leased) == 1
    count, newest = await store.count_requeueable(None, "all")
    assert count == 3 and newest is not None
    assert await store.requeue_matching(T0 + 61, newest, "leased", "all") == 0
    assert await store.requeue_matching(T0 + 61, newest, None, "all") == 3


def _old_schema_sqlite(path: Path) -> None:
    """A database at schema version 2, with a job that has metadata."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(render(VERSION_TABLE, "sqlite"))
    for version, name, statements in MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(render(statement, "sqlite"))
        conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (version, name, time.time()))
    conn.execute(
        "INSERT INTO jobs (id, token_hash, kind, domain, status, status_rank, request,"
        " created_at, updated_at) VALUES ('job_old', 'h', 'document', 'document.invoice',"
        " 'pending', 0, ?, 1, 1)",
        ('{"metadata": {"session_id": "sess-old", "n": 3, "x": {"y": "z"}}}',),
    )
    conn.close()


async def _old_schema_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(render(VERSION_TABLE, "postgres"))
        for version, name, statements in MIGRATIONS[:2]:
            for statement in statements:
                await conn.execute(render(statement, "postgres"))
            await conn.execute(
                "INSERT INTO schema_version VALUES ($1, $2, $3)", version, name, time.time()
            )
        await conn.execute(
            "INSERT INTO jobs (id, token_hash, kind, domain, status, status_rank, request,"
            " created_at, updated_at) VALUES ('job_old', 'h', 'document', 'document.invoice',"
            " 'pending', 0, $1, 1, 1)",
            '{"metadata": {"session_id": "sess-old", "n": 3, "x": {"y": "z"}}}',
        )
        await conn.execute(
            "INSERT INTO jobs (id, token_hash, kind, domain, status, status_rank, request,"
            " created_at, updated_at) VALUES ('job_bare', 'h2', 'document', 'document.invoice',"
            " 'pending', 0, '{\"metadata\": null}', 1, 1)"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_migration_3_makes_older_jobs_findable_by_metadata(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Jobs stored before migration 3 are found by their metadata's string values after it."""
    if kind == "sqlite":
        path = tmp_path / "old.db"
        _old_schema_sqlite(path)
        url = f"sqlite:///{path}"
    else:
        url = str(request.getfixturevalue("postgres_empty_url"))
        await _old_schema_postgres(url)
    store = open_store(url, [Route("all")])
    try:
        assert await store.migrate() >= 3
        assert [
            j.id for j in (await store.list_jobs(None, None, 5, None, search="sess-old")).items
        ] == ["job_old"]
        assert (await store.list_jobs(None, None, 5, None, search="z")).items == []
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "jobs_created"),
        ({"status": "failed"}, "jobs_status_created"),
        ({"domain": "document.resume"}, "jobs_domain_created"),
        ({"since": T0, "until": T0 + 3600}, "jobs_created"),
        ({"status": "failed", "since": T0}, "jobs_status_created"),
    ],
)
def test_each_jobs_list_reads_one_index_in_order(
    filters: dict[str, Any], index: str, tmp_path: Path
) -> None:
    """SQLite's plan for each jobs list walks one index in the list's order: no sort, no
    read of the whole table."""
    conn = _migrated_sqlite(tmp_path)
    args = {"status": None, "domain": None, "since": None, "until": None} | filters
    for cursor in (None, f"{T0!r}:job_x"):
        query, params = sql.jobs_query(**args, search=None, cursor=cursor, limit=50)
        plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {query}", params))
        assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize(
    ("state", "sink", "times", "index"),
    [
        (None, None, (None, None), "deliveries_created"),
        ("dead", None, (None, None), "deliveries_state_created"),
        ("dead", "erp", (None, None), "deliveries_"),
        ("retrying", None, (T0, None), "deliveries_state_created"),
        (None, "erp", (None, None), "deliveries_sink_created"),
        (None, "erp", (T0, T0 + 60), "deliveries_sink_created"),
        (None, None, (T0, T0 + 60), "deliveries_created"),
    ],
)
def test_each_deliveries_list_reads_one_index_in_order(
    state: str | None, sink: str | None, times: tuple[Any, Any], index: str, tmp_path: Path
) -> None:
    """The same for the deliveries lists (by state and sink together, SQLite picks one of the
    two and checks the other on its rows: either is in order)."""
    conn = _migrated_sqlite(tmp_path)
    where = sql.deliveries_where(state, sink, None, *times)
    base = f"SELECT {sql.DELIVERY_COLUMNS} FROM deliveries"
    query, params = sql.page_query(base, where, "1.0:5", 50, int_ids=True)
    plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {query}", params))
    assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan


def test_a_search_by_metadata_reads_its_key_in_order(tmp_path: Path) -> None:
    """A search reads job_metadata's key in the list's order; only the few jobs found by id
    or prediction id are sorted."""
    conn = _migrated_sqlite(tmp_path)
    query, params = sql.jobs_query("failed", None, T0, None, "prod", f"{T0!r}:job_x", 50)
    plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {query}", params)]
    assert any(step.startswith("SEARCH m USING PRIMARY KEY (value=?") for step in plan), plan
    assert not any(re.fullmatch(r"SCAN (jobs|j|m|job_metadata)", step) for step in plan), plan


def _migrated_sqlite(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "plans.db", isolation_level=None)
    for _, _, statements in MIGRATIONS:
        for statement in statements:
            conn.execute(render(statement, "sqlite"))
    return conn

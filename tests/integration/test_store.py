"""One contract for every store backend, run against SQLite and a real PostgreSQL.

Each test gets a fresh database (a temporary SQLite file, or a copy of the migrated PostgreSQL
template) and drives the store only through the `Store` protocol, with the clock passed in.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import asyncpg
import orjson
import pytest

from receiver.errors import StoreError, StoreUnavailable
from receiver.models import (
    TIMED_OUT,
    Delivery,
    Incoming,
    Job,
    Outcome,
    Route,
    hash_token,
    new_callback_token,
    new_id,
)
from receiver.store import Attempt, Store, open_store
from receiver.store.schema import latest_version

T0 = 1_700_000_000.0
LEASE = 30.0
ROUTES = (
    Route("all"),
    Route("finished", statuses=("completed", "failed")),
    Route("invoices", domains=("document.invoice",)),
)
MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'receiver.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[MakeStore]:
    """Open (and migrate) stores on this test's database; all are closed afterwards."""
    opened: list[Store] = []

    async def make(routes: Sequence[Route] = ROUTES, url: str = store_url) -> Store:
        store = open_store(url, routes)
        opened.append(store)
        await store.migrate()
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


async def new_job(
    store: Store,
    domain: str = "document.invoice",
    now: float = T0,
    next_poll_at: float | None = None,
) -> tuple[Job, str]:
    """A submitted job and the hash of its callback token."""
    job = Job(
        id=new_id("job"),
        kind="document",
        domain=domain,
        status="submitting",
        prediction_id=None,
        created_at=now,
        updated_at=now,
        request={"url": "https://example.com/invoice.pdf"},
        next_poll_at=next_poll_at,
    )
    token_hash = hash_token(new_callback_token())
    await store.create_job(job, token_hash)
    return job, token_hash


def callback(
    token_hash: str | None,
    prediction_id: str,
    status: str,
    at: float = T0 + 1,
    job_id: str | None = None,
) -> Incoming:
    """A verified prediction state: from a callback (by token) or, with `job_id`, a poll."""
    return Incoming(
        token_hash=token_hash,
        job_id=job_id,
        prediction_id=prediction_id,
        status=status,
        domain=None,
        source="callback" if token_hash else "poll",
        verification="hmac-sha256" if token_hash else "poll",
        body=orjson.dumps({"id": prediction_id, "status": status, "response": {"total": 42}}),
        received_at=at,
    )


async def all_deliveries(store: Store) -> list[Delivery]:
    page = await store.list_deliveries(None, None, 1000, None)
    return sorted(cast(list[Delivery], page.items), key=lambda d: d.id)


def attempt(delivery_id: int, lease: int, state: str, at: float = T0 + 2) -> Attempt:
    return Attempt(
        delivery_id=delivery_id,
        attempt=1,
        started_at=at,
        duration_ms=12.5,
        status_code=200 if state == "delivered" else 500,
        error=None if state == "delivered" else "HTTP 500",
        snippet="ok",
        state=state,
        next_attempt_at=at + 60 if state == "pending" else at,
        lease_until=at + LEASE,
        lease=lease,
    )


# -- recording ----------------------------------------------------------------------------------


async def test_record_then_exact_duplicate(store: Store) -> None:
    """A callback is recorded once; the same callback again is a duplicate with no new event."""
    job, token = await new_job(store)
    first = await store.record(callback(token, "pred_1", "completed"))
    assert first.outcome is Outcome.RECORDED
    assert first.job_id == job.id and first.event_id is not None
    again = await store.record(callback(token, "pred_1", "completed", at=T0 + 5))
    assert again.outcome is Outcome.DUPLICATE
    assert again.job_id == job.id and again.event_id is None and again.sinks == ()
    found = await store.get_job(job.id)
    assert found is not None
    assert [e.id for e in found[1]] == [first.event_id]
    assert len(await all_deliveries(store)) == len(first.sinks)


async def test_stale_running_after_completed_changes_nothing(store: Store) -> None:
    """A `running` arriving after `completed` is stale: job stays completed, no event, no row."""
    job, token = await new_job(store)
    done = await store.record(callback(token, "pred_1", "completed", at=T0 + 10))
    rows = len(await all_deliveries(store))
    late = await store.record(callback(token, "pred_1", "running", at=T0 + 11))
    assert late.outcome is Outcome.STALE
    found = await store.get_job(job.id)
    assert found is not None
    assert found[0].status == "completed" and found[0].completed_at == T0 + 10
    assert [e.id for e in found[1]] == [done.event_id]
    assert len(await all_deliveries(store)) == rows


async def test_status_only_moves_forward(store: Store) -> None:
    """Each new status is an event and advances the job; nothing, not even submit, moves it back."""
    job, token = await new_job(store, next_poll_at=T0 + 600)
    await store.set_submitted(job.id, "pred_1", "pending", None, T0)
    for i, status in enumerate(["pending", "running", "completed"]):
        result = await store.record(callback(token, "pred_1", status, at=T0 + 1 + i))
        assert result.outcome is Outcome.RECORDED
    assert (await store.record(callback(token, "pred_1", "pending", at=T0 + 9))).outcome is (
        Outcome.STALE
    )
    late_submit = await store.set_submitted(job.id, "pred_1", "pending", None, T0 + 10)
    assert late_submit.status == "completed"
    found = await store.get_job(job.id)
    assert found is not None
    assert [e.status for e in found[1]] == ["pending", "running", "completed"]
    assert found[0].status == "completed" and found[0].completed_at == T0 + 3
    assert found[0].next_poll_at is None  # a finished job is not polled


async def test_second_prediction_on_same_token_is_linked_to_the_job(store: Store) -> None:
    """A second prediction id for one job is recorded and linked; the job keeps its first id."""
    job, token = await new_job(store)
    submitted = await store.set_submitted(job.id, "pred_1", "pending", None, T0)
    assert submitted.prediction_id == "pred_1" and submitted.status == "pending"
    first = await store.record(callback(token, "pred_1", "running", at=T0 + 1))
    second = await store.record(callback(token, "pred_2", "completed", at=T0 + 2))
    assert first.outcome is second.outcome is Outcome.RECORDED
    assert second.job_id == job.id
    found = await store.get_job(job.id)
    assert found is not None
    assert [(e.prediction_id, e.job_id) for e in found[1]] == [
        ("pred_1", job.id),
        ("pred_2", job.id),
    ]
    assert found[0].prediction_id == "pred_1" and found[0].status == "completed"


async def test_prediction_of_another_job_is_a_conflict(store: Store) -> None:
    """A prediction id already linked to one job is refused on another job's token."""
    _, token_a = await new_job(store)
    job_b, token_b = await new_job(store)
    await store.record(callback(token_a, "pred_1", "running"))
    result = await store.record(callback(token_b, "pred_1", "completed"))
    assert result.outcome is Outcome.CONFLICT
    found = await store.get_job(job_b.id)
    assert found is not None and found[1] == []


async def test_poll_finds_its_job_by_id(store: Store) -> None:
    """A polled state (no token, the job id instead) is recorded like a callback."""
    job, _ = await new_job(store)
    result = await store.record(callback(None, "pred_1", "completed", job_id=job.id))
    assert result.outcome is Outcome.RECORDED and result.job_id == job.id
    assert result.event_id is not None
    event = await store.get_event(result.event_id)
    assert event is not None and event.source == "poll" and event.job_id == job.id


async def test_unknown_token_stores_nothing(store: Store) -> None:
    """A callback whose token matches no job is UNKNOWN_TOKEN and leaves no trace."""
    job, _ = await new_job(store)
    result = await store.record(callback(hash_token("forged"), "pred_1", "completed"))
    assert result.outcome is Outcome.UNKNOWN_TOKEN and result.job_id is None
    found = await store.get_job(job.id)
    assert found is not None and found[1] == [] and found[0].status == "submitting"
    assert await all_deliveries(store) == []
    stats = await store.stats(T0 + 10)
    assert stats.outbox_due == 0 and stats.jobs_outstanding == 1


async def test_event_keeps_the_body_as_received(store: Store) -> None:
    """The stored event carries the exact bytes that arrived, and the job's domain."""
    _, token = await new_job(store)
    body = (
        '{"id": "pred_1",\n "status":"completed", "response": {"name": "Zoë \\"Ω\\" 😀 \\u0001"}} '
    )
    incoming = dataclasses.replace(callback(token, "pred_1", "completed"), body=body.encode())
    result = await store.record(incoming)
    assert result.event_id is not None
    event = await store.get_event(result.event_id)
    assert event is not None
    assert event.body == incoming.body and event.domain == "document.invoice"
    assert await store.get_event("evt_missing") is None


# -- outbox -------------------------------------------------------------------------------------


async def test_outbox_rows_only_for_matching_routes(store: Store) -> None:
    """Each recorded event gets one pending row per sink whose statuses/domains filters match."""
    _, invoice = await new_job(store, domain="document.invoice")
    _, resume = await new_job(store, domain="document.resume")
    running = await store.record(callback(invoice, "pred_1", "running", at=T0 + 1))
    done = await store.record(callback(invoice, "pred_1", "completed", at=T0 + 2))
    other = await store.record(callback(resume, "pred_2", "completed", at=T0 + 3))
    assert set(running.sinks) == {"all", "invoices"}
    assert set(done.sinks) == {"all", "finished", "invoices"}
    assert set(other.sinks) == {"all", "finished"}
    rows = await all_deliveries(store)
    assert sorted((d.event_id, d.sink) for d in rows) == sorted(
        (r.event_id, s) for r in (running, done, other) for s in r.sinks
    )
    assert all(d.state == "pending" and d.attempts == 0 for d in rows)
    due = {d.event_id: d.next_attempt_at for d in rows}
    assert done.event_id is not None and due[done.event_id] == T0 + 2  # due at once


async def test_no_routes_no_outbox_rows(make_store: MakeStore) -> None:
    """With no sink configured, an event is recorded but nothing is queued."""
    store = await make_store(routes=())
    _, token = await new_job(store)
    result = await store.record(callback(token, "pred_1", "completed"))
    assert result.outcome is Outcome.RECORDED and result.sinks == ()
    assert await all_deliveries(store) == []


async def test_claim_leases_rows_until_the_lease_runs_out(store: Store) -> None:
    """Claimed rows are not claimed again until their lease expires; paused sinks are skipped."""
    _, token = await new_job(store)
    result = await store.record(callback(token, "pred_1", "completed", at=T0))
    claimed = await store.claim(T0 + 1, 10, LEASE, skip_sinks=["finished"])
    assert sorted(c.delivery.sink for c in claimed) == ["all", "invoices"]
    assert all(c.event.id == result.event_id and c.lease_until == T0 + 1 + LEASE for c in claimed)
    assert claimed[0].event.body == callback(token, "pred_1", "completed").body
    assert [c.delivery.sink for c in await store.claim(T0 + 2, 10, LEASE)] == ["finished"]
    assert await store.claim(T0 + LEASE, 10, LEASE) == []  # leased until T0 + 1 + LEASE
    again = await store.claim(T0 + 2 + LEASE, 10, LEASE)
    assert {c.delivery.sink for c in again} == {"all", "finished", "invoices"}


async def test_claim_respects_the_limit_and_due_time(store: Store) -> None:
    """A claim returns at most `limit` rows, and never a row whose retry is not yet due."""
    for _ in range(3):
        _, token = await new_job(store)
        await store.record(callback(token, new_id("pred"), "completed", at=T0))
    assert await store.claim(T0 - 1, 100, LEASE) == []
    assert len(await store.claim(T0, 4, LEASE)) == 4
    assert len(await store.claim(T0, 100, LEASE)) == 5


async def test_finish_moves_rows_on_and_a_stale_lease_is_a_no_op(store: Store) -> None:
    """Finishing with a lease that ran out (and was re-claimed) changes nothing; the holder wins."""
    _, token = await new_job(store)
    await store.record(callback(token, "pred_1", "completed", at=T0))
    first = {c.delivery.sink: c for c in await store.claim(T0, 10, LEASE)}
    second = {c.delivery.sink: c for c in await store.claim(T0 + LEASE, 10, LEASE)}
    old, new = first["all"], second["all"]
    assert new.lease == old.lease + 1  # each claim counts the token up
    await store.finish([attempt(old.delivery.id, old.lease, "delivered")], T0 + LEASE + 1)
    rows = {d.sink: d for d in await all_deliveries(store)}
    assert rows["all"].state == "leased" and rows["all"].attempts == 0
    await store.finish(
        [
            attempt(new.delivery.id, new.lease, "delivered"),
            attempt(second["finished"].delivery.id, second["finished"].lease, "pending"),
        ],
        T0 + LEASE + 2,
    )
    rows = {d.sink: d for d in await all_deliveries(store)}
    assert rows["all"].state == "delivered" and rows["all"].delivered_at == T0 + LEASE + 2
    retry = rows["finished"]
    assert retry.state == "pending" and retry.attempts == 1 and retry.last_error == "HTTP 500"
    assert [c.delivery.sink for c in await store.claim(retry.next_attempt_at - 1, 10, LEASE)] == [
        "invoices"
    ]
    assert [c.delivery.sink for c in await store.claim(retry.next_attempt_at, 10, LEASE)] == [
        "finished"
    ]


async def test_attempts_of_lists_each_send_in_order(store: Store) -> None:
    """The sends recorded for deliveries come back by delivery and in order, with what the
    sink answered; a delivery never sent has none."""
    _, token = await new_job(store)
    await store.record(callback(token, "pred_1", "completed", at=T0))
    claimed = {c.delivery.sink: c for c in await store.claim(T0, 10, LEASE)}
    first = claimed["all"]
    await store.finish([attempt(first.delivery.id, first.lease, "pending")], T0 + 1)
    due = await store.claim(T0 + 100, 10, LEASE)  # the retry, and the leases run out
    again = next(c for c in due if c.delivery.id == first.delivery.id)
    await store.finish(
        [attempt(again.delivery.id, again.lease, "delivered", at=T0 + 101)], T0 + 102
    )
    sends = await store.attempts_of([first.delivery.id, claimed["finished"].delivery.id])
    assert [(a.delivery_id, a.started_at, a.status_code, a.snippet) for a in sends] == [
        (first.delivery.id, T0 + 2, 500, "ok"),
        (first.delivery.id, T0 + 101, 200, "ok"),
    ]
    assert await store.attempts_of([]) == []


async def test_requeue_dead_rows(store: Store) -> None:
    """Dead rows are replayed by requeue (attempts reset); delivered ones only when asked."""
    _, token = await new_job(store)
    await store.record(callback(token, "pred_1", "completed", at=T0))
    claimed = {c.delivery.sink: c for c in await store.claim(T0, 10, LEASE)}
    dead, ok = claimed["all"], claimed["finished"]
    await store.finish(
        [
            attempt(dead.delivery.id, dead.lease, "dead"),
            attempt(ok.delivery.id, ok.lease, "delivered"),
        ],
        T0 + 1,
    )
    assert (await store.stats(T0 + 1)).dead == 1
    assert await store.requeue(T0 + 5) == 1
    replayed = await store.claim(T0 + 5, 10, LEASE)
    assert [(c.delivery.sink, c.delivery.attempts) for c in replayed] == [("all", 0)]
    assert await store.requeue(T0 + 6, delivery_id=ok.delivery.id) == 0  # not dead
    assert await store.requeue(T0 + 6, delivery_id=ok.delivery.id, only_dead=False) == 1
    assert [c.delivery.sink for c in await store.claim(T0 + 6, 10, LEASE)] == ["finished"]


async def test_requeue_event_to_a_new_sink(store: Store) -> None:
    """Replaying an event to a sink it never went to queues a new row for that sink."""
    _, token = await new_job(store)
    result = await store.record(callback(token, "pred_1", "completed", at=T0))
    assert result.event_id is not None
    count = await store.requeue(T0 + 1, event_id=result.event_id, sink="archive", only_dead=False)
    assert count == 1
    rows = [d for d in await all_deliveries(store) if d.sink == "archive"]
    assert [(d.event_id, d.state, d.next_attempt_at) for d in rows] == [
        (result.event_id, "pending", T0 + 1)
    ]


async def test_wait_for_work_wakes_when_work_is_recorded(
    backend: str, make_store: MakeStore
) -> None:
    """A waiting worker wakes soon after a callback queues rows (on PostgreSQL, another store's)."""
    worker = await make_store()
    web = await make_store() if backend == "postgres" else worker
    await worker.wait_for_work(0)  # connect whatever the backend listens with
    _, token = await new_job(web)
    waiting = asyncio.create_task(worker.wait_for_work(30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await web.record(callback(token, "pred_1", "completed"))
    await asyncio.wait_for(waiting, 5)


async def test_wait_for_work_times_out_when_idle(store: Store) -> None:
    """With nothing new, wait_for_work returns after its timeout."""
    await store.wait_for_work(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait_for_work(0.3)
    assert 0.25 <= loop.time() - started < 5


# -- listing ------------------------------------------------------------------------------------


async def test_list_jobs_filters_and_keyset_pagination(store: Store) -> None:
    """Pages come newest first and next_cursor walks every matching job exactly once."""
    jobs: list[Job] = []
    for i in range(7):
        job, token = await new_job(store, domain="document.invoice" if i % 2 else "document.resume")
        if i < 3:
            await store.record(callback(token, f"pred_{i}", "completed"))
        jobs.append(job)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_jobs(None, None, 3, cursor)
        assert len(page.items) <= 3
        seen += [str(j.id) for j in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted((j.id for j in jobs), reverse=True)
    invoices = await store.list_jobs(None, "document.invoice", 10, None)
    assert {j.id for j in invoices.items} == {j.id for j in jobs[1::2]}
    done = await store.list_jobs("completed", None, 10, None)
    assert {j.id for j in done.items} == {j.id for j in jobs[:3]}
    both = await store.list_jobs("completed", "document.resume", 1, None)
    assert [j.id for j in both.items] == [jobs[2].id]
    assert both.next_cursor is not None
    rest = await store.list_jobs("completed", "document.resume", 1, both.next_cursor)
    assert [j.id for j in rest.items] == [jobs[0].id] and rest.next_cursor is None


async def test_list_deliveries_filters_and_pages(store: Store) -> None:
    """Deliveries list by state and sink, newest first, with a cursor to the next page."""
    for _ in range(3):
        _, token = await new_job(store)
        await store.record(callback(token, new_id("pred"), "completed"))
    page = await store.list_deliveries("pending", "all", 2, None)
    assert len(page.items) == 2 and page.next_cursor is not None
    rest = await store.list_deliveries("pending", "all", 2, page.next_cursor)
    ids = [d.id for d in [*page.items, *rest.items]]
    assert len(rest.items) == 1 and rest.next_cursor is None
    assert ids == sorted(ids, reverse=True)
    assert all(d.sink == "all" for d in [*page.items, *rest.items])


# -- concurrency --------------------------------------------------------------------------------


async def test_concurrent_duplicates_are_recorded_once(store: Store) -> None:
    """The same callback from 20 tasks at once yields exactly one RECORDED and one event."""
    job, token = await new_job(store)
    incoming = callback(token, "pred_1", "completed")
    results = await asyncio.gather(*(store.record(incoming) for _ in range(20)))
    outcomes = sorted(r.outcome for r in results)
    assert outcomes.count(Outcome.RECORDED) == 1
    assert outcomes.count(Outcome.DUPLICATE) == 19
    found = await store.get_job(job.id)
    assert found is not None and len(found[1]) == 1
    assert len(await all_deliveries(store)) == len(ROUTES)


async def test_concurrent_callbacks_each_get_the_answer_they_would_get_alone(store: Store) -> None:
    """Callbacks recorded together (one group commit) are judged one by one: duplicates,
    stale states, conflicts, unknown tokens and two predictions of one job in the same batch."""
    job_a, a = await new_job(store)
    job_b, b = await new_job(store)
    job_c, c = await new_job(store)
    await store.record(callback(a, "pred_a", "completed", at=T0 + 1))
    batch = [
        callback(a, "pred_a", "running", at=T0 + 2),  # older than recorded
        callback(a, "pred_a", "completed", at=T0 + 2),  # already recorded
        callback(b, "pred_a", "completed", at=T0 + 2),  # job A's prediction
        callback(hash_token("forged"), "pred_x", "completed", at=T0 + 2),
        callback(b, "pred_b", "completed", at=T0 + 2),
        callback(c, "pred_c1", "completed", at=T0 + 2),
        callback(c, "pred_c2", "completed", at=T0 + 3),  # a second prediction of job C
        callback(None, "pred_b", "completed", at=T0 + 4, job_id=job_b.id),  # polled: same
    ]
    results = await asyncio.gather(*(store.record(i) for i in batch))
    outcomes = [r.outcome for r in results]
    assert outcomes[:4] == [
        Outcome.STALE,
        Outcome.DUPLICATE,
        Outcome.CONFLICT,
        Outcome.UNKNOWN_TOKEN,
    ]
    assert outcomes[5:7] == [Outcome.RECORDED, Outcome.RECORDED]
    # The callback and the poll of pred_b race: whichever comes first records it.
    assert sorted([outcomes[4], outcomes[7]]) == [Outcome.DUPLICATE, Outcome.RECORDED]
    for job, predictions in (
        (job_a, ["pred_a"]),
        (job_b, ["pred_b"]),
        (job_c, ["pred_c1", "pred_c2"]),
    ):
        found = await store.get_job(job.id)
        assert found is not None and found[0].status == "completed"
        assert sorted(e.prediction_id for e in found[1]) == predictions
    recorded = [r for r in results if r.outcome is Outcome.RECORDED]
    assert all(set(r.sinks) == {"all", "finished", "invoices"} for r in recorded)
    assert len(await all_deliveries(store)) == 3 * 4


async def test_concurrent_claims_never_return_the_same_row(
    backend: str, make_store: MakeStore
) -> None:
    """Workers claiming at once (two store instances on PostgreSQL) never share a row."""
    first = await make_store(routes=[Route("all")])
    second = await make_store(routes=[Route("all")]) if backend == "postgres" else first
    for _ in range(60):
        _, token = await new_job(first)
        await first.record(callback(token, new_id("pred"), "completed", at=T0))

    async def worker(store: Store) -> list[int]:
        got: list[int] = []
        while batch := await store.claim(T0 + 1, 7, LEASE):
            got += [c.delivery.id for c in batch]
        return got

    claims = await asyncio.gather(*(worker(s) for s in (first, second, first, second)))
    every = [i for ids in claims for i in ids]
    assert len(every) == len(set(every)) == 60


# -- schema -------------------------------------------------------------------------------------


async def test_migrate_twice_is_idempotent(store: Store) -> None:
    """Migrating an up-to-date database changes nothing and reports the latest version."""
    assert await store.migrate() == latest_version()
    assert await store.migrate() == latest_version()
    await store.ping()


async def test_concurrent_migrations_apply_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, make_store: MakeStore
) -> None:
    """Several processes migrating an empty database at once all succeed, at the latest version."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = str(request.getfixturevalue("postgres_empty_url"))
    stores = [open_store(url, ROUTES) for _ in range(3)]
    try:
        assert await asyncio.gather(*(s.migrate() for s in stores)) == [latest_version()] * 3
        _, token = await new_job(stores[0])
        assert (await stores[1].record(callback(token, "p", "completed"))).outcome is (
            Outcome.RECORDED
        )
    finally:
        for s in stores:
            await s.close()


async def test_sqlite_data_reaches_the_database_file_while_writes_go_on(tmp_path: Path) -> None:
    """SQLite: what is committed to the write-ahead log is copied into the database file in the
    background (not only when the service stops), so the log does not grow without end; and
    so again after the store was closed and used again."""
    path = tmp_path / "receiver.db"
    store = open_store(f"sqlite:///{path}", ROUTES)
    await store.migrate()
    big = orjson.dumps({"response": {"text": "x" * 2000}})
    try:
        for round_ in range(2):
            tokens = [(await new_job(store))[1] for _ in range(1000)]
            before = path.stat().st_size
            results = await asyncio.gather(
                *(
                    store.record(
                        dataclasses.replace(callback(t, f"p{round_}_{i}", "completed"), body=big)
                    )
                    for i, t in enumerate(tokens)
                )
            )
            assert {r.outcome for r in results} == {Outcome.RECORDED}
            for _ in range(100):  # within 5 s
                if path.stat().st_size > before + 1_000_000:
                    break
                await asyncio.sleep(0.05)
            assert path.stat().st_size > before + 1_000_000
            await store.close()  # and the next round uses it again
    finally:
        await store.close()


async def test_claimed_events_carry_the_recorded_times_exactly(store: Store) -> None:
    """What a sink is sent (the event's received time in the envelope) is what was recorded,
    to the last digit."""
    _, token = await new_job(store)
    at = T0 + 0.123456789
    result = await store.record(callback(token, "pred_1", "completed", at=at))
    assert result.event_id is not None
    claimed = await store.claim(T0 + 10, 10, LEASE)
    recorded = await store.get_event(result.event_id)
    assert recorded is not None and recorded.received_at == at
    assert {c.event.received_at for c in claimed} == {at}
    assert {c.event.envelope() for c in claimed} == {recorded.envelope()}


async def test_sqlite_large_batches_are_written_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a batch larger than one statement takes is written in pieces, each callback
    exactly as it came."""
    from receiver.store import sqlite

    monkeypatch.setattr(sqlite, "FILL_ROWS", 4)
    store = open_store(f"sqlite:///{tmp_path / 'receiver.db'}", ROUTES)
    await store.migrate()
    try:
        tokens = [(await new_job(store))[1] for _ in range(13)]
        incoming = [callback(t, f"pred_{i}", "completed") for i, t in enumerate(tokens)]
        incoming.append(callback(tokens[0], "pred_0", "running", at=T0 + 1))
        results = await asyncio.gather(*(store.record(i) for i in incoming))
        assert [r.outcome for r in results] == [Outcome.RECORDED] * 13 + [Outcome.STALE]
        for result, sent in zip(results[:13], incoming[:13], strict=True):
            assert result.event_id is not None
            event = await store.get_event(result.event_id)
            assert event is not None and event.body == sent.body
            assert event.prediction_id == sent.prediction_id
        assert len(await all_deliveries(store)) == 13 * len(ROUTES)
    finally:
        await store.close()


async def test_a_burst_of_one_predictions_states_is_judged_as_if_one_by_one(store: Store) -> None:
    """A prediction's pending, running and completed callbacks arriving together (with a
    retry of each and a late running) are recorded once each, in order; the job ends completed."""
    job, token = await new_job(store, next_poll_at=T0 + 600)
    burst = [
        callback(token, "pred_1", "pending", at=T0 + 1),
        callback(token, "pred_1", "running", at=T0 + 2),
        callback(token, "pred_1", "pending", at=T0 + 2.5),  # a retry, now behind
        callback(token, "pred_1", "completed", at=T0 + 3),
        callback(token, "pred_1", "completed", at=T0 + 4),  # a retry
        callback(token, "pred_1", "running", at=T0 + 5),  # late
    ]
    results = await asyncio.gather(*(store.record(i) for i in burst))
    assert [r.outcome for r in results] == [
        Outcome.RECORDED,
        Outcome.RECORDED,
        Outcome.STALE,
        Outcome.RECORDED,
        Outcome.DUPLICATE,
        Outcome.STALE,
    ]
    assert {r.job_id for r in results} == {job.id}
    found = await store.get_job(job.id)
    assert found is not None
    ended, events = found
    assert [e.status for e in events] == ["pending", "running", "completed"]
    assert (ended.status, ended.completed_at, ended.next_poll_at) == ("completed", T0 + 3, None)
    assert ended.prediction_id == "pred_1"
    sinks = {s for r in results for s in r.sinks}
    assert len(await all_deliveries(store)) == sum(len(r.sinks) for r in results) > len(sinks)
    # And once committed, each of them again is a duplicate or stale, never a new event.
    again = await asyncio.gather(*(store.record(i) for i in burst))
    assert {r.outcome for r in again} == {Outcome.DUPLICATE, Outcome.STALE}


async def test_a_burst_of_two_predictions_of_one_job_ends_as_if_one_by_one(store: Store) -> None:
    """Two predictions of one job in one batch: the job ends in the first of its highest
    statuses, at that state's time, and takes its prediction id from the first state that
    moved it."""
    job, token = await new_job(store)
    batch = [
        callback(token, "pred_a", "running", at=T0 + 1),
        callback(token, "pred_a", "completed", at=T0 + 2),
        callback(token, "pred_b", "failed", at=T0 + 3),
        callback(token, "pred_b", "running", at=T0 + 4),  # behind pred_b's failed
    ]
    results = await asyncio.gather(*(store.record(i) for i in batch))
    assert [r.outcome for r in results] == [Outcome.RECORDED] * 3 + [Outcome.STALE]
    found = await store.get_job(job.id)
    assert found is not None
    ended = found[0]
    assert (ended.status, ended.completed_at, ended.prediction_id) == (
        "completed",
        T0 + 2,
        "pred_a",
    )
    assert sorted((e.prediction_id, e.status) for e in found[1]) == [
        ("pred_a", "completed"),
        ("pred_a", "running"),
        ("pred_b", "failed"),
    ]


async def test_postgres_replicas_claiming_one_prediction_for_two_jobs_record_it_once(
    postgres_url: str,
) -> None:
    """Two replicas record the same prediction id for two different jobs at the same moment:
    one job gets it, the other hears "conflict", whichever batch commits first."""
    first, second = open_store(postgres_url, ROUTES), open_store(postgres_url, ROUTES)
    try:
        await _claim_one_prediction_twice(first, second)
    finally:
        await first.close()
        await second.close()


async def _claim_one_prediction_twice(first: Store, second: Store) -> None:
    for i in range(20):
        job_a, a = await new_job(first)
        job_b, b = await new_job(first)
        pred = f"pred_{i}"
        results = await asyncio.gather(
            first.record(callback(a, pred, "completed")),
            second.record(callback(b, pred, "completed")),
        )
        assert sorted(r.outcome for r in results) == [Outcome.CONFLICT, Outcome.RECORDED]
        owner = next(r.job_id for r in results if r.outcome is Outcome.RECORDED)
        for job in (job_a, job_b):
            found = await first.get_job(job.id)
            assert found is not None
            assert [e.prediction_id for e in found[1]] == ([pred] if job.id == owner else [])


async def test_find_job_knows_a_token_only_by_its_hash(store: Store) -> None:
    """A callback token's hash names its job; any other hash names none."""
    job, token = await new_job(store)
    assert await store.find_job(token) == job.id
    assert await store.find_job(hash_token("forged")) is None


async def test_close_answers_every_write_in_flight_and_the_store_opens_again(
    store: Store,
) -> None:
    """Closing while callbacks are being recorded leaves none waiting forever: each is recorded
    or refused with a store error (the route answers 503); the store opens again on next use."""
    tokens = [(await new_job(store))[1] for _ in range(200)]
    tasks = [
        asyncio.create_task(store.record(callback(t, f"pred_{i}", "completed")))
        for i, t in enumerate(tokens)
    ]
    await asyncio.sleep(0)
    await store.close()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(
        isinstance(r, StoreError) or r.outcome is Outcome.RECORDED  # type: ignore[union-attr]
        for r in results
    )
    job, token = await new_job(store)
    assert (await store.record(callback(token, "pred_new", "completed"))).outcome is (
        Outcome.RECORDED
    )
    found = await store.get_job(job.id)
    assert found is not None and [e.prediction_id for e in found[1]] == ["pred_new"]


# -- reconciliation and upkeep ------------------------------------------------------------------


async def test_overdue_jobs_schedule_poll_and_time_out(store: Store) -> None:
    """Jobs are overdue from next_poll_at on, until rescheduled, finished or timed out."""
    job, _ = await new_job(store, next_poll_at=T0 + 10)
    done, done_token = await new_job(store, next_poll_at=T0 + 10)
    await store.record(callback(done_token, "pred_done", "completed", at=T0 + 5))
    assert await store.overdue_jobs(T0 + 9, 10) == []
    assert [j.id for j in await store.overdue_jobs(T0 + 10, 10)] == [job.id]
    await store.schedule_poll(job.id, T0 + 100, 1)
    assert await store.overdue_jobs(T0 + 99, 10) == []
    overdue = await store.overdue_jobs(T0 + 100, 10)
    assert [(j.id, j.poll_attempts, j.next_poll_at) for j in overdue] == [(job.id, 1, T0 + 100)]
    await store.time_out(job.id, T0 + 200)
    await store.time_out(done.id, T0 + 200)  # a finished job is left as it is
    assert await store.overdue_jobs(T0 + 1000, 10) == []
    timed_out, finished = await store.get_job(job.id), await store.get_job(done.id)
    assert timed_out is not None and timed_out[0].status == TIMED_OUT
    assert finished is not None and finished[0].status == "completed"
    assert (await store.stats(T0 + 300)).jobs_outstanding == 0


async def test_a_late_result_replaces_timed_out(store: Store) -> None:
    """A job given up on still takes the result when it finally arrives: nothing is lost."""
    job, token = await new_job(store, next_poll_at=T0 + 10)
    await store.time_out(job.id, T0 + 200)
    late = await store.record(callback(token, "pred_late", "completed", at=T0 + 300))
    assert late.outcome is Outcome.RECORDED
    found = await store.get_job(job.id)
    assert found is not None and found[0].status == "completed"
    running = await store.record(callback(token, "pred_late2", "running", at=T0 + 301))
    assert running.outcome is Outcome.RECORDED
    found = await store.get_job(job.id)
    assert found is not None and found[0].status == "completed"


async def test_prune_forgets_settled_rows_but_keeps_awaited_payloads(store: Store) -> None:
    """Old delivered rows and attempts go, old payloads go unless a delivery still awaits them."""
    _, token = await new_job(store)
    settled = await store.record(callback(token, "pred_1", "completed", at=T0))
    _, token2 = await new_job(store)
    awaited = await store.record(callback(token2, "pred_2", "completed", at=T0))
    _, token3 = await new_job(store)
    recent = await store.record(callback(token3, "pred_3", "completed", at=T0 + 1000))
    assert settled.event_id and awaited.event_id and recent.event_id
    claimed = await store.claim(T0, 100, LEASE)
    await store.finish(
        [
            attempt(c.delivery.id, c.lease, "delivered", at=T0 + 1)
            for c in claimed
            if c.event.id == settled.event_id
        ],
        T0 + 1,
    )
    assert await store.prune(T0 + 500) == 3 + 3 + 1  # attempts, deliveries, one payload
    rows = await all_deliveries(store)
    assert {d.event_id for d in rows} == {awaited.event_id, recent.event_id}
    pruned = await store.get_event(settled.event_id)
    assert pruned is not None and orjson.loads(pruned.body) is None
    kept = await store.get_event(awaited.event_id)
    assert kept is not None and orjson.loads(kept.body)["id"] == "pred_2"
    assert await store.prune(T0 + 500) == 0


async def test_stats_counts(store: Store) -> None:
    """Stats count due rows (and the oldest one's age), dead rows and unfinished jobs."""
    _, token = await new_job(store)
    await new_job(store)
    await store.record(callback(token, "pred_1", "completed", at=T0))
    stats = await store.stats(T0 + 10)
    assert (stats.outbox_due, stats.dead, stats.jobs_outstanding) == (3, 0, 1)
    assert stats.oldest_due_age == pytest.approx(10.0)
    claimed = await store.claim(T0 + 10, 1, LEASE)
    await store.finish([attempt(claimed[0].delivery.id, claimed[0].lease, "dead")], T0 + 11)
    stats = await store.stats(T0 + 20)
    assert (stats.outbox_due, stats.dead) == (2, 1)
    assert (await store.stats(T0 - 1)).outbox_due == 0


async def test_a_failed_statement_is_a_store_error(store: Store) -> None:
    """A statement the database refuses raises StoreError (not StoreUnavailable), chained."""
    job, token = await new_job(store)
    with pytest.raises(StoreError) as caught:
        await store.create_job(job, token)
    assert not isinstance(caught.value, StoreUnavailable)
    assert caught.value.__cause__ is not None


# -- PostgreSQL specifics -----------------------------------------------------------------------


async def test_postgres_unreachable_is_store_unavailable() -> None:
    """A database that cannot be reached raises StoreUnavailable, chained, without the password."""
    store = open_store("postgresql://app:s3cret@127.0.0.1:1/receiver")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.ping()
        assert caught.value.__cause__ is not None
        assert "s3cret" not in str(caught.value) and "s3cret" not in repr(store)
    finally:
        await store.close()


async def test_postgres_listener_reconnects_after_a_drop(postgres_url: str) -> None:
    """When the LISTEN connection drops, waits fall back to their timeout, then it reconnects."""
    store = open_store(postgres_url, ROUTES)
    try:
        await store.wait_for_work(0)
        admin = await asyncpg.connect(postgres_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
        finally:
            await admin.close()
        assert killed == 1
        await asyncio.sleep(0.2)
        await asyncio.wait_for(store.wait_for_work(0.2), 5)  # no error, whatever the listener
        await store.wait_for_work(0)
        _, token = await new_job(store)
        waiting = asyncio.create_task(store.wait_for_work(30))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await store.record(callback(token, "pred_1", "completed"))
        await asyncio.wait_for(waiting, 5)
    finally:
        await store.close()

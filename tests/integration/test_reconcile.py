"""The reconciler against a real store (SQLite and PostgreSQL) and a scripted VLM Run API.

The API is an `httpx.MockTransport` answering from a script per prediction; time is a fake
clock whose `sleep` advances it, so backoff, spacing and deadlines are checked exactly and
without waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from receiver.config import Settings
from receiver.metrics import Metrics
from receiver.models import Incoming, Job, Outcome, Route, hash_token, new_callback_token, new_id
from receiver.reconcile import THROTTLED_PAUSE, Reconciler
from receiver.store import Attempt, Store, open_store
from receiver.vlmrun import VlmRunClient

T0 = 1_700_000_000.0
AFTER = 10.0  # reconcile_after
DEADLINE = 1000.0
ROUTES = (Route("all"),)


class FakeTime:
    """A clock that only moves when someone sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class ScriptedApi:
    """`GET /v1/predictions/{id}`: each prediction's answers in turn (the last one repeats);
    an answer is a status string, an HTTP error code, or an exception to raise."""

    time: FakeTime
    script: dict[str, list[str | int | Exception]] = field(default_factory=dict)
    calls: list[tuple[float, str]] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer test-key"
        pred_id = request.url.path.rsplit("/", 1)[1]
        self.calls.append((self.time.now, pred_id))
        answers = self.script.get(pred_id, [404])
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, int):
            return httpx.Response(answer, json={"error": {"message": f"scripted {answer}"}})
        body: dict[str, Any] = {"id": pred_id, "status": answer, "domain": "document.invoice"}
        if answer == "completed":
            body["response"] = {"invoice_id": "INV-1", "total_amount": 42}
        return httpx.Response(200, json=body)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'receiver.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    opened = open_store(url, ROUTES)
    await opened.migrate()
    yield opened
    await opened.close()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime(T0)


@pytest.fixture
def api(fake_time: FakeTime) -> ScriptedApi:
    return ScriptedApi(fake_time)


@pytest.fixture
async def make_reconciler(
    store: Store, api: ScriptedApi, fake_time: FakeTime
) -> AsyncIterator[Callable[..., Reconciler]]:
    clients: list[httpx.AsyncClient] = []

    def make(concurrency: int = 8, **settings: Any) -> Reconciler:
        client = httpx.AsyncClient(transport=httpx.MockTransport(api.handler))
        clients.append(client)
        values: dict[str, Any] = {
            "reconcile_after": AFTER,
            "reconcile_max_interval": 100.0,
            "reconcile_rate_per_minute": 600.0,
            "job_deadline": DEADLINE,
            "retention_days": 30.0,
            "poll_interval": 1.0,
            **settings,
        }
        return Reconciler(
            store,
            VlmRunClient(client, "http://api.test/v1", "test-key"),
            Metrics(),
            Settings(**values),
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            concurrency=concurrency,
        )

    yield make
    for client in clients:
        await client.aclose()


async def submitted_job(
    store: Store, prediction_id: str | None = "pred_1", created_at: float = T0 - AFTER
) -> tuple[Job, str]:
    """A job submitted at `created_at`, first poll due `AFTER` seconds later; its token hash."""
    job = Job(
        id=new_id("job"),
        kind="document",
        domain="document.invoice",
        status="submitting",
        prediction_id=None,
        created_at=created_at,
        updated_at=created_at,
        request={"url": "https://example.com/invoice.pdf"},
        next_poll_at=created_at + AFTER,
    )
    token_hash = hash_token(new_callback_token())
    await store.create_job(job, token_hash)
    if prediction_id is not None:
        await store.set_submitted(job.id, prediction_id, "pending", None, created_at)
    return job, token_hash


async def state(store: Store, job_id: str) -> tuple[Job, list[Any]]:
    found = await store.get_job(job_id)
    assert found is not None
    return found


def counter(reconciler: Reconciler, name: str, **labels: str) -> float:
    value = reconciler.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_overdue_job_is_recovered_through_the_callback_path(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """An overdue job's completed prediction is recorded as an event from a poll, forwarded to
    the sinks like a callback, and the job is completed."""
    job, _ = await submitted_job(store)
    api.script["pred_1"] = ["completed"]
    reconciler = make_reconciler()
    assert await reconciler.tick() == 1
    found, events = await state(store, job.id)
    assert found.status == "completed" and found.next_poll_at is None
    (event,) = events
    assert (event.source, event.verification, event.status) == ("poll", "poll", "completed")
    assert orjson.loads(event.body)["response"]["invoice_id"] == "INV-1"
    (claimed,) = await store.claim(T0 + 1, 10, 30)
    assert claimed.event.id == event.id and claimed.delivery.sink == "all"
    assert counter(reconciler, "receiver_reconciler_recoveries_total") == 1
    assert await reconciler.tick() == 0  # finished: never polled again
    assert len(api.calls) == 1


async def test_a_late_callback_after_a_poll_is_a_duplicate(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """The callback that finally arrives after the poll recovered the result adds no event."""
    job, token_hash = await submitted_job(store)
    api.script["pred_1"] = ["completed"]
    await make_reconciler().tick()
    body = orjson.dumps({"id": "pred_1", "status": "completed", "note": "other bytes"})
    late = await store.record(
        Incoming(token_hash, None, "pred_1", "completed", None, "callback", "hmac-sha256", body, T0)
    )
    assert late.outcome is Outcome.DUPLICATE
    _, events = await state(store, job.id)
    assert [(e.status, e.source) for e in events] == [("completed", "poll")]


async def test_a_poll_and_a_callback_racing_record_one_event(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """The poll and the callback bring the same result at the same moment: one of them is
    recorded, the other is a duplicate, never both."""
    reconciler = make_reconciler()
    for i in range(10):
        job, token_hash = await submitted_job(store, f"pred_{i}")
        api.script[f"pred_{i}"] = ["completed"]
        body = orjson.dumps({"id": f"pred_{i}", "status": "completed"})
        callback = Incoming(
            token_hash, None, f"pred_{i}", "completed", None, "callback", "hmac-sha256", body, T0
        )
        _, result = await asyncio.gather(reconciler.tick(), store.record(callback))
        found, events = await state(store, job.id)
        assert found.status == "completed" and len(events) == 1
        assert (result.outcome is Outcome.RECORDED) == (events[0].source == "callback")


async def test_a_callback_before_the_poll_means_no_poll(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """A job whose callback arrived in time is never polled."""
    _, token_hash = await submitted_job(store)
    body = orjson.dumps({"id": "pred_1", "status": "completed"})
    await store.record(
        Incoming(token_hash, None, "pred_1", "completed", None, "callback", "hmac-sha256", body, T0)
    )
    assert await make_reconciler().tick() == 0
    assert api.calls == []


async def test_unfinished_jobs_are_polled_with_doubling_backoff(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """While the prediction runs, polls wait reconcile_after, then twice, four times as long,
    up to reconcile_max_interval; pending/running record nothing."""
    job, _ = await submitted_job(store)
    api.script["pred_1"] = ["pending", "running"]
    reconciler = make_reconciler(reconcile_max_interval=50.0)
    gaps = []
    for _ in range(5):
        assert await reconciler.tick() == 1
        found, events = await state(store, job.id)
        assert events == [] and found.next_poll_at is not None
        gaps.append(found.next_poll_at - fake_time.now)
        assert await reconciler.tick() == 0  # not due again before then
        fake_time.now = found.next_poll_at
    assert gaps == [AFTER, 2 * AFTER, 4 * AFTER, 50.0, 50.0]
    assert found.poll_attempts == 5
    assert counter(reconciler, "receiver_reconciler_polls_total", outcome="ok") == 5


async def test_polls_are_spaced_to_stay_within_the_rate(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """With 30 polls a minute allowed, six overdue jobs are polled two seconds apart."""
    for i in range(6):
        await submitted_job(store, f"pred_{i}")
        api.script[f"pred_{i}"] = ["completed"]
    reconciler = make_reconciler(concurrency=1, reconcile_rate_per_minute=30.0)
    polled = 0
    while n := await reconciler.tick():
        polled += n
    assert polled == 6
    starts = [t for t, _ in api.calls]
    assert [b - a for a, b in itertools.pairwise(starts)] == [2.0] * 5


async def test_concurrent_polls_keep_the_spacing_in_real_time(store: Store) -> None:
    """Measured on the real clock: polls in flight together still start 0.1 s apart at 600 a
    minute, however fast the API answers."""
    starts: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        starts.append(time.monotonic())
        await asyncio.sleep(0.3)  # slower than the spacing: several polls overlap
        return httpx.Response(
            200, json={"id": request.url.path.rsplit("/", 1)[1], "status": "completed"}
        )

    now = time.time()
    for i in range(6):
        await submitted_job(store, f"pred_{i}", created_at=now - AFTER - 1)
    settings = Settings(reconcile_after=AFTER, reconcile_rate_per_minute=600.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        reconciler = Reconciler(
            store, VlmRunClient(client, "http://api.test/v1", "test-key"), Metrics(), settings
        )
        assert await reconciler.tick() == 6
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 6 and min(gaps) >= 0.08 and starts[-1] - starts[0] >= 0.49
    assert starts[-1] - starts[0] < 1.5  # overlapping, not one after the other (6 x 0.3 s)


async def test_a_rate_limited_poll_pauses_polling_for_a_minute(
    store: Store, api: ScriptedApi, make_reconciler: Callable[..., Reconciler]
) -> None:
    """A 429 from the API holds back the next poll for a minute; the job is retried later."""
    job, _ = await submitted_job(store, "pred_a", created_at=T0 - AFTER - 1)
    await submitted_job(store, "pred_b")
    api.script["pred_a"] = [429, "completed"]
    api.script["pred_b"] = ["completed"]
    reconciler = make_reconciler(concurrency=1, reconcile_rate_per_minute=600.0)
    while await reconciler.tick():
        pass
    assert [p for _, p in api.calls] == ["pred_a", "pred_b", "pred_a"]
    assert api.calls[1][0] - api.calls[0][0] >= THROTTLED_PAUSE
    # What the dashboard's overview shows as "paused after a 429 until ...".
    assert reconciler.throttled_until == pytest.approx(api.calls[0][0] + THROTTLED_PAUSE, abs=1)
    assert (await state(store, job.id))[0].status == "completed"  # retried after the pause
    assert counter(reconciler, "receiver_reconciler_polls_total", outcome="error") == 1


@pytest.mark.parametrize(
    "answer",
    [500, 404, 401, httpx.ConnectError("refused"), httpx.ReadTimeout("slow")],
    ids=["500", "404", "401", "connect-error", "timeout"],
)
async def test_api_errors_reschedule_the_poll(
    store: Store,
    api: ScriptedApi,
    fake_time: FakeTime,
    make_reconciler: Callable[..., Reconciler],
    answer: int | Exception,
) -> None:
    """Whatever the API does wrong, the poll counts as failed and is tried again later;
    the job is neither lost nor finished."""
    job, _ = await submitted_job(store)
    api.script["pred_1"] = [answer, "completed"]
    reconciler = make_reconciler()
    assert await reconciler.tick() == 1
    found, events = await state(store, job.id)
    assert events == [] and found.status == "pending" and found.poll_attempts == 1
    assert found.next_poll_at == fake_time.now + AFTER
    assert counter(reconciler, "receiver_reconciler_polls_total", outcome="error") == 1
    fake_time.now = found.next_poll_at
    assert await reconciler.tick() == 1
    assert (await state(store, job.id))[0].status == "completed"


async def test_job_past_its_deadline_is_timed_out(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """A job still running at its deadline is polled a last time, then marked timed_out and
    counted in receiver_jobs_timed_out; polls never get scheduled past the deadline."""
    job, _ = await submitted_job(store, created_at=T0 - AFTER)
    api.script["pred_1"] = ["running"]
    reconciler = make_reconciler(job_deadline=100.0, reconcile_max_interval=1000.0)
    schedule = []
    while True:
        while await reconciler.tick():
            pass
        found, _ = await state(store, job.id)
        if found.next_poll_at is None:
            break
        schedule.append(found.next_poll_at - job.created_at)
        fake_time.now = found.next_poll_at
    assert schedule == [20.0, 40.0, 80.0, 100.0]  # 10 + 10, + 20, + 40, then the deadline
    assert found.status == "timed_out"
    assert len(api.calls) == 5  # the last poll at the deadline itself
    assert counter(reconciler, "receiver_jobs_timed_out_total") == 1
    (timed_out,) = [j for j in (await store.list_jobs("timed_out", None, 10, None)).items]
    assert timed_out.id == job.id


async def test_a_result_found_at_the_deadline_wins_over_timing_out(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """The last poll at the deadline finds the job completed: it is completed, not timed out."""
    job, _ = await submitted_job(store, created_at=T0 - DEADLINE)
    api.script["pred_1"] = ["completed"]
    reconciler = make_reconciler()
    assert await reconciler.tick() == 1
    assert (await state(store, job.id))[0].status == "completed"
    assert counter(reconciler, "receiver_jobs_timed_out_total") == 0


async def test_job_without_prediction_waits_for_a_callback_until_its_deadline(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """A submission whose outcome is unknown has nothing to poll: the API is never asked, and
    the job times out at its deadline unless a callback comes."""
    job, _ = await submitted_job(store, prediction_id=None)
    reconciler = make_reconciler(job_deadline=50.0)
    while True:
        while await reconciler.tick():
            pass
        found, _ = await state(store, job.id)
        if found.next_poll_at is None:
            break
        fake_time.now = found.next_poll_at
    assert found.status == "timed_out" and api.calls == []


async def test_run_works_off_the_backlog_at_once_and_prunes(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """Started after downtime, the reconciler polls every overdue job before anything else,
    then prunes, and prunes again every prune interval."""
    old, _ = await submitted_job(store, "pred_old", created_at=T0 - 40 * 86400)
    jobs = [(await submitted_job(store, f"pred_{i}"))[0] for i in range(3)]
    for pred in ("pred_old", "pred_0", "pred_1", "pred_2"):
        api.script[pred] = ["completed"]
    reconciler = make_reconciler(job_deadline=50 * 86400.0)
    prunes: list[float] = []
    real_prune = store.prune

    async def prune(before: float) -> int:
        if not prunes:  # the backlog goes first
            for job in [old, *jobs]:
                assert (await state(store, job.id))[0].status == "completed"
        prunes.append(before)
        return await real_prune(before)

    store.prune = prune  # type: ignore[method-assign]
    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        if seconds != reconciler.settings.poll_interval:  # spacing polls, not idle
            fake_time.now += seconds
            return
        sleeps += 1
        if sleeps == 1:  # the backlog must be done before the first idle sleep
            for job in [old, *jobs]:
                assert (await state(store, job.id))[0].status == "completed"
        fake_time.now += 1800
        if sleeps == 4:
            await reconciler.stop()

    reconciler._sleep = sleep
    await asyncio.wait_for(reconciler.run(), 10)
    assert len(prunes) == 2 and T0 - 30 * 86400 <= prunes[0] < T0 + 1 - 30 * 86400
    assert 3600 <= prunes[1] - prunes[0] < 3601


async def test_prune_at_start_forgets_old_deliveries(
    store: Store, api: ScriptedApi, fake_time: FakeTime, make_reconciler: Callable[..., Reconciler]
) -> None:
    """Delivered rows older than retention_days are gone after the service's own prune."""
    job, _ = await submitted_job(store, "pred_old", created_at=T0 - 40 * 86400)
    api.script["pred_old"] = ["completed"]
    fake_time.now = T0 - 40 * 86400 + AFTER
    await make_reconciler(job_deadline=50 * 86400.0).tick()
    (claimed,) = await store.claim(fake_time.now, 10, 30)
    await store.finish(
        [
            Attempt(
                claimed.delivery.id,
                1,
                fake_time.now,
                1.0,
                200,
                None,
                "",
                "delivered",
                fake_time.now,
                claimed.lease_until,
                claimed.lease,
            )
        ],
        fake_time.now,
    )
    fake_time.now = T0
    reconciler = make_reconciler()

    async def stop_at_first_sleep(seconds: float) -> None:
        await reconciler.stop()

    reconciler._sleep = stop_at_first_sleep
    await reconciler.run()
    assert (await store.list_deliveries(None, None, 10, None)).items == []
    _, (event,) = await state(store, job.id)
    assert orjson.loads(event.body) is None  # the payload went with it


async def test_only_one_postgres_process_reconciles_at_a_time(postgres_url: str) -> None:
    """Two stores on one PostgreSQL database: only one sees overdue jobs; when it closes
    (its process dies), the other takes over."""
    first, second = open_store(postgres_url, ROUTES), open_store(postgres_url, ROUTES)
    try:
        job, _ = await submitted_job(first)
        assert [j.id for j in await first.overdue_jobs(T0, 10)] == [job.id]
        assert await second.overdue_jobs(T0, 10) == []
        assert [j.id for j in await first.overdue_jobs(T0, 10)] == [job.id]
        await first.close()
        assert [j.id for j in await second.overdue_jobs(T0, 10)] == [job.id]
    finally:
        await first.close()
        await second.close()

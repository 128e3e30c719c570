"""The dispatcher, in process, against real HTTP consumers on loopback and a real store.

Each test records events through the store (so the outbox rows come from the same transaction
as in production), runs a `Dispatcher` with short retry schedules, and reads back what the
user sees: the delivery rows (state, attempts, next_attempt_at), the attempt log, and the
requests as the consumer received them. Signatures are checked with `standardwebhooks`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import uvicorn
from standardwebhooks import Webhook

from receiver.breaker import Breaker
from receiver.config import SinkConfig
from receiver.errors import StoreUnavailable
from receiver.metrics import Metrics
from receiver.models import Delivery, Incoming, Job, Route, hash_token, new_callback_token, new_id
from receiver.outbox import Dispatcher, RetryPolicy
from receiver.sinks import Message, Receipt, Sink, open_sink
from receiver.store import Store, open_store
from tests.conftest import read_body

FAST = (0.0, 0.2, 0.2)  # three attempts, 0.2 s apart (±20 %)


# -- a consumer whose answers a test scripts ---------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b"ok"


@dataclass(frozen=True)
class Arrival:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int  # what the consumer answered


@dataclass
class _Endpoint:
    script: list[Answer]
    arrivals: list[Arrival] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0


class Consumer:
    """A real HTTP consumer (uvicorn in a thread). `endpoint(a, b, c)` answers a, then b, then
    c for ever after; `answer(url, x)` changes what it answers from now on."""

    def __init__(self) -> None:
        self.base_url = ""
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()

    def endpoint(self, *script: Answer) -> str:
        path = f"/hook/{uuid.uuid4().hex}"
        self._endpoints[path] = _Endpoint(list(script) or [Answer()])
        return self.base_url + path

    def answer(self, url: str, answer: Answer) -> None:
        with self._lock:
            self._endpoints[url.removeprefix(self.base_url)].script = [answer]

    def arrivals(self, url: str) -> list[Arrival]:
        with self._lock:
            return list(self._endpoints[url.removeprefix(self.base_url)].arrivals)

    def most_in_flight(self, url: str) -> int:
        return self._endpoints[url.removeprefix(self.base_url)].most_in_flight

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        endpoint = self._endpoints[scope["path"]]
        with self._lock:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            answer = endpoint.script.pop(0) if len(endpoint.script) > 1 else endpoint.script[0]
            endpoint.arrivals.append(Arrival(time.time(), headers, body, answer.status))
            endpoint.in_flight += 1
            endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight)
        try:
            if answer.delay:
                await asyncio.sleep(answer.delay)
            raw = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
            await send({"type": "http.response.start", "status": answer.status, "headers": raw})
            await send({"type": "http.response.body", "body": answer.body})
        finally:
            with self._lock:
                endpoint.in_flight -= 1


@pytest.fixture(scope="module")
def consumer() -> Iterator[Consumer]:
    app = Consumer()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "consumer did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    app.base_url = f"http://127.0.0.1:{port}"
    yield app
    server.should_exit = True
    thread.join(timeout=10)


# -- the service side ----------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Clock:
    """Real time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Harness:
    store: Store
    db: Path
    clock: Callable[[], float]
    dispatchers: list[tuple[Dispatcher, asyncio.Task[None]]] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)

    async def record(self, status: str = "completed") -> str:
        """A job and one verified callback for it: returns the recorded event's id."""
        token = new_callback_token()
        now = self.clock()
        job = Job(new_id("job"), "document", "document.invoice", "pending", None, now, now)
        await self.store.create_job(job, hash_token(token))
        prediction_id = new_id("pred")
        body = orjson.dumps({"id": prediction_id, "status": status, "response": {"n": 1}})
        result = await self.store.record(
            Incoming(
                token_hash=hash_token(token),
                job_id=None,
                prediction_id=prediction_id,
                status=status,
                domain=None,
                source="callback",
                verification="hmac-sha256",
                body=body,
                received_at=now,
            )
        )
        assert result.event_id is not None
        return result.event_id

    def start(
        self,
        configs: Sequence[SinkConfig],
        *,
        metrics: Metrics | None = None,
        **options: Any,
    ) -> Dispatcher:
        sinks = {c.name: open_sink(c) for c in configs}
        self.sinks += sinks.values()
        options.setdefault("poll_interval", 0.1)
        dispatcher = Dispatcher(
            self.store,
            sinks,
            {c.name: RetryPolicy.for_sink(c) for c in configs},
            metrics or Metrics(),
            clock=self.clock,
            **options,
        )
        task = asyncio.create_task(dispatcher.run())
        self.dispatchers.append((dispatcher, task))
        return dispatcher

    async def deliveries(self, sink: str | None = None) -> list[Delivery]:
        page = await self.store.list_deliveries(None, sink, 500, None)
        return sorted(page.items, key=lambda d: d.id)  # type: ignore[union-attr]

    def attempts(self, delivery_id: int) -> list[tuple[int, int | None, str | None, float, float]]:
        """The attempt log of one delivery: (attempt, status code, error, started_at,
        duration_ms), read from the database (the store has no query for it)."""
        with sqlite3.connect(self.db) as conn:
            return conn.execute(
                "SELECT attempt, status_code, error, started_at, duration_ms FROM attempts"
                " WHERE delivery_id = ? ORDER BY id",
                (delivery_id,),
            ).fetchall()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(
        routes: Sequence[str | Route],
        clock: Callable[[], float] = time.time,
        url: str | None = None,
    ) -> Harness:
        db = tmp_path / "receiver.db"
        store = open_store(
            url or f"sqlite:///{db}", [r if isinstance(r, Route) else Route(r) for r in routes]
        )
        await store.migrate()
        made.append(Harness(store, db, clock))
        return made[-1]

    yield make
    for h in made:
        for dispatcher, task in h.dispatchers:
            await dispatcher.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for sink in h.sinks:
            await sink.close()
        await h.store.close()


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def http_sink(name: str, url: str, secret: str, **extra: Any) -> SinkConfig:
    return SinkConfig(name=name, url=url, secret=secret, **extra)


# -- retries, as the delivery row and the attempt log record them --------------------------------


async def test_a_sink_failing_twice_gets_the_event_on_the_third_attempt(
    harness: Any, consumer: Consumer
) -> None:
    """A consumer that fails twice then succeeds gets the event on the 3rd attempt; the row
    says delivered after 3 attempts, the log holds each status, and all 3 requests carry the
    same id, the same bytes and a signature the consumer's library accepts."""
    secret = new_secret()
    url = consumer.endpoint(Answer(500, body=b"boom"), Answer(503), Answer(200))
    h = await harness(["erp"])
    event_id = await h.record()
    h.start([http_sink("erp", url, secret, retry_schedule=FAST)])

    (delivery,) = await eventually(
        lambda: _delivered(h, "erp"),
    )
    assert (delivery.event_id, delivery.attempts, delivery.last_error) == (event_id, 3, None)
    log = h.attempts(delivery.id)
    assert [(n, code) for n, code, *_ in log] == [(1, 500), (2, 503), (3, 200)]
    assert log[0][2] is not None and "HTTP 500" in log[0][2]
    assert log[2][2] is None
    starts = [started for *_, started, _ in log]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.15 <= gap < 2.0 for gap in gaps), gaps  # 0.2 s ±20 %, plus the attempt
    assert all(duration > 0 for *_, duration in log)

    arrivals = consumer.arrivals(url)
    assert len(arrivals) == 3
    assert {a.headers["webhook-id"] for a in arrivals} == {event_id}
    assert len({a.body for a in arrivals}) == 1
    for a in arrivals:
        envelope = Webhook(secret).verify(a.body, a.headers)
        assert envelope["id"] == event_id and envelope["status"] == "completed"


async def _delivered(h: Harness, sink: str) -> list[Delivery] | None:
    rows = await h.deliveries(sink)
    return rows if rows and all(d.state == "delivered" for d in rows) else None


async def test_after_the_last_attempt_the_delivery_is_dead_and_nothing_more_is_sent(
    harness: Any, consumer: Consumer
) -> None:
    """A consumer that always fails gets exactly as many attempts as the schedule allows;
    then the delivery is dead, with the last error, and no further request comes."""
    url = consumer.endpoint(Answer(500, body=b"still broken"))
    h = await harness(["erp"])
    await h.record()
    h.start([http_sink("erp", url, new_secret(), retry_schedule=FAST)])

    async def dead() -> Delivery | None:
        (d,) = await h.deliveries()
        return d if d.state == "dead" else None

    delivery = await eventually(dead)
    assert delivery.attempts == 3
    assert delivery.last_error is not None and "HTTP 500" in delivery.last_error
    assert [code for _, code, *_ in h.attempts(delivery.id)] == [500, 500, 500]
    await asyncio.sleep(0.6)  # longer than any retry delay of the schedule
    assert len(consumer.arrivals(url)) == 3


async def test_retry_after_holds_the_next_attempt_back(harness: Any, consumer: Consumer) -> None:
    """A 429 with `Retry-After: 30` schedules the next attempt 30 s later (not the 0.2 s of
    the schedule); nothing is sent before then, and the event arrives once it is due."""
    clock = Clock()
    url = consumer.endpoint(Answer(429, {"retry-after": "30"}, body=b"slow down"), Answer(200))
    h = await harness(["erp"], clock=clock)
    await h.record()
    h.start([http_sink("erp", url, new_secret(), retry_schedule=FAST)], poll_interval=0.05)

    async def waiting() -> Delivery | None:
        (d,) = await h.deliveries()
        return d if d.attempts == 1 and d.state == "pending" else None

    delivery = await eventually(waiting)
    ((_, code, error, started, duration),) = h.attempts(delivery.id)
    assert code == 429 and error is not None
    assert 30.0 <= delivery.next_attempt_at - started <= 30.0 + duration / 1000 + 0.5

    clock.offset = 20.0  # 20 s later: not due yet
    await asyncio.sleep(0.5)
    assert len(consumer.arrivals(url)) == 1
    clock.offset = 31.0
    (delivery,) = await eventually(lambda: _delivered(h, "erp"))
    assert delivery.attempts == 2
    assert len(consumer.arrivals(url)) == 2


async def test_retry_after_is_bounded(harness: Any, consumer: Consumer) -> None:
    """A `Retry-After` of a day is cut to the policy's bound (here 5 s)."""
    url = consumer.endpoint(Answer(503, {"retry-after": "86400"}))
    h = await harness(["erp"])
    await h.record()
    sink = open_sink(http_sink("erp", url, new_secret()))
    h.sinks.append(sink)
    dispatcher = Dispatcher(
        h.store,
        {"erp": sink},
        {"erp": RetryPolicy(FAST, retry_after_max=5.0)},
        Metrics(),
        poll_interval=0.1,
    )
    h.dispatchers.append((dispatcher, asyncio.create_task(dispatcher.run())))

    async def waiting() -> Delivery | None:
        (d,) = await h.deliveries()
        return d if d.attempts == 1 else None

    delivery = await eventually(waiting)
    ((*_, started, duration),) = h.attempts(delivery.id)
    assert 5.0 <= delivery.next_attempt_at - started <= 5.0 + duration / 1000 + 0.5


async def test_a_consumer_hanging_past_the_timeout_is_retried_then_dead(
    harness: Any, consumer: Consumer
) -> None:
    """A consumer that hangs past the sink's timeout: each attempt is cut off at the timeout,
    logged without a status code, retried, and the delivery ends dead."""
    url = consumer.endpoint(Answer(200, delay=3.0))
    h = await harness(["erp"])
    await h.record()
    h.start([http_sink("erp", url, new_secret(), timeout=0.3, retry_schedule=(0.0, 0.2))])

    async def dead() -> Delivery | None:
        (d,) = await h.deliveries()
        return d if d.state == "dead" else None

    delivery = await eventually(dead)
    log = h.attempts(delivery.id)
    assert [(n, code) for n, code, *_ in log] == [(1, None), (2, None)]
    for _, _, error, _, duration in log:
        assert error is not None and "no answer within 0.3s" in error
        assert 250 <= duration < 2000
    assert delivery.last_error is not None and "0.3s" in delivery.last_error


async def test_410_kills_the_delivery_and_disables_the_sink(
    harness: Any, consumer: Consumer, tmp_path: Path
) -> None:
    """A 410 Gone: that delivery is dead at once, the sink is disabled (log and metric say
    so), later events wait for it unsent, and the other sinks carry on."""
    url = consumer.endpoint(Answer(410, body=b"this endpoint is gone"))
    journal = tmp_path / "events.jsonl"
    h = await harness(["erp", "journal"])
    metrics = Metrics()
    first = await h.record()
    with structlog.testing.capture_logs() as logs:
        h.start(
            [
                http_sink("erp", url, new_secret(), retry_schedule=FAST),
                SinkConfig(name="journal", url=f"file://{journal}"),
            ],
            metrics=metrics,
        )

        async def dead() -> Delivery | None:
            (d,) = await h.deliveries("erp")
            return d if d.state == "dead" else None

        delivery = await eventually(dead)
        later = [await h.record(), await h.record()]
        await eventually(lambda: len(journal.read_bytes().splitlines()) == 3)
        await asyncio.sleep(0.5)

    assert delivery.event_id == first and delivery.attempts == 1
    assert delivery.last_error is not None and "410" in delivery.last_error
    assert [code for _, code, *_ in h.attempts(delivery.id)] == [410]
    waiting = [d for d in await h.deliveries("erp") if d.event_id in later]
    assert [(d.state, d.attempts) for d in waiting] == [("pending", 0), ("pending", 0)]
    assert len(consumer.arrivals(url)) == 1
    disabled = [e for e in logs if e["event"] == "sink.disabled"]
    assert [(e["sink"], e["log_level"]) for e in disabled] == [("erp", "error")]
    assert metrics.circuit_open.labels("erp")._value.get() == 1
    assert [orjson.loads(line)["id"] for line in journal.read_bytes().splitlines()] == [
        first,
        *later,
    ]


# -- outages, crashes and stops ------------------------------------------------------------------


async def test_a_sink_down_for_a_while_gets_every_event_when_it_is_back(
    harness: Any, consumer: Consumer
) -> None:
    """While a consumer is down, its circuit breaker holds the events back: after the first
    few failures only a probe now and then goes out, and no more attempts are burnt. Once it
    is back, every event arrives, once."""
    url = consumer.endpoint(Answer(503, body=b"down for maintenance"))
    h = await harness(["erp"])
    events = [await h.record() for _ in range(20)]
    schedule = (0.0, *[0.2] * 9)
    h.start(
        [http_sink("erp", url, new_secret(), retry_schedule=schedule)],
        breaker=lambda: Breaker(threshold=3, base_cooldown=0.3, max_cooldown=0.6),
        concurrency=4,  # the first wave: at most 4 requests fail together
    )
    await eventually(lambda: len(consumer.arrivals(url)) >= 3)
    await asyncio.sleep(1.5)
    during_outage = len(consumer.arrivals(url))
    assert during_outage < len(events)
    rows = await h.deliveries()
    assert all(d.state in ("pending", "leased") for d in rows)
    assert sum(d.attempts for d in rows) <= during_outage

    consumer.answer(url, Answer(200))
    delivered = await eventually(lambda: _delivered(h, "erp"), timeout=15)
    assert sorted(d.event_id for d in delivered) == sorted(events)
    ok = [a.headers["webhook-id"] for a in consumer.arrivals(url) if a.status == 200]
    assert sorted(ok) == sorted(events)


async def test_rows_of_a_crashed_worker_are_sent_after_their_lease(
    harness: Any, consumer: Consumer
) -> None:
    """Rows claimed by a worker that died (never finished) are not touched while its lease
    runs, and are delivered once it has run out."""
    url = consumer.endpoint(Answer(200))
    h = await harness(["erp"])
    events = [await h.record() for _ in range(3)]
    crashed = await h.store.claim(time.time(), 10, lease_seconds=1.0)  # and then it died
    assert len(crashed) == 3
    h.start([http_sink("erp", url, new_secret())], poll_interval=0.05)

    await asyncio.sleep(0.6)
    assert consumer.arrivals(url) == []
    delivered = await eventually(lambda: _delivered(h, "erp"))
    assert sorted(d.event_id for d in delivered) == sorted(events)
    assert sorted(a.headers["webhook-id"] for a in consumer.arrivals(url)) == sorted(events)


async def test_stop_finishes_sends_in_flight_and_hands_back_the_rest(
    harness: Any, consumer: Consumer
) -> None:
    """stop() lets sends in flight finish and records them; the rows it held but had not
    sent go back to the queue at once (not after the lease), untouched."""
    url = consumer.endpoint(Answer(200, delay=0.5))
    h = await harness(["erp"])
    for _ in range(6):
        await h.record()
    dispatcher = h.start(
        [http_sink("erp", url, new_secret())], concurrency=2, lease_seconds=60, drain_seconds=5
    )
    await eventually(lambda: len(consumer.arrivals(url)) == 2)
    started = time.monotonic()
    await dispatcher.stop()
    assert time.monotonic() - started < 2.0

    rows = await h.deliveries()
    assert (
        sorted((d.state, d.attempts) for d in rows) == [("delivered", 1)] * 2 + [("pending", 0)] * 4
    )
    assert all(d.next_attempt_at <= time.time() for d in rows if d.state == "pending")
    assert len(consumer.arrivals(url)) == 2


async def test_stop_gives_up_on_a_slow_send_and_hands_its_row_back(
    harness: Any, consumer: Consumer
) -> None:
    """A send still running after the drain time is cut off and its row handed back with
    no attempt counted; the next worker delivers it at once, with the same id."""
    slow = consumer.endpoint(Answer(200, delay=5.0))
    h = await harness(["erp"])
    event_id = await h.record()
    dispatcher = h.start([http_sink("erp", slow, new_secret())], drain_seconds=0.2)
    await eventually(lambda: len(consumer.arrivals(slow)) == 1)
    started = time.monotonic()
    await dispatcher.stop()
    assert time.monotonic() - started < 1.5
    ((state, attempts),) = [(d.state, d.attempts) for d in await h.deliveries()]
    assert (state, attempts) == ("pending", 0)

    # The consumer is quick again (same sink name, as after a restart).
    fast = consumer.endpoint(Answer(200))
    h.start([http_sink("erp", fast, new_secret())])
    (delivery,) = await eventually(lambda: _delivered(h, "erp"), timeout=5)
    assert delivery.attempts == 1
    assert consumer.arrivals(slow)[0].headers["webhook-id"] == event_id
    assert consumer.arrivals(fast)[0].headers["webhook-id"] == event_id


async def test_rows_waiting_behind_a_slow_sink_are_not_sent_on_a_stale_lease(
    harness: Any, consumer: Consumer
) -> None:
    """A sink slower than the lease allows (one at a time, 0.6 s each, 1 s leases): rows that
    waited for half their lease go back for a fresh one instead of being sent late, so no
    event is sent twice, and all arrive."""
    url = consumer.endpoint(Answer(200, delay=0.6))
    h = await harness(["erp"])
    events = [await h.record() for _ in range(4)]
    h.start(
        [http_sink("erp", url, new_secret())],
        concurrency=1,
        lease_seconds=1.0,
        poll_interval=0.05,
    )
    delivered = await eventually(lambda: _delivered(h, "erp"), timeout=15)
    assert sorted(d.event_id for d in delivered) == sorted(events)
    assert all(d.attempts == 1 for d in delivered)
    ids = [a.headers["webhook-id"] for a in consumer.arrivals(url)]
    assert sorted(ids) == sorted(events)


async def test_a_sink_removed_from_the_sinks_file_does_not_stop_the_others(
    harness: Any, tmp_path: Path
) -> None:
    """Rows for a sink no longer configured wait untouched (pending, no attempt), a warning
    says so once, the dispatcher stops claiming them, and the other sinks keep flowing."""
    journal = tmp_path / "events.jsonl"
    h = await harness(["gone", "journal"])
    for _ in range(3):
        await h.record()
    claimed_for_gone = 0
    claim = h.store.claim

    async def counting_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claimed_for_gone
        items = await claim(*args, **kwargs)
        claimed_for_gone += sum(i.delivery.sink == "gone" for i in items)
        return items

    h.store.claim = counting_claim  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        h.start([SinkConfig(name="journal", url=f"file://{journal}")], poll_interval=0.05)
        await eventually(lambda: journal.exists() and len(journal.read_bytes().splitlines()) == 3)
        await asyncio.sleep(0.5)  # ten poll intervals
        await h.record()
        await eventually(lambda: len(journal.read_bytes().splitlines()) == 4)

    gone = await h.deliveries("gone")
    assert [(d.state, d.attempts) for d in gone] == [("pending", 0)] * 4
    assert claimed_for_gone == 3  # once each, then the sink is skipped
    warnings = [e for e in logs if e["event"] == "outbox.unknown_sink"]
    assert [e["sink"] for e in warnings] == ["gone"]


async def test_a_store_outage_pauses_forwarding_without_losing_or_repeating_events(
    harness: Any, consumer: Consumer
) -> None:
    """While the store fails (claims and write-backs raise StoreUnavailable for a second), the
    dispatcher keeps running; afterwards every event is recorded delivered, each sent once."""
    url = consumer.endpoint(Answer(200))
    h = await harness(["erp"])
    outage_until = time.monotonic() + 1.0
    claim, finish = h.store.claim, h.store.finish

    async def failing_claim(*args: Any, **kwargs: Any) -> Any:
        items = await claim(*args, **kwargs)  # rows are leased, then the answer is lost
        if time.monotonic() < outage_until:
            raise StoreUnavailable("sqlite: database is locked")
        return items

    async def failing_finish(*args: Any, **kwargs: Any) -> None:
        if time.monotonic() < outage_until:
            raise StoreUnavailable("sqlite: disk I/O error")
        await finish(*args, **kwargs)

    h.store.claim, h.store.finish = failing_claim, failing_finish  # type: ignore[method-assign]
    h.start([http_sink("erp", url, new_secret())], lease_seconds=1.5, poll_interval=0.05)
    events = [await h.record() for _ in range(5)]
    await asyncio.sleep(0.3)
    h.store.claim = claim  # type: ignore[method-assign]
    late = [await h.record() for _ in range(5)]  # claimed now; their write-backs still fail

    delivered = await eventually(lambda: _delivered(h, "erp"), timeout=10)
    assert sorted(d.event_id for d in delivered) == sorted(events + late)
    ids = [a.headers["webhook-id"] for a in consumer.arrivals(url)]
    assert sorted(ids) == sorted(events + late)  # each once: write-backs were retried
    assert not any(task.done() for _, task in h.dispatchers)


class CrashingSink:
    """A sink with a bug: its first send raises something that is not a SinkError."""

    name = "buggy"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, message: Message) -> Receipt:
        self.sent.append(message.event_id)
        if len(self.sent) == 1:
            raise KeyError("oops")
        return Receipt(snippet="ok")

    async def close(self) -> None:
        pass


async def test_a_sink_bug_is_an_attempt_that_failed_not_a_stopped_dispatcher(
    harness: Any,
) -> None:
    """A sink raising an unexpected error: the attempt is logged with that error and retried,
    and the dispatcher carries on."""
    h = await harness(["buggy"])
    event_id = await h.record()
    sink = CrashingSink()
    dispatcher = Dispatcher(
        h.store, {"buggy": sink}, {"buggy": RetryPolicy(FAST)}, Metrics(), poll_interval=0.1
    )
    h.dispatchers.append((dispatcher, asyncio.create_task(dispatcher.run())))
    (delivery,) = await eventually(lambda: _delivered(h, "buggy"))
    assert sink.sent == [event_id, event_id]
    assert [(n, code, error) for n, code, error, *_ in h.attempts(delivery.id)] == [
        (1, None, "KeyError: 'oops'"),
        (2, None, None),
    ]


# -- waking, concurrency -------------------------------------------------------------------------


async def test_a_new_row_wakes_the_dispatcher_without_waiting_for_the_timer(
    harness: Any, consumer: Consumer
) -> None:
    """With a 30 s fallback timer, an event recorded while the dispatcher sleeps reaches the
    consumer within a fraction of a second."""
    url = consumer.endpoint(Answer(200))
    h = await harness(["erp"])
    h.start([http_sink("erp", url, new_secret())], poll_interval=30.0)
    await asyncio.sleep(0.3)  # asleep now
    recorded = time.time()
    event_id = await h.record()
    (arrival,) = await eventually(lambda: consumer.arrivals(url), timeout=5)
    assert arrival.headers["webhook-id"] == event_id
    assert arrival.at - recorded < 0.5


async def test_a_retry_falls_due_without_waiting_for_the_timer(
    harness: Any, consumer: Consumer
) -> None:
    """With a 30 s fallback timer, a retry scheduled 0.2 s after a failure is made on time."""
    url = consumer.endpoint(Answer(500), Answer(200))
    h = await harness(["erp"])
    await h.record()
    h.start([http_sink("erp", url, new_secret(), retry_schedule=FAST)], poll_interval=30.0)
    first, second = await eventually(lambda: (a := consumer.arrivals(url)) and len(a) == 2 and a)
    assert 0.15 <= second.at - first.at < 1.0


async def test_each_sink_has_its_own_bound_and_a_slow_one_does_not_hold_up_another(
    harness: Any, consumer: Consumer
) -> None:
    """At most `concurrency` requests are in flight per sink; a slow sink with a backlog
    holds only a few rows ahead (the rest stay queued in the store, where their leases cannot
    run out while they wait), and a fast sink's later events are not held up behind it."""
    slow = consumer.endpoint(Answer(200, delay=0.3))
    fast = consumer.endpoint(Answer(200))
    h = await harness(
        [Route("slow", statuses=("running",)), Route("fast", statuses=("completed",))]
    )
    for _ in range(40):
        await h.record("running")  # the slow sink's backlog comes first in the queue
    for _ in range(5):
        await h.record("completed")
    started = time.time()
    h.start(
        [http_sink("slow", slow, new_secret()), http_sink("fast", fast, new_secret())],
        concurrency=3,
    )
    await eventually(lambda: len(consumer.arrivals(fast)) == 5)
    fast_done = time.time() - started
    held = [d for d in await h.deliveries("slow") if d.state == "leased"]
    assert fast_done < 1.5
    assert len(held) <= 2 * 4 * 3  # twice its depth (4 x concurrency), not the whole backlog
    await eventually(lambda: len(consumer.arrivals(slow)) == 40, timeout=20)
    assert consumer.most_in_flight(slow) == 3
    assert consumer.most_in_flight(fast) <= 3


async def test_a_sink_can_have_a_lower_bound_of_its_own(harness: Any, consumer: Consumer) -> None:
    """A sink given its own limit (a consumer that takes 2 requests at a time) gets at most 2
    at once, while another sink uses the dispatcher's default."""
    narrow = consumer.endpoint(Answer(200, delay=0.2))
    wide = consumer.endpoint(Answer(200, delay=0.2))
    h = await harness(["narrow", "wide"])
    for _ in range(12):
        await h.record()
    h.start(
        [http_sink("narrow", narrow, new_secret()), http_sink("wide", wide, new_secret())],
        concurrency=6,
        limits={"narrow": 2},
    )
    await eventually(lambda: len(consumer.arrivals(narrow)) == 12, timeout=10)
    assert consumer.most_in_flight(narrow) == 2
    assert consumer.most_in_flight(wide) == 6


async def test_a_replayed_dead_delivery_is_sent_again_with_the_same_id(
    harness: Any, consumer: Consumer
) -> None:
    """A dead delivery put back in the queue starts again from attempt 1 and is delivered;
    the attempt log keeps the failures before it, and the consumer sees the same id."""
    url = consumer.endpoint(Answer(500))
    h = await harness(["erp"])
    event_id = await h.record()
    h.start([http_sink("erp", url, new_secret(), retry_schedule=FAST)])

    async def dead() -> Delivery | None:
        (d,) = await h.deliveries()
        return d if d.state == "dead" else None

    delivery = await eventually(dead)
    consumer.answer(url, Answer(200))
    assert await h.store.requeue(time.time(), delivery_id=delivery.id) == 1
    (delivery,) = await eventually(lambda: _delivered(h, "erp"))
    assert delivery.attempts == 1
    assert [(n, code) for n, code, *_ in h.attempts(delivery.id)] == [
        (1, 500),
        (2, 500),
        (3, 500),
        (1, 200),
    ]
    assert {a.headers["webhook-id"] for a in consumer.arrivals(url)} == {event_id}


# -- PostgreSQL: several workers ---------------------------------------------------------------


async def test_two_workers_on_postgresql_deliver_each_event_once(
    harness: Any, consumer: Consumer, postgres_url: str
) -> None:
    """Two dispatchers sharing PostgreSQL (each its own store) split the work: every event
    arrives exactly once, and new rows wake them (LISTEN/NOTIFY), not the 30 s timer."""
    url = consumer.endpoint(Answer(200, delay=0.01))
    writer = await harness(["erp"], url=postgres_url)
    workers = [await harness(["erp"], url=postgres_url) for _ in range(2)]
    for w in workers:
        w.start([http_sink("erp", url, new_secret())], poll_interval=30.0, concurrency=8)
    await asyncio.sleep(0.5)  # both listening and asleep
    events = [await writer.record() for _ in range(100)]
    await eventually(lambda: len(consumer.arrivals(url)) >= 100, timeout=10)
    await asyncio.sleep(0.3)
    ids = [a.headers["webhook-id"] for a in consumer.arrivals(url)]
    assert sorted(ids) == sorted(events)
    assert all(d.state == "delivered" for d in await writer.deliveries())

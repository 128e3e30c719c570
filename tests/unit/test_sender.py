"""One sink's sender alone: what each send becomes, when a row goes back unsent, its pool.

A scripted sink, a clock the test moves and a stopwatch for durations: nothing waits on the
wall clock, and every outcome is read as the store would receive it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from receiver.breaker import Breaker
from receiver.errors import SinkError
from receiver.metrics import Metrics
from receiver.outcomes import DeliveryOutcome, Release
from receiver.retry import RetryPolicy
from receiver.sender import PAUSED_RECHECK, Pacing, SinkSender
from receiver.sinks import Receipt
from receiver.store import Attempt
from tests.unit.outbox_doubles import NOW, Clock, ScriptedSink, Stopwatch, claimed

THREE_TRIES = RetryPolicy(schedule=(0.0, 5.0, 50.0), jitter=0.0)


class Harness:
    """A sender for sink "erp" (2 sends at once, 8 rows ahead, 60 s leases) and what it did."""

    def __init__(
        self,
        *script: Receipt | Exception,
        policy: RetryPolicy = THREE_TRIES,
        breaker: Breaker | None = None,
    ) -> None:
        self.clock = Clock()
        self.sink = ScriptedSink(list(script) or [Receipt(200, "ok")])
        self.metrics = Metrics()
        self.outcomes: list[DeliveryOutcome] = []
        self.rooms = 0
        self.sender = SinkSender(
            "erp",
            self.sink,
            policy,
            breaker or Breaker(),
            self.metrics,
            Pacing(sends=2, ahead=8, chunk=4, lease_seconds=60.0),
            clock=self.clock,
            report=self.outcomes.append,
            on_room=self.room,
            bug_pause=2.0,
            timer=Stopwatch(0.05),
        )

    def room(self) -> None:
        self.rooms += 1

    async def attempt(self, **row: Any) -> Attempt:
        outcome = await self.sender.send_or_release(claimed(**row))
        assert isinstance(outcome, Attempt), outcome
        return outcome

    def counted(self, outcome: str) -> float | None:
        """receiver_deliveries_total{sink="erp", outcome=...}, as /metrics shows it."""
        labels = {"sink": "erp", "outcome": outcome}
        return self.metrics.registry.get_sample_value("receiver_deliveries_total", labels)

    def circuit_open(self) -> float | None:
        return self.metrics.registry.get_sample_value("receiver_sink_circuit_open", {"sink": "erp"})


# -- what a send becomes ---------------------------------------------------------------------


async def test_a_delivered_send_is_recorded_with_its_answer_and_duration() -> None:
    """A 200: delivered on attempt 1, the sink's status and snippet kept, its duration timed,
    the claim's lease carried so the store can tell the row is still ours."""
    h = Harness(Receipt(200, "thanks"))
    a = await h.attempt()
    assert (a.state, a.attempt, a.status_code, a.snippet, a.error) == (
        "delivered",
        1,
        200,
        "thanks",
        None,
    )
    assert a.duration_ms == pytest.approx(50.0)
    assert (a.started_at, a.lease_until) == (NOW, NOW + 60.0)
    assert h.sink.sent == ["evt_1"]
    assert h.counted("delivered") == 1


async def test_a_failed_send_is_tried_again_when_the_schedule_says() -> None:
    """A 500 on the first attempt: pending, due 5 s later (the schedule's second delay)."""
    h = Harness(SinkError("HTTP 500", status_code=500, snippet="boom"))
    a = await h.attempt()
    assert (a.state, a.attempt, a.status_code, a.error, a.snippet) == (
        "pending",
        1,
        500,
        "HTTP 500",
        "boom",
    )
    assert a.next_attempt_at == NOW + 5.0
    assert h.counted("pending") == 1


async def test_retry_after_from_the_sink_holds_the_next_attempt_back() -> None:
    """A 429 with Retry-After: 30 is tried again 30 s later, not after the schedule's 5 s."""
    h = Harness(SinkError("HTTP 429", status_code=429, retry_after=30.0))
    assert (await h.attempt()).next_attempt_at == NOW + 30.0


async def test_a_failed_last_attempt_makes_the_delivery_dead() -> None:
    """The third of three attempts fails: dead (replayable), nothing more scheduled."""
    h = Harness(SinkError("HTTP 500", status_code=500))
    a = await h.attempt(attempts=2)
    assert (a.state, a.attempt) == ("dead", 3)
    assert h.counted("dead") == 1


async def test_a_permanent_refusal_is_dead_at_once() -> None:
    """A sink that says retrying cannot help: dead on the first attempt."""
    h = Harness(SinkError("HTTP 400: refused", status_code=400, permanent=True))
    assert (await h.attempt()).state == "dead"


async def test_a_sink_bug_is_a_failed_attempt_that_is_tried_again() -> None:
    """A sink raising something unexpected: a failed attempt naming the error, retried."""
    h = Harness(KeyError("oops"), Receipt(200))
    a = await h.attempt()
    assert (a.state, a.status_code, a.error) == ("pending", None, "KeyError: 'oops'")
    assert (await h.attempt()).state == "delivered"


async def test_410_disables_the_sink_and_its_later_rows_wait_unsent() -> None:
    """A 410 Gone: that delivery is dead, the sink disabled until restart (the metric says 1),
    and the next row goes back to the queue unsent, its attempts untouched."""
    h = Harness(SinkError("HTTP 410", status_code=410, permanent=True, disable_sink=True))
    assert (await h.attempt()).state == "dead"
    assert h.sender.disabled == "HTTP 410"
    assert h.sender.holds_back(NOW) and h.circuit_open() == 1
    later = await h.sender.send_or_release(claimed(2, attempts=1))
    assert isinstance(later, Release) and later.due_at >= NOW + PAUSED_RECHECK
    assert later.to_attempt().attempt == 1
    assert h.sink.sent == ["evt_1"]


# -- rows handed back unsent -----------------------------------------------------------------


async def test_a_row_that_waited_half_its_lease_goes_back_for_a_fresh_one() -> None:
    """A row whose 60 s lease has under 30 s left is not sent (it could be sent twice): it is
    due again at once, to be claimed with a fresh lease."""
    h = Harness()
    outcome = await h.sender.send_or_release(claimed(lease_until=NOW + 29.0))
    assert outcome == Release(claimed(lease_until=NOW + 29.0), NOW)
    assert h.sink.sent == []


async def test_after_stop_rows_go_back_unsent_due_at_once() -> None:
    """Once stopping, a queued row is handed back, due now, for a restart or another worker."""
    h = Harness()
    h.sender.stop()
    outcome = await h.sender.send_or_release(claimed())
    assert isinstance(outcome, Release) and outcome.due_at == NOW
    assert h.sink.sent == []


async def test_a_sink_down_gets_one_probe_per_cool_down_and_is_back_after_one_success() -> None:
    """Two failures in a row open the circuit for 10 s: rows go back due when it ends; then
    one probe goes out while the others wait, and its success closes the circuit."""
    down = SinkError("HTTP 503", status_code=503)
    h = Harness(down, down, Receipt(200), breaker=Breaker(threshold=2, base_cooldown=10.0))
    await h.attempt(delivery_id=1)
    await h.attempt(delivery_id=2)
    assert h.circuit_open() == 1 and h.sender.holds_back(NOW)
    held = await h.sender.send_or_release(claimed(3))
    assert isinstance(held, Release) and held.due_at == NOW + 10.0

    h.clock.now = NOW + 10.0
    h.sink.gate.clear()  # the probe hangs until the test lets it answer
    probe = asyncio.create_task(h.sender.send_or_release(claimed(3, lease_until=NOW + 70.0)))
    await h.sink.until_in_flight(1)
    other = await h.sender.send_or_release(claimed(4, lease_until=NOW + 70.0))
    assert isinstance(other, Release), "only one probe at a time"
    h.sink.gate.set()
    assert isinstance(await probe, Attempt) and (await probe).state == "delivered"
    assert h.circuit_open() == 0 and not h.sender.holds_back(h.clock.now)
    assert h.sink.sent == ["evt_1", "evt_2", "evt_3"]


# -- the pool ----------------------------------------------------------------------------------


async def test_at_most_sends_rows_are_in_flight_and_each_gets_one_outcome() -> None:
    """Five rows for a sink allowed two sends at once: never more than two in flight, every
    row reported once, and the dispatcher told when room for a claim of 4 opens."""
    h = Harness()
    h.sink.gate.clear()
    for n in range(1, 6):
        h.sender.take(claimed(n))
    assert h.sender.busy == 5 and h.sender.room == 3
    await h.sink.until_in_flight(2)
    h.sink.gate.set()
    await asyncio.gather(*h.sender.tasks)
    assert h.sink.most_in_flight == 2
    assert sorted(o.delivery_id for o in h.outcomes) == [1, 2, 3, 4, 5]
    assert h.sender.busy == 0 and h.rooms == 1  # busy went 5 -> 4: room for a chunk


async def test_a_send_cut_off_by_stop_hands_its_row_back_with_no_attempt_counted() -> None:
    """A send cancelled mid-way (the drain time ran out) and the rows queued behind it all go
    back to the queue, due at once, with nothing counted against them."""
    h = Harness()
    h.sink.gate.clear()
    for n in range(1, 5):
        h.sender.take(claimed(n))
    await h.sink.until_in_flight(2)
    h.sender.stop()
    for task in list(h.sender.tasks):
        task.cancel()
    await asyncio.gather(*h.sender.tasks, return_exceptions=True)
    h.sender.hand_back_queued(NOW)
    assert all(isinstance(o, Release) and o.due_at == NOW for o in h.outcomes)
    assert sorted(o.claimed.delivery.id for o in h.outcomes) == [1, 2, 3, 4]
    assert h.sender.busy == 0

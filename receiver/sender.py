"""`SinkSender`: sends one sink's claimed rows and decides what each send means.

Per sink: a queue of claimed rows and a pool of at most `pacing.sends` tasks working through
it (a task works until the queue is empty, so under load a task is made per `sends` rows, not
per row); the sink's `Breaker` and `RetryPolicy`; its metrics and log lines. Each row ends as
one outcome (an `Attempt` or a `Release`, see receiver/outcomes.py) passed to `report`.

A row is handed back unsent (a `Release`) when, at its turn:
- the dispatcher is stopping (due at once: a restart or another worker takes it);
- its lease is half gone: it waited behind a slow sink, and a send now could outlast the
  lease while another claim (ours or another worker's) sends it again; a fresh claim gives it
  a fresh lease;
- the sink is disabled, cooling down, or its probe is out: due when the cool-down ends (so a
  sink that is down burns one probe per cool-down instead of every row's attempts).

A send is delivered, or failed: then retried when the policy says so, dead after its last
attempt or at once on a permanent error. A 410 Gone disables the sink until the service
restarts, and says so in the log (`sink.disabled`) and metrics (`receiver_sink_circuit_open`
stays 1). Failed attempts are logged (`delivery.attempted`); successes, the bulk, only at debug
level (they are in the store's attempt log).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from receiver.breaker import Breaker
from receiver.errors import SinkError
from receiver.metrics import Metrics
from receiver.models import Claimed, DeliveryState
from receiver.outcomes import DeliveryOutcome, Release
from receiver.retry import RetryPolicy
from receiver.sinks import Message, Sink
from receiver.store import Attempt

log = structlog.get_logger(__name__)
SNIPPET_CHARS = 512
PAUSED_RECHECK = 1.0  # a row handed back while its sink is paused is due again after this


@dataclass(frozen=True, slots=True)
class Pacing:
    """How much of one sink's work is in hand at once."""

    sends: int  # sends in flight at most
    ahead: int  # rows claimed and not yet finished at most: queued or being sent
    chunk: int  # claim for this sink again once this many of `ahead` are free
    lease_seconds: float  # how long a claim holds a row

    @classmethod
    def for_sends(cls, sends: int, claim_batch: int, lease_seconds: float) -> Pacing:
        # Rows claimed ahead, so the next ones are at hand the moment a send ends; and
        # claimed in chunks: measured, claims of 128 rows instead of 32 cut the
        # dispatcher's own cost per delivery by a third.
        ahead = 4 * sends
        return cls(sends, ahead, max(1, min(claim_batch, ahead // 2)), lease_seconds)


class SinkSender:
    """One sink's queue, pool of sends, breaker, retry decisions, metrics and log lines.

    `report` receives every row's outcome; `on_room` is called when room for a claim of
    `pacing.chunk` rows has just opened; `bug_pause` is how long a row waits when this code
    (not the sink) failed on it. `clock` gives epoch seconds; `timer` measures send durations.
    """

    def __init__(
        self,
        name: str,
        sink: Sink,
        policy: RetryPolicy,
        breaker: Breaker,
        metrics: Metrics,
        pacing: Pacing,
        *,
        clock: Callable[[], float],
        report: Callable[[DeliveryOutcome], None],
        on_room: Callable[[], None],
        bug_pause: float,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name, self.sink, self.policy, self.breaker = name, sink, policy, breaker
        self.pacing = pacing
        self.disabled: str | None = None  # why the sink is disabled (until restart)
        self.busy = 0  # claimed and not yet finished: queued or being sent
        self.tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[Claimed] = deque()
        self._workers = 0  # tasks working through the queue, at most `pacing.sends`
        self._stopping = False
        self._clock, self._timer, self._bug_pause = clock, timer, bug_pause
        self._report, self._on_room = report, on_room
        self._metrics = metrics
        # Metric children looked up once, not per send.
        self._seconds = metrics.delivery_seconds.labels(name)
        self._circuit = metrics.circuit_open.labels(name)
        self._counters: dict[str, Any] = {}

    # -- what the dispatcher asks ----------------------------------------------------------------

    def holds_back(self, now: float) -> bool:
        """Rows for this sink should stay in the queue (disabled, cooling down, probing)."""
        return self.disabled is not None or self.breaker.holds_back(now)

    def resumes_at(self) -> float:
        """When a cool-down ends (inf: disabled until restart)."""
        return math.inf if self.disabled else self.breaker.open_until

    @property
    def room(self) -> int:
        """How many more rows this sink may have in hand."""
        return self.pacing.ahead - self.busy

    def take(self, item: Claimed) -> None:
        """Queue a claimed row; a task sends it when one of the sink's `sends` is free."""
        self._queue.append(item)
        self.busy += 1
        if self._workers < self.pacing.sends:
            self._workers += 1
            task = asyncio.create_task(self._work(), name=f"send-{self.name}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def stop(self) -> None:
        """Send nothing more: queued rows are handed back as their turn comes."""
        self._stopping = True

    def hand_back_queued(self, now: float) -> None:
        """Hand back the rows a cancelled task left in the queue, due at `now`."""
        while self._queue:
            self.busy -= 1
            self._report(Release(self._queue.popleft(), now))

    # -- sending -----------------------------------------------------------------------------

    async def _work(self) -> None:
        try:
            while self._queue:
                item = self._queue.popleft()
                try:
                    outcome = await self.send_or_release(item)
                except asyncio.CancelledError:
                    # stop() gave up waiting for this send: hand the row back rather than
                    # have it wait out its lease (the sink may have it: it sees the id again).
                    self.busy -= 1
                    self._report(Release(item, self._clock()))
                    raise
                except Exception:  # a bug here must not leak the sink's capacity
                    log.exception("outbox.send_failed", sink=self.name)
                    outcome = Release(item, self._clock() + self._bug_pause)
                self.busy -= 1
                self._report(outcome)
                if self.busy == self.pacing.ahead - self.pacing.chunk:
                    self._on_room()
        finally:
            self._workers -= 1

    async def send_or_release(self, item: Claimed) -> DeliveryOutcome:
        """Send the row, or hand it back unsent (see the module's docstring for when)."""
        now = self._clock()
        breaker = self.breaker
        if self._stopping or item.lease_until - now < self.pacing.lease_seconds / 2:
            return Release(item, now)
        if self.disabled or not breaker.admits(now):
            return Release(item, max(now + PAUSED_RECHECK, breaker.open_until))
        probe = breaker.start()
        try:
            return await self._attempt(item)
        finally:
            if probe:
                breaker.probe_ended()

    async def _attempt(self, item: Claimed) -> Attempt:
        d, event = item.delivery, item.event
        number = d.attempts + 1
        started = self._clock()
        t0 = self._timer()
        status_code: int | None = None
        error: str | None = None
        snippet = ""
        retry_after: float | None = None
        try:
            message = Message(event.id, f"prediction.{event.status}", event.envelope())
            receipt = await self.sink.send(message)
            status_code, snippet = receipt.status_code, receipt.snippet
            outcome = DeliveryState.DELIVERED
        except SinkError as exc:
            status_code, error, snippet = exc.status_code, exc.reason, exc.snippet
            retry_after = exc.retry_after
            outcome = DeliveryState.DEAD if exc.permanent else DeliveryState.PENDING
            if exc.disable_sink:
                self._disable(exc.reason)
        except Exception as exc:  # a sink bug must not kill the dispatcher
            error = f"{type(exc).__name__}: {exc}"[:SNIPPET_CHARS]
            outcome = DeliveryState.PENDING
            log.exception("sink.crashed", sink=self.name, delivery_id=d.id)
        duration = self._timer() - t0
        self._seconds.observe(duration)
        now = self._clock()
        outcome, next_at = self._settle(outcome, number, retry_after, now)
        self._count(outcome)
        # Successes are the bulk and are in the attempt log; a line each is noise at 5k/s.
        (log.debug if outcome is DeliveryState.DELIVERED else log.info)(
            "delivery.attempted",
            sink=self.name,
            delivery_id=d.id,
            event_id=event.id,
            attempt=number,
            outcome=outcome.value,
            status_code=status_code,
            error=error,
        )
        return Attempt(
            delivery_id=d.id,
            attempt=number,
            started_at=started,
            duration_ms=duration * 1000,
            status_code=status_code,
            error=error,
            snippet=snippet[:SNIPPET_CHARS],
            state=outcome.value,
            next_attempt_at=next_at,
            lease_until=item.lease_until,
            lease=item.lease,
        )

    def _settle(
        self, outcome: DeliveryState, number: int, retry_after: float | None, now: float
    ) -> tuple[DeliveryState, float]:
        """Feed the breaker; for a failure, when (or whether) to try again."""
        breaker = self.breaker
        if outcome is DeliveryState.DELIVERED:
            if (breaker.probing or breaker.failures) and breaker.success():
                log.info("sink.circuit_closed", sink=self.name)
                self._circuit.set(1 if self.disabled else 0)
            return outcome, now
        if breaker.failure(now):
            log.warning("sink.circuit_open", sink=self.name, seconds=breaker.cooldown)
            self._circuit.set(1)
        if outcome is DeliveryState.PENDING:
            delay = self.policy.next_delay(number, retry_after)
            if delay is None:
                return DeliveryState.DEAD, now
            return outcome, now + delay
        return outcome, now

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            self._circuit.set(1)
            log.error("sink.disabled", sink=self.name, reason=reason, until="restart")

    def _count(self, outcome: DeliveryState) -> None:
        counter = self._counters.get(outcome.value)
        if counter is None:
            counter = self._counters[outcome.value] = self._metrics.deliveries.labels(
                self.name, outcome.value
            )
        counter.inc()

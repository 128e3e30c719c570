"""The dispatcher: moves outbox rows to their sinks. `RetryPolicy` is the only retry code.

Each delivery row is claimed with a lease, sent by its sink, and finished in the store with
the attempt's record. A crash between claim and finish loses nothing: the lease runs out and
the row is claimed again (so sinks see at-least-once delivery, always with the same event id).

Retry schedule (delay before each attempt), by default the one Svix users know:
immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each delay ±20 % jitter; a sink's
`Retry-After` stretches a delay (bounded by `retry_after_max`). After the last attempt the
delivery is dead, and stays replayable. `RetryPolicy.exponential` builds a schedule from
`min(max, initial * base**(attempt-1))` for those who prefer a formula.

A sink that keeps failing trips its circuit breaker: its rows are left in the queue (their
attempts untouched) for a cool-down, then one probe decides whether it is back. A 410 Gone
disables the sink until the service restarts, and says so in the log and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from receiver.config import SinkConfig
from receiver.errors import SinkError, StoreError
from receiver.metrics import Metrics
from receiver.models import Claimed, DeliveryState
from receiver.sinks import Message, Sink
from receiver.store import Attempt, Outbox

log = structlog.get_logger("receiver.outbox")
SVIX_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...] = SVIX_SCHEDULE
    jitter: float = 0.2
    retry_after_max: float = 3600.0

    @classmethod
    def exponential(
        cls, initial: float, base: float, maximum: float, attempts: int, jitter: float = 0.2
    ) -> RetryPolicy:
        delays = [0.0] + [min(maximum, initial * base ** (n - 1)) for n in range(1, attempts)]
        return cls(tuple(delays), jitter)

    @classmethod
    def for_sink(cls, config: SinkConfig) -> RetryPolicy:
        return cls(config.retry_schedule) if config.retry_schedule else cls()

    @property
    def max_attempts(self) -> int:
        return len(self.schedule)

    def next_delay(
        self, attempts_made: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds until the next attempt after `attempts_made` attempts; None: give up."""
        if attempts_made >= self.max_attempts:
            return None
        base = self.schedule[attempts_made]
        delay = base * (1 + (rng or random).uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay


@dataclass
class Breaker:
    """Consecutive failures open the circuit for `cooldown` seconds (doubling, bounded)."""

    threshold: int = 5
    base_cooldown: float = 5.0
    max_cooldown: float = 600.0
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def success(self) -> None:
        self.failures, self.cooldown, self.open_until, self.probing = 0, 0.0, 0.0, False

    def failure(self, now: float) -> bool:
        """Count a failure; True when this one opened the circuit."""
        self.failures += 1
        if self.failures < self.threshold and not self.probing:
            return False
        self.cooldown = min(self.max_cooldown, max(self.base_cooldown, self.cooldown * 2))
        self.open_until = now + self.cooldown
        self.probing = True  # the next attempt after the cool-down is a probe
        return True


@dataclass
class _SinkState:
    sink: Sink
    policy: RetryPolicy
    slots: asyncio.Semaphore
    breaker: Breaker = field(default_factory=Breaker)
    disabled: str | None = None
    probe_busy: bool = False


class Dispatcher:
    def __init__(
        self,
        store: Outbox,
        sinks: Mapping[str, Sink],
        policies: Mapping[str, RetryPolicy],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        batch: int = 256,
        concurrency: int = 64,
        lease_seconds: float = 60.0,
        poll_interval: float = 2.0,
        drain_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.drain_seconds = drain_seconds
        self.sinks = {
            name: _SinkState(
                sink, policies.get(name, RetryPolicy()), asyncio.Semaphore(concurrency)
            )
            for name, sink in sinks.items()
        }
        self.capacity = max(1, concurrency * max(1, len(self.sinks)))
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()

    def paused_sinks(self, now: float) -> list[str]:
        return [name for name, s in self.sinks.items() if s.disabled or not s.breaker.allows(now)]

    async def run(self) -> None:
        """Claim and send until stopped. Store outages are waited out, never fatal."""
        if not self.sinks:
            await self._stopping.wait()
            return
        while not self._stopping.is_set():
            room = min(self.batch, self.capacity - len(self._in_flight))
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            now = self.clock()
            try:
                claimed = await self.store.claim(
                    now, room, self.lease_seconds, self.paused_sinks(now)
                )
            except StoreError as exc:
                log.error("outbox.claim_failed", error=str(exc))
                await self._sleep(self.poll_interval)
                continue
            for item in claimed:
                if item.delivery.sink not in self.sinks:
                    # A sink removed from the sinks file: its rows wait until it returns.
                    continue
                task = asyncio.create_task(self._deliver(item))
                self._in_flight[item.delivery.id] = task
            if len(claimed) < room:
                await self.store.wait_for_work(self.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _deliver(self, item: Claimed) -> None:
        d = item.delivery
        state = self.sinks[d.sink]
        try:
            async with state.slots:
                attempt = await self._attempt_or_release(item, state)
            await self.store.finish([attempt], self.clock())
        except StoreError as exc:
            # The lease will run out and another round will retry the row.
            log.error("outbox.finish_failed", delivery_id=d.id, error=str(exc))
        finally:
            self._in_flight.pop(d.id, None)
            self._room.set()

    async def _attempt_or_release(self, item: Claimed, state: _SinkState) -> Attempt:
        """Send, unless the sink was paused meanwhile: then hand the row back unsent, so a
        sink that is down burns one probe per cool-down instead of every row's attempts."""
        now = self.clock()
        breaker = state.breaker
        if state.disabled or not breaker.allows(now) or (breaker.probing and state.probe_busy):
            d = item.delivery
            return Attempt(
                delivery_id=d.id,
                attempt=d.attempts,
                started_at=now,
                duration_ms=0.0,
                status_code=None,
                error=d.last_error,
                snippet="",
                state=DeliveryState.PENDING.value,
                next_attempt_at=max(now + 1.0, breaker.open_until),
                lease_until=item.lease_until,
                released=True,
            )
        probe = breaker.probing
        state.probe_busy = state.probe_busy or probe
        try:
            return await self._attempt(item, state)
        finally:
            if probe:
                state.probe_busy = False

    async def _attempt(self, item: Claimed, state: _SinkState) -> Attempt:
        d, event = item.delivery, item.event
        number = d.attempts + 1
        started = self.clock()
        t0 = time.perf_counter()
        message = Message(event.id, f"prediction.{event.status}", event.envelope())
        status_code: int | None = None
        error: str | None = None
        snippet = ""
        retry_after: float | None = None
        try:
            receipt = await state.sink.send(message)
            status_code, snippet = receipt.status_code, receipt.snippet
            outcome = DeliveryState.DELIVERED
        except SinkError as exc:
            status_code, error, snippet = exc.status_code, exc.reason, exc.snippet
            retry_after = exc.retry_after
            outcome = DeliveryState.DEAD if exc.permanent else DeliveryState.PENDING
            if exc.disable_sink and not state.disabled:
                state.disabled = exc.reason
                log.error("sink.disabled", sink=d.sink, reason=exc.reason)
        except Exception as exc:  # a sink bug must not kill the dispatcher
            error = f"{type(exc).__name__}: {exc}"[:500]
            outcome = DeliveryState.PENDING
            log.exception("sink.crashed", sink=d.sink, delivery_id=d.id)
        duration = time.perf_counter() - t0
        now = self.clock()
        self.metrics.delivery_seconds.labels(d.sink).observe(duration)
        next_at = now
        if outcome is DeliveryState.DELIVERED:
            state.breaker.success()
        else:
            if state.breaker.failure(now):
                log.warning("sink.circuit_open", sink=d.sink, seconds=state.breaker.cooldown)
            if outcome is DeliveryState.PENDING:
                delay = state.policy.next_delay(number, retry_after)
                if delay is None:
                    outcome = DeliveryState.DEAD
                else:
                    next_at = now + delay
        self.metrics.circuit_open.labels(d.sink).set(0 if state.breaker.allows(now) else 1)
        self.metrics.deliveries.labels(d.sink, outcome.value).inc()
        log.info(
            "delivery.attempted",
            sink=d.sink,
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
            snippet=snippet[:512],
            state=outcome.value,
            next_attempt_at=next_at,
            lease_until=item.lease_until,
        )

    async def stop(self) -> None:
        """Stop claiming; let deliveries in flight finish within `drain_seconds`."""
        self._stopping.set()
        self._room.set()
        pending = list(self._in_flight.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.drain_seconds)
            for task in late:
                task.cancel()
            # Cancelled rows keep their lease; it runs out and another worker takes them.
            await asyncio.gather(*late, return_exceptions=True)

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
disables the sink until the service restarts, and says so in the log (`sink.disabled`) and
metrics (`receiver_sink_circuit_open` stays 1). A row whose sink is no longer in the sinks
file is handed back untouched and that sink skipped from then on (`outbox.unknown_sink`).

How the loop stays fast and fair:
- per sink at most `concurrency` sends run at once (a pool of sender tasks working through
  the sink's queue; `limits` sets it per sink), and at most 4 x that many rows are claimed
  ahead, a claim made once half of that is free; a sink at that
  bound is skipped by the claim, so a slow sink never holds rows (nor leases) it cannot
  send soon, nor the claims another sink needs;
- claims are made in batches (a claim costs about as much for 1 row as for 100), and
  finished attempts are written back in batches by one flusher: one commit for many rows;
- it wakes when a row is written (the store's `wait_for_work`), when a retry or a paused
  sink falls due, and otherwise on the `poll_interval` timer (other processes' writes);
- every attempt is in the store's attempt log; the log gets a line per failed attempt
  (`delivery.attempted`), successes only at debug level.

`stop()` stops claiming, lets sends in flight finish for `drain_seconds`, then hands every
row it still holds back to the queue (due at once, attempts untouched), so a restart or
another worker takes them without waiting for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from receiver.config import SinkConfig
from receiver.errors import SinkError, StoreError
from receiver.metrics import Metrics
from receiver.models import Claimed, DeliveryState
from receiver.sinks import Message, Sink
from receiver.store import Attempt, Outbox

log = structlog.get_logger("receiver.outbox")
SVIX_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
SNIPPET_CHARS = 512
_PAUSED_RECHECK = 1.0  # a row handed back while its sink is paused is due again after this
_MAX_DUE_TIMES = 10_000
_PENDING = DeliveryState.PENDING.value


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
    name: str
    sink: Sink
    policy: RetryPolicy
    breaker: Breaker
    seconds: Any  # the sink's child of metrics.delivery_seconds (labels() once, not per send)
    limit: int  # sends in flight at most
    depth: int  # rows claimed ahead at most: queued or being sent
    chunk: int  # claim for this sink once this many rows of `depth` are free
    outcomes: dict[str, Any] = field(default_factory=dict)
    queue: deque[Claimed] = field(default_factory=deque)  # claimed, waiting for a sender
    busy: int = 0  # claimed and not yet sent (or handed back): queued or being sent
    senders: int = 0  # sender tasks running for this sink, at most `limit`
    disabled: str | None = None
    probe_busy: bool = False


def _released(item: Claimed, next_attempt_at: float) -> Attempt:
    """The row handed back unsent: pending again, its attempts and last error untouched."""
    d = item.delivery
    return Attempt(
        delivery_id=d.id,
        attempt=d.attempts,
        started_at=next_attempt_at,
        duration_ms=0.0,
        status_code=None,
        error=d.last_error,
        snippet="",
        state=DeliveryState.PENDING.value,
        next_attempt_at=next_attempt_at,
        lease_until=item.lease_until,
        released=True,
    )


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
        breaker: Callable[[], Breaker] = Breaker,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.drain_seconds = drain_seconds
        self.sinks: dict[str, _SinkState] = {}
        for name, sink in sinks.items():
            limit = (limits or {}).get(name, concurrency)
            # Rows claimed ahead, so the next ones are at hand the moment a send ends; and
            # claimed in chunks: measured, claims of 128 rows instead of 32 cut the
            # dispatcher's own cost per delivery by a third.
            depth = 4 * limit
            self.sinks[name] = _SinkState(
                name,
                sink,
                policies.get(name, RetryPolicy()),
                breaker(),
                metrics.delivery_seconds.labels(name),
                limit,
                depth,
                max(1, min(batch, depth // 2)),
            )
        self._unknown: set[str] = set()  # sinks met in the outbox but not configured here
        self._senders: set[asyncio.Task[None]] = set()
        self._finished: list[Attempt] = []  # sent or handed back, not yet written back
        self._unflushed = 0  # those, plus the ones being written right now
        self._flush_wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Wakes the claiming loop early: room for a batch, a retry due sooner, stop().
        self._kick = asyncio.Event()
        self._due_times: list[float] = []  # a heap: when the retries scheduled here fall due
        self._sleep_until = math.inf
        self._stopping = asyncio.Event()
        self._closing = False  # the final flush: store errors are no longer retried
        self._exited = asyncio.Event()

    def paused_sinks(self, now: float) -> list[str]:
        return [
            name
            for name, s in self.sinks.items()
            if s.disabled or not s.breaker.allows(now) or s.probe_busy
        ]

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and send until stopped. Store outages are waited out, never fatal."""
        if self._stopping.is_set():
            return
        self._flusher = asyncio.create_task(self._flush_forever(), name="outbox-flush")
        try:
            if not self.sinks:
                await self._stopping.wait()
            while not self._stopping.is_set():
                try:
                    await self._round()
                except Exception:  # a bug (or an unwrapped driver error) must not stop forwarding
                    log.exception("outbox.round_failed")
                    await self._sleep(self.poll_interval)
        finally:
            if not self._stopping.is_set():  # cancelled without stop(): nobody will flush
                self._flusher.cancel()
            self._exited.set()

    async def _round(self) -> None:
        now = self.clock()
        skip = self.paused_sinks(now) + sorted(self._unknown)
        room = 0
        worth_it = not any(s.busy for s in self.sinks.values())
        for name, s in self.sinks.items():
            if name in skip:
                continue
            if s.busy >= s.depth:
                skip.append(name)
            else:
                room += s.depth - s.busy
                worth_it = worth_it or s.depth - s.busy >= s.chunk
        # With rows in hand, wait until a worthwhile batch fits rather than claim a few rows
        # at a time: a claim costs about as much for one row as for a hundred.
        room = min(self.batch, room) if worth_it else 0
        if self._unflushed >= 2 * self.batch:  # the store lags behind: let it catch up
            room = 0
        if room == 0:
            await self._sleep(self._timeout(now, retries=False))
            return
        due = self._due_times
        while due and due[0] <= now:  # this claim will find those rows
            heapq.heappop(due)
        try:
            claimed = await self.store.claim(now, room, self.lease_seconds, skip)
        except StoreError as exc:
            log.error("outbox.claim_failed", error=str(exc))
            await self._sleep(self.poll_interval)
            return
        for item in claimed:
            self._start(item, now)
        if len(claimed) < room:  # nothing more is due: sleep until something may be
            timeout = self._timeout(now)
            self._sleep_until = now + timeout
            await self._sleep(timeout, self.store.wait_for_work(timeout))
            self._sleep_until = math.inf

    async def _sleep(self, timeout: float, work: Coroutine[Any, Any, None] | None = None) -> None:
        """Until kicked, `timeout` passes, or (given `work`) the store says rows may be due."""
        self._kick.clear()
        if self._stopping.is_set():
            if work is not None:
                work.close()
            return
        if work is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            return
        tasks = [asyncio.ensure_future(work), asyncio.ensure_future(self._kick.wait())]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _timeout(self, now: float, retries: bool = True) -> float:
        """Seconds until the next retry (a retry written back during the last claim may be due
        already: 0) or paused sink falls due, at most `poll_interval`."""
        wake = self._due_times[0] if retries and self._due_times else math.inf
        for s in self.sinks.values():
            if s.breaker.open_until > now and not s.disabled:
                wake = min(wake, s.breaker.open_until)
        # A hair late rather than early: the row must be due when the claim looks.
        return min(self.poll_interval, max(0.0, wake - now + 0.002))

    def _note_due(self, at: float) -> None:
        if len(self._due_times) < _MAX_DUE_TIMES:  # beyond that the timer finds them
            heapq.heappush(self._due_times, at)
        if at < self._sleep_until:
            self._kick.set()

    def _start(self, item: Claimed, now: float) -> None:
        state = self.sinks.get(item.delivery.sink)
        if state is None:
            # The sink was removed from the sinks file: hand the row back untouched (another
            # worker may still know the sink) and skip the sink from now on.
            name = item.delivery.sink
            if name not in self._unknown:
                self._unknown.add(name)
                log.warning(
                    "outbox.unknown_sink",
                    sink=name,
                    hint="its deliveries wait until a sink of that name is configured again",
                )
            self._finish(_released(item, now))
            return
        state.queue.append(item)
        state.busy += 1
        if state.senders < state.limit:
            # A sender works through the queue until it is empty, so under load a task is
            # made per `limit` rows, not per row.
            state.senders += 1
            task = asyncio.create_task(self._send_queued(state))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    async def _send_queued(self, state: _SinkState) -> None:
        try:
            while state.queue:
                item = state.queue.popleft()
                try:
                    attempt = await self._attempt_or_release(item, state)
                except asyncio.CancelledError:
                    # stop() gave up waiting for this send: hand the row back rather than
                    # have it wait out its lease (the sink may have it: it sees the id again).
                    state.busy -= 1
                    self._finish(_released(item, self.clock()))
                    raise
                except Exception:  # a bug here must not leak the sink's capacity
                    log.exception("outbox.send_failed", sink=state.name)
                    attempt = _released(item, self.clock() + self.poll_interval)
                state.busy -= 1
                self._finish(attempt)
                if state.busy == state.depth - state.chunk:
                    self._kick.set()  # room for a chunk
        finally:
            state.senders -= 1

    async def _attempt_or_release(self, item: Claimed, state: _SinkState) -> Attempt:
        """Send, unless the sink was paused meanwhile, the row's lease is half gone, or we are
        stopping: then hand the row back unsent (a sink that is down burns one probe per
        cool-down instead of every row's attempts)."""
        now = self.clock()
        breaker = state.breaker
        if self._stopping.is_set():
            return _released(item, now)
        if item.lease_until - now < self.lease_seconds / 2:
            # It waited behind a slow sink for half its lease: a send now could outlast the
            # lease while another claim (ours or another worker's) sends it again. A fresh
            # claim gives it a fresh lease.
            return _released(item, now)
        if state.disabled or not breaker.allows(now) or (breaker.probing and state.probe_busy):
            return _released(item, max(now + _PAUSED_RECHECK, breaker.open_until))
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
        status_code: int | None = None
        error: str | None = None
        snippet = ""
        retry_after: float | None = None
        try:
            message = Message(event.id, f"prediction.{event.status}", event.envelope())
            receipt = await state.sink.send(message)
            status_code, snippet = receipt.status_code, receipt.snippet
            outcome = DeliveryState.DELIVERED
        except SinkError as exc:
            status_code, error, snippet = exc.status_code, exc.reason, exc.snippet
            retry_after = exc.retry_after
            outcome = DeliveryState.DEAD if exc.permanent else DeliveryState.PENDING
            if exc.disable_sink and not state.disabled:
                state.disabled = exc.reason
                self.metrics.circuit_open.labels(d.sink).set(1)
                log.error("sink.disabled", sink=d.sink, reason=exc.reason, until="restart")
        except Exception as exc:  # a sink bug must not kill the dispatcher
            error = f"{type(exc).__name__}: {exc}"[:SNIPPET_CHARS]
            outcome = DeliveryState.PENDING
            log.exception("sink.crashed", sink=d.sink, delivery_id=d.id)
        duration = time.perf_counter() - t0
        now = self.clock()
        state.seconds.observe(duration)
        next_at = now
        breaker = state.breaker
        if outcome is DeliveryState.DELIVERED:
            if breaker.probing or breaker.failures:
                if breaker.probing:
                    log.info("sink.circuit_closed", sink=d.sink)
                    self.metrics.circuit_open.labels(d.sink).set(1 if state.disabled else 0)
                breaker.success()
        else:
            if breaker.failure(now):
                log.warning("sink.circuit_open", sink=d.sink, seconds=breaker.cooldown)
                self.metrics.circuit_open.labels(d.sink).set(1)
            if outcome is DeliveryState.PENDING:
                delay = state.policy.next_delay(number, retry_after)
                if delay is None:
                    outcome = DeliveryState.DEAD
                else:
                    next_at = now + delay
        counter = state.outcomes.get(outcome.value)
        if counter is None:
            counter = state.outcomes[outcome.value] = self.metrics.deliveries.labels(
                d.sink, outcome.value
            )
        counter.inc()
        # Successes are the bulk and are in the attempt log; a line each is noise at 5k/s.
        (log.debug if outcome is DeliveryState.DELIVERED else log.info)(
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
            snippet=snippet[:SNIPPET_CHARS],
            state=outcome.value,
            next_attempt_at=next_at,
            lease_until=item.lease_until,
        )

    # -- writing outcomes back ---------------------------------------------------------------

    def _finish(self, attempt: Attempt) -> None:
        self._finished.append(attempt)
        self._unflushed += 1
        self._flush_wake.set()

    async def _flush_forever(self) -> None:
        """Write finished attempts back: whatever accumulated during one commit goes in the
        next, so under load each commit carries many rows."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            while self._finished:
                await self._flush()
            if self._closing:
                return

    async def _flush(self) -> None:
        batch, self._finished = self._finished, []
        try:
            await self.store.finish(batch, self.clock())
        except Exception as exc:  # StoreError, or a bug: either way the flusher lives on
            if isinstance(exc, StoreError):
                log.error("outbox.finish_failed", deliveries=len(batch), error=str(exc))
            else:
                log.exception("outbox.finish_failed", deliveries=len(batch))
            # Keep them (while they pile up, nothing more is claimed) and try again, until
            # their leases run out: then the rows are claimed again anyway.
            if not self._closing and self.clock() < max(a.lease_until for a in batch):
                self._finished[:0] = batch
                await asyncio.sleep(min(1.0, self.poll_interval))
                return
        lagging = self._unflushed >= 2 * self.batch
        self._unflushed -= len(batch)
        if lagging:
            self._kick.set()
        # Only now are the retries due in the store: plan to wake for them.
        for a in batch:
            if a.state == _PENDING and not self._stopping.is_set():
                self._note_due(a.next_attempt_at)

    async def stop(self) -> None:
        """Stop claiming; let sends in flight finish within `drain_seconds`; hand back the rest."""
        self._stopping.set()
        self._kick.set()
        if self._flusher is None:  # never ran
            return
        await self._exited.wait()
        # Senders hand back what is still queued (see _attempt_or_release) and finish the
        # sends in flight; those still running after `drain_seconds` are cancelled.
        if self._senders:
            _, late = await asyncio.wait(set(self._senders), timeout=self.drain_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        now = self.clock()
        for state in self.sinks.values():
            while state.queue:  # left behind by a cancelled sender
                self._finish(_released(state.queue.popleft(), now))
                state.busy -= 1
        self._closing = True
        self._flush_wake.set()
        # A store that hangs must not hang the shutdown: unwritten rows keep their leases.
        done, _ = await asyncio.wait({self._flusher}, timeout=self.drain_seconds)
        if not done:
            log.error("outbox.final_flush_timeout", deliveries=self._unflushed)
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

"""The dispatcher: claims due outbox rows and hands each to its sink's sender.

Each delivery row is claimed with a lease, sent by its sink, and finished in the store with
the attempt's record. A crash between claim and finish loses nothing: the lease runs out and
the row is claimed again (so sinks see at-least-once delivery, always with the same event id).

The parts, each testable alone:
- `Dispatcher` (here): the loop that claims rows and hands them out, and when it wakes;
- `SinkSender` (receiver/sender.py): one sink's pool of sends, its `Breaker`
  (receiver/breaker.py), its retry decisions by `RetryPolicy` (receiver/retry.py, the only
  retry code), its metrics and log lines;
- `OutcomeWriter` (receiver/outcomes.py): writes attempts, and rows handed back unsent
  (`Release`), back to the store in batches.

How the loop stays fast and fair:
- per sink at most `concurrency` sends run at once (`limits` sets it per sink), and at most
  4 x that many rows are claimed ahead, a claim made once half of that is free; a sink at
  that bound is skipped by the claim, so a slow sink never holds rows (nor leases) it cannot
  send soon, nor the claims another sink needs;
- claims are made in batches (a claim costs about as much for 1 row as for 100), and
  outcomes are written back in batches: one commit for many rows;
- it wakes when a row is written (the store's `wait_for_work`), when a retry or a paused
  sink falls due, and otherwise on the `poll_interval` timer (other processes' writes).

A sink that keeps failing trips its circuit breaker: its rows are left in the queue (their
attempts untouched) for a cool-down, then one probe decides whether it is back. A row whose
sink is no longer in the sinks file is handed back untouched and that sink skipped from then
on (`outbox.unknown_sink`).

`stop()` stops claiming, lets sends in flight finish for `drain_seconds`, then hands every
row it still holds back to the queue (due at once, attempts untouched), so a restart or
another worker takes them without waiting for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import structlog

from receiver.breaker import Breaker
from receiver.errors import StoreError
from receiver.metrics import Metrics
from receiver.models import Claimed
from receiver.outcomes import DeliveryOutcome, OutcomeWriter, Release, due_again_at
from receiver.retry import RetryPolicy
from receiver.sender import Pacing, SinkSender
from receiver.sinks import Sink
from receiver.store import Outbox

__all__ = ["Dispatcher", "RetryPolicy"]  # RetryPolicy: where app.py and DESIGN.md look for it

log = structlog.get_logger(__name__)
_MAX_DUE_TIMES = 10_000


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
        self.store, self.clock, self.batch = store, clock, batch
        self.lease_seconds, self.poll_interval = lease_seconds, poll_interval
        self.drain_seconds = drain_seconds
        self.writer = OutcomeWriter(
            store,
            clock=clock,
            backlog=2 * batch,  # the store lags behind: claim nothing until it catches up
            retry_pause=min(1.0, poll_interval),
            on_written=self._written,
        )
        self.senders = {
            name: SinkSender(
                name,
                sink,
                policies.get(name, RetryPolicy()),
                breaker(),
                metrics,
                Pacing.for_sends((limits or {}).get(name, concurrency), batch, lease_seconds),
                clock=clock,
                report=self.writer.add,
                on_room=self._kick_room,
                bug_pause=poll_interval,
            )
            for name, sink in sinks.items()
        }
        self._unknown: set[str] = set()  # sinks met in the outbox but not configured here
        self._writing: asyncio.Task[None] | None = None
        # Wakes the claiming loop early: room for a batch, a retry due sooner, stop().
        self._kick = asyncio.Event()
        self._held_by_writer = False  # the last round claimed nothing: the writer was behind
        self._due_times: list[float] = []  # a heap: when the retries scheduled here fall due
        self._sleep_until = math.inf
        self._stopping = asyncio.Event()
        self._exited = asyncio.Event()

    def paused_sinks(self, now: float) -> list[str]:
        return [name for name, s in self.senders.items() if s.holds_back(now)]

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and send until stopped. Store outages are waited out, never fatal."""
        if self._stopping.is_set():
            return
        self._writing = asyncio.create_task(self.writer.run(), name="outbox-write")
        try:
            if not self.senders:
                await self._stopping.wait()
            while not self._stopping.is_set():
                try:
                    await self._round()
                except Exception:  # a bug (or an unwrapped driver error) must not stop forwarding
                    log.exception("outbox.round_failed")
                    await self._sleep(self.poll_interval)
        finally:
            if not self._stopping.is_set():  # cancelled without stop(): nobody will write
                self._writing.cancel()
            self._exited.set()

    async def _round(self) -> None:
        now = self.clock()
        skip = self.paused_sinks(now) + sorted(self._unknown)
        room = 0
        worth_it = not any(s.busy for s in self.senders.values())
        for name, s in self.senders.items():
            if name in skip:
                continue
            if s.room <= 0:
                skip.append(name)
            else:
                room += s.room
                worth_it = worth_it or s.room >= s.pacing.chunk
        # With rows in hand, wait until a worthwhile batch fits rather than claim a few rows
        # at a time: a claim costs about as much for one row as for a hundred.
        room = min(self.batch, room) if worth_it else 0
        self._held_by_writer = self.writer.behind
        if self._held_by_writer:
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
            self._hand_out(item, now)
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
        for s in self.senders.values():
            resumes = s.resumes_at()
            if resumes > now:
                wake = min(wake, resumes)
        # A hair late rather than early: the row must be due when the claim looks.
        return min(self.poll_interval, max(0.0, wake - now + 0.002))

    def _hand_out(self, item: Claimed, now: float) -> None:
        sender = self.senders.get(item.delivery.sink)
        if sender is not None:
            sender.take(item)
            return
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
        self.writer.add(Release(item, now))

    # -- what the parts report -----------------------------------------------------------------

    def _kick_room(self) -> None:
        self._kick.set()

    def _written(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        if self._held_by_writer and not self.writer.behind:
            self._kick.set()
        if self._stopping.is_set():
            return
        # Only now are the retries due in the store: plan to wake for them.
        for outcome in outcomes:
            at = due_again_at(outcome)
            if at is None:
                continue
            if len(self._due_times) < _MAX_DUE_TIMES:  # beyond that the timer finds them
                heapq.heappush(self._due_times, at)
            if at < self._sleep_until:
                self._kick.set()

    async def stop(self) -> None:
        """Stop claiming; let sends in flight finish within `drain_seconds`; hand back the rest."""
        self._stopping.set()
        self._kick.set()
        for sender in self.senders.values():
            sender.stop()
        if self._writing is None:  # never ran
            return
        await self._exited.wait()
        # Senders hand back what is still queued and finish the sends in flight; those still
        # running after `drain_seconds` are cancelled, and hand their rows back.
        tasks = {task for s in self.senders.values() for task in s.tasks}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.drain_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        now = self.clock()
        for sender in self.senders.values():
            sender.hand_back_queued(now)  # left behind by a cancelled task
        self.writer.close()
        # A store that hangs must not hang the shutdown: unwritten rows keep their leases.
        done, _ = await asyncio.wait({self._writing}, timeout=self.drain_seconds)
        if not done:
            log.error("outbox.final_flush_timeout", deliveries=self.writer.unwritten)
            self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)

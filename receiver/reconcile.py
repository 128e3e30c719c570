"""The reconciler: fetches results whose callback never came, times out what never finishes,
and prunes what is old.

VLM Run tries a callback only twice, seconds apart, so a receiver that was down for a minute
misses it for good. Every job carries `next_poll_at`; once it passes without a terminal
status, the job is polled with `GET /v1/predictions/{id}`, and what comes back enters the store
by the same path as a callback (source `poll`), so a callback arriving later is a duplicate.

- Backoff: after the n-th poll (n = 1, 2, ...) of a job the next one waits
  `min(reconcile_max_interval, reconcile_after * 2**(n-1))`, and never past the job's deadline.
- Rate: polls start at least `60 / reconcile_rate_per_minute` seconds apart (the smallest plan
  allows 10 a minute), at most `concurrency` at once; a 429 pauses polling for a minute. On
  PostgreSQL only one process reconciles at a time (see `receiver.store.postgres`), so the
  rate holds for the whole deployment however many workers run.
- Only what a callback could bring is recorded: a terminal status or one we do not know
  (`cancelled`?); `pending` and `running` just reschedule the job.
- Deadline: a job unfinished `job_deadline` seconds after it was created is polled a last time
  (when it has a prediction), then marked `timed_out` (`receiver_jobs_timed_out`).
- Start: every unfinished job with a prediction is made due at once, and the first round runs
  at once: a callback sent while the service was down is lost (the API tries twice, seconds
  apart), so the results of downtime come back within the rate limit, not `reconcile_after`
  after each job's submission.
- Retention: every `prune_interval` seconds (the first time right after the first round),
  attempts, delivered rows and settled payloads older than `retention_days` are pruned
  (`store.prune`, in small batches, so no lock is held for long).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

import orjson
import structlog

from receiver.config import Settings
from receiver.errors import StoreError, VlmRunError
from receiver.metrics import Metrics
from receiver.models import STATUS_RANK, Incoming, Job, Outcome, is_terminal
from receiver.store import Store
from receiver.verify import Rejected, parse_prediction
from receiver.vlmrun import VlmRunClient

log = structlog.get_logger("receiver.reconcile")

PRUNE_INTERVAL = 3600.0  # seconds between two prunes
THROTTLED_PAUSE = 60.0  # after a 429: the API counts requests per minute
CONCURRENCY = 8  # polls in flight at once
BATCH_SECONDS = 10.0  # overdue jobs read per round: about this many seconds' worth of polls
MAX_BATCH = 100

Sleep = Callable[[float], Awaitable[None]]


class Reconciler:
    def __init__(
        self,
        store: Store,
        vlmrun: VlmRunClient,
        metrics: Metrics,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep | None = None,
        prune_interval: float = PRUNE_INTERVAL,
        concurrency: int = CONCURRENCY,
    ) -> None:
        """`clock` gives epoch seconds; `sleep(seconds)` waits (returning early on stop() by
        default); tests pass a fake pair to check spacing without waiting."""
        self.store = store
        self.vlmrun = vlmrun
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.prune_interval = prune_interval
        self.spacing = 60.0 / settings.reconcile_rate_per_minute
        self.batch = max(1, min(MAX_BATCH, math.ceil(BATCH_SECONDS / self.spacing)))
        self._sleep = sleep or self._interruptible_sleep
        self._slots = asyncio.Semaphore(concurrency)
        self._next_slot = -math.inf  # when the next poll may start (clock time)
        self._next_prune = -math.inf
        self.throttled_until = -math.inf  # after a 429: no poll starts before (the dashboard)
        self._stopping = asyncio.Event()

    def backoff(self, polls_made: int) -> float:
        """Seconds from the `polls_made`-th poll to the next: doubling, bounded."""
        s = self.settings
        return float(min(s.reconcile_max_interval, s.reconcile_after * 2 ** max(0, polls_made - 1)))

    async def run(self) -> None:
        """Reconcile and prune until stopped; store outages are waited out, never fatal."""
        caught_up = False
        while not self._stopping.is_set():
            try:
                if not caught_up:
                    due = await self.store.poll_outstanding(self.clock())
                    caught_up = True
                    log.info("reconcile.catch_up", jobs=due)
                done = await self.tick()  # first: the backlog of a restart goes before upkeep
                await self._maybe_prune()
            except StoreError as exc:
                log.error("reconcile.store_failed", error=str(exc))
                done = 0
            if done == 0 and not self._stopping.is_set():
                await self._sleep(self.settings.poll_interval)

    async def stop(self) -> None:
        self._stopping.set()

    async def _interruptible_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _maybe_prune(self) -> None:
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + self.prune_interval
        before = now - self.settings.retention_days * 86400
        pruned = await self.store.prune(before)
        log.info("reconcile.pruned", rows=pruned, before=before)

    async def tick(self) -> int:
        """Handle the jobs overdue now (one batch); returns how many were looked at."""
        jobs = await self.store.overdue_jobs(self.clock(), self.batch)
        tasks: list[asyncio.Task[None]] = []
        try:
            for job in jobs:
                if job.prediction_id is None:
                    await self.reconcile(job)
                    continue
                await self._slots.acquire()
                await self._pace()
                if self._stopping.is_set():
                    self._slots.release()
                    break
                task = asyncio.create_task(self.reconcile(job, paced=True))
                task.add_done_callback(lambda _: self._slots.release())
                tasks.append(task)
        finally:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(jobs)

    async def _pace(self) -> None:
        """Wait for the next free slot: polls start `spacing` seconds apart at least."""
        now = self.clock()
        start = max(now, self._next_slot)
        self._next_slot = start + self.spacing
        if start > now:
            await self._sleep(start - now)

    async def reconcile(self, job: Job, *, paced: bool = False) -> None:
        """Poll one overdue job (unless it has no prediction yet), record what it brings, and
        reschedule it, or time it out past its deadline."""
        deadline = job.created_at + self.settings.job_deadline
        polls = job.poll_attempts + 1
        if job.prediction_id is not None:
            if not paced:
                await self._pace()
            if await self._poll(job, job.prediction_id):
                return
        # No prediction id means the submission's outcome is unknown (timeout or 5xx): only a
        # callback can tell, so the job just waits for one until its deadline.
        now = self.clock()
        if now >= deadline:
            await self.store.time_out(job.id, now)
            self.metrics.timed_out.inc()
            log.warning(
                "job.timed_out", job_id=job.id, prediction_id=job.prediction_id, polls=polls
            )
            return
        await self.store.schedule_poll(job.id, min(deadline, now + self.backoff(polls)), polls)

    async def _poll(self, job: Job, prediction_id: str) -> bool:
        """Fetch the prediction and record it when a callback would have; True when that
        finished the job."""
        try:
            prediction = await self.vlmrun.get_prediction(prediction_id)
        except VlmRunError as exc:
            self.metrics.polls.labels("error").inc()
            if exc.status_code == 429:
                self.throttled_until = self.clock() + THROTTLED_PAUSE
                self._next_slot = max(self._next_slot, self.throttled_until)
            log.warning(
                "reconcile.poll_failed",
                job_id=job.id,
                prediction_id=prediction_id,
                status_code=exc.status_code,
                reason=exc.reason,
            )
            return False
        self.metrics.polls.labels("ok").inc()
        try:  # the same rule as a callback's body; bytes kept as they will be shown
            body = orjson.dumps(prediction)
            parsed = parse_prediction(body)
        except (orjson.JSONEncodeError, Rejected) as exc:
            reason = exc.reason if isinstance(exc, Rejected) else "nested too deep to keep"
            log.warning(
                "reconcile.unreadable", job_id=job.id, prediction_id=prediction_id, reason=reason
            )
            return False
        status = parsed.status
        if status in STATUS_RANK and not is_terminal(status):
            return False  # pending, running: nothing a callback would have brought yet
        result = await self.store.record(
            Incoming(
                token_hash=None,
                job_id=job.id,
                prediction_id=prediction_id,
                status=status,
                domain=parsed.domain,  # None: the job's
                source="poll",
                verification="poll",
                body=body,
                received_at=self.clock(),
            )
        )
        if result.outcome is not Outcome.RECORDED:
            # Duplicate or stale: a callback got there first, and the job is finished if this
            # status is terminal. Anything else is odd: reschedule rather than poll in a loop.
            return is_terminal(status) and result.outcome in (Outcome.DUPLICATE, Outcome.STALE)
        self.metrics.recoveries.inc()
        log.info(
            "reconcile.recovered",
            job_id=job.id,
            prediction_id=prediction_id,
            status=status,
            event_id=result.event_id,
        )
        return is_terminal(status)

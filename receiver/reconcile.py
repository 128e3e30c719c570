"""The reconciler: fetches results whose callback never came.

VLM Run tries a callback only twice, seconds apart, so a receiver that was down for a minute
misses it for good. Every job carries `next_poll_at`; once it passes without a terminal
status, the job is polled with `GET /v1/predictions/{id}` (backing off: `reconcile_after`
doubled per poll, at most `reconcile_max_interval`), and what comes back enters the store by
the same path as a callback (source `poll`), so a callback arriving later is a duplicate.
Polls are spaced to stay within `reconcile_rate_per_minute` (the smallest plan allows 10).
Past `job_deadline` an unfinished job is marked `timed_out`. On start the overdue backlog is
worked off first: that is what was missed while the service was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import orjson
import structlog

from receiver.config import Settings
from receiver.errors import StoreError, VlmRunError
from receiver.metrics import Metrics
from receiver.models import Incoming, Job, Outcome, is_terminal
from receiver.store import Store
from receiver.vlmrun import VlmRunClient

log = structlog.get_logger("receiver.reconcile")


class Reconciler:
    def __init__(
        self,
        store: Store,
        vlmrun: VlmRunClient,
        metrics: Metrics,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.vlmrun = vlmrun
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self._spacing = 60.0 / settings.reconcile_rate_per_minute
        self._next_slot = 0.0
        self._stopping = asyncio.Event()

    def backoff(self, polls_made: int) -> float:
        s = self.settings
        return float(min(s.reconcile_max_interval, s.reconcile_after * 2**polls_made))

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                done = await self.tick()
            except StoreError as exc:
                log.error("reconcile.store_failed", error=str(exc))
                done = 0
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.settings.poll_interval)

    async def stop(self) -> None:
        self._stopping.set()

    async def tick(self) -> int:
        """Handle the jobs overdue now; returns how many were looked at."""
        jobs = await self.store.overdue_jobs(self.clock(), 50)
        for job in jobs:
            if self._stopping.is_set():
                break
            await self.reconcile(job)
        return len(jobs)

    async def _pace(self) -> None:
        """Space polls evenly so the API's per-minute limit is never exceeded."""
        now = time.monotonic()
        wait = self._next_slot - now
        self._next_slot = max(now, self._next_slot) + self._spacing
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def reconcile(self, job: Job) -> None:
        now = self.clock()
        if now - job.created_at >= self.settings.job_deadline:
            await self.store.time_out(job.id, now)
            self.metrics.timed_out.inc()
            log.warning("job.timed_out", job_id=job.id, prediction_id=job.prediction_id)
            return
        next_poll = now + self.backoff(job.poll_attempts)
        if job.prediction_id is None:
            # Submission outcome unknown (timeout/5xx): only a callback can tell; wait for it.
            await self.store.schedule_poll(job.id, next_poll, job.poll_attempts + 1)
            return
        await self._pace()
        try:
            prediction = await self.vlmrun.get_prediction(job.prediction_id)
        except VlmRunError as exc:
            self.metrics.polls.labels("error").inc()
            log.warning("reconcile.poll_failed", job_id=job.id, status_code=exc.status_code)
            await self.store.schedule_poll(job.id, next_poll, job.poll_attempts + 1)
            return
        status = prediction.get("status")
        self.metrics.polls.labels("ok").inc()
        if isinstance(status, str) and status:
            domain = prediction.get("domain")
            result = await self.store.record(
                Incoming(
                    token_hash=None,
                    job_id=job.id,
                    prediction_id=job.prediction_id,
                    status=status,
                    domain=domain if isinstance(domain, str) else None,
                    source="poll",
                    verification="poll",
                    body=orjson.dumps(prediction),
                    received_at=self.clock(),
                )
            )
            if result.outcome is Outcome.RECORDED and is_terminal(status):
                self.metrics.recoveries.inc()
                log.info(
                    "reconcile.recovered",
                    job_id=job.id,
                    prediction_id=job.prediction_id,
                    status=status,
                    event_id=result.event_id,
                )
            if is_terminal(status):
                return
        await self.store.schedule_poll(job.id, next_poll, job.poll_attempts + 1)

"""What became of a claimed row, and `OutcomeWriter`, which records those outcomes in batches.

An outcome is either an `Attempt` (the row was sent: delivered, to be retried, or dead) or a
`Release` (the row was handed back unsent: its sink paused or disabled, its lease half gone,
the dispatcher stopping). A release counts no attempt and leaves the last error as it was; the
row is due again at `due_at`.

The writer is the only caller of `store.finish`. Whatever accumulates while one commit runs
goes into the next, so under load each commit carries many rows. A failed write is kept and
tried again until the rows' leases run out (after that the rows are claimed again anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from receiver.errors import StoreError
from receiver.models import Claimed, DeliveryState
from receiver.store import Attempt, Outbox

log = structlog.get_logger(__name__)
_PENDING = DeliveryState.PENDING.value


@dataclass(frozen=True, slots=True)
class Release:
    """A claimed row handed back unsent: pending again from `due_at`, attempts untouched."""

    claimed: Claimed
    due_at: float

    @property
    def lease_until(self) -> float:
        return self.claimed.lease_until

    def to_attempt(self) -> Attempt:
        """The store's form of a release (an `Attempt` flagged `released`): the store's
        `finish` takes attempts only, so the conversion happens here, at its boundary."""
        d = self.claimed.delivery
        return Attempt(
            delivery_id=d.id,
            attempt=d.attempts,
            started_at=self.due_at,
            duration_ms=0.0,
            status_code=None,
            error=d.last_error,
            snippet="",
            state=_PENDING,
            next_attempt_at=self.due_at,
            lease_until=self.claimed.lease_until,
            lease=self.claimed.lease,
            released=True,
        )


DeliveryOutcome = Attempt | Release


def due_again_at(outcome: DeliveryOutcome) -> float | None:
    """When the row is due in the queue again once this outcome is written; None: never."""
    if isinstance(outcome, Release):
        return outcome.due_at
    return outcome.next_attempt_at if outcome.state == _PENDING else None


class OutcomeWriter:
    """Writes outcomes back through `store.finish`, batched, from one task (`run`).

        `backlog` is how many unwritten outcomes make the writer `behind` (the dispatcher claims
        nothing more meanwhile); `on_written` hears of every batch once it is in the store (or
    given up on: its rows come back when their leases run out).
    """

    def __init__(
        self,
        store: Outbox,
        *,
        clock: Callable[[], float],
        backlog: int,
        retry_pause: float,
        on_written: Callable[[Sequence[DeliveryOutcome]], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._backlog = backlog
        self._retry_pause = retry_pause
        self._on_written = on_written
        self._pending: list[DeliveryOutcome] = []  # added, not yet handed to the store
        self.unwritten = 0  # those, plus the ones being written right now
        self._wake = asyncio.Event()
        self._closing = False  # the final write: store errors are no longer retried

    @property
    def behind(self) -> bool:
        return self.unwritten >= self._backlog

    def add(self, outcome: DeliveryOutcome) -> None:
        self._pending.append(outcome)
        self.unwritten += 1
        self._wake.set()

    async def run(self) -> None:
        """Write until `close()`; returns once everything added by then is written (or given up)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._write()
            if self._closing:
                return

    def close(self) -> None:
        """Write what is left once more, without retrying on store errors, then end `run`."""
        self._closing = True
        self._wake.set()

    async def _write(self) -> None:
        batch, self._pending = self._pending, []
        try:
            await self._store.finish([_for_store(o) for o in batch], self._clock())
        except Exception as exc:  # StoreError, or a bug: either way the writer lives on
            if isinstance(exc, StoreError):
                log.error("outbox.finish_failed", deliveries=len(batch), error=str(exc))
            else:
                log.exception("outbox.finish_failed", deliveries=len(batch))
            # Keep them (while they pile up, nothing more is claimed) and try again, until
            # their leases run out: then the rows are claimed again anyway.
            if not self._closing and self._clock() < max(o.lease_until for o in batch):
                self._pending[:0] = batch
                await asyncio.sleep(self._retry_pause)
                return
        self.unwritten -= len(batch)
        self._on_written(batch)


def _for_store(outcome: DeliveryOutcome) -> Attempt:
    return outcome.to_attempt() if isinstance(outcome, Release) else outcome

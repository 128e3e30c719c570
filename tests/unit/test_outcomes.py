"""The writer of outcomes alone: batching, releases at the store's boundary, failed writes.

A recording outbox stands in for the store; a clock the test moves decides whether leases
have run out. Nothing waits on the wall clock (a failed write is retried after 0 s here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from receiver.errors import StoreUnavailable
from receiver.outcomes import DeliveryOutcome, OutcomeWriter, Release, due_again_at
from receiver.store import Attempt
from tests.unit.outbox_doubles import NOW, Clock, RecordingOutbox, claimed


def attempt(delivery_id: int, state: str = "delivered", next_at: float = NOW) -> Attempt:
    return Attempt(delivery_id, 1, NOW, 5.0, 200, None, "ok", state, next_at, NOW + 60.0, 1)


class Harness:
    """A writer over a recording outbox (behind at 3 unwritten outcomes), and what it heard."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.store = RecordingOutbox()
        self.written: list[list[DeliveryOutcome]] = []
        self.heard_of_a_batch = asyncio.Event()
        self.writer = OutcomeWriter(
            self.store,  # type: ignore[arg-type]  # the outbox methods the writer uses
            clock=self.clock,
            backlog=3,
            retry_pause=0.0,
            on_written=self.heard,
        )
        self.task = asyncio.create_task(self.writer.run())

    def heard(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        self.written.append(list(outcomes))
        self.heard_of_a_batch.set()

    async def close(self) -> None:
        self.writer.close()
        await asyncio.wait_for(self.task, timeout=5)

    def ids(self) -> list[list[int]]:
        return [[a.delivery_id for a in batch] for batch in self.store.batches]


async def test_outcomes_that_arrive_during_a_commit_share_the_next_one() -> None:
    """While one commit runs, everything finished meanwhile waits and goes in one commit
    after it: two commits for four rows, not four."""
    h = Harness()
    h.store.gate.clear()  # the first commit is slow
    h.writer.add(attempt(1))
    await h.store.started.wait()
    for n in (2, 3, 4):
        h.writer.add(attempt(n))
    h.store.gate.set()
    await h.close()
    assert h.ids() == [[1], [2, 3, 4]]
    assert [[o.delivery_id for o in batch] for batch in h.written] == h.ids()


async def test_a_row_handed_back_reaches_the_store_with_its_attempts_and_error_untouched() -> None:
    """A release is written as the store expects it: pending, due when the release says, no
    attempt counted, the last error kept, under the claim's lease."""
    h = Harness()
    row = claimed(7, attempts=2, last_error="HTTP 503", lease_until=NOW + 60.0)
    h.writer.add(Release(row, NOW + 10.0))
    await h.close()
    ((stored,),) = h.store.batches
    assert stored.released
    assert (stored.delivery_id, stored.attempt, stored.error, stored.state) == (
        7,
        2,
        "HTTP 503",
        "pending",
    )
    assert (stored.next_attempt_at, stored.lease_until) == (NOW + 10.0, NOW + 60.0)


async def test_a_failed_write_is_tried_again_and_nothing_is_lost() -> None:
    """The store fails once: the same rows are written on the next try, and only then heard
    of as written."""
    h = Harness()
    h.store.failures.append(StoreUnavailable("sqlite: database is locked"))
    h.writer.add(attempt(1))
    h.writer.add(attempt(2))
    await h.heard_of_a_batch.wait()
    await h.close()
    assert h.ids() == [[1, 2]]
    assert len(h.written) == 1 and h.writer.unwritten == 0


async def test_a_failed_write_is_given_up_once_the_leases_have_run_out() -> None:
    """Past the rows' leases another claim owns them: the writer stops retrying (the rows
    come back through the queue) instead of piling them up for ever."""
    h = Harness()
    h.clock.now = NOW + 61.0
    h.store.failures.append(StoreUnavailable("sqlite: disk I/O error"))
    h.writer.add(attempt(1))
    await h.heard_of_a_batch.wait()
    await h.close()
    assert h.store.batches == [] and h.store.failures == []
    assert h.writer.unwritten == 0


async def test_the_writer_is_behind_until_its_backlog_is_written() -> None:
    """With 3 outcomes unwritten the writer says it is behind (the dispatcher then claims
    nothing more), and stops saying so once they are in the store."""
    h = Harness()
    h.store.gate.clear()
    for n in (1, 2):
        h.writer.add(attempt(n))
    assert not h.writer.behind
    h.writer.add(attempt(3))
    assert h.writer.behind
    h.store.gate.set()
    await h.close()
    assert not h.writer.behind


async def test_closing_writes_what_is_left_once_without_retrying() -> None:
    """At shutdown a failing store gets one try: the writer ends instead of retrying (the rows
    keep their leases and are claimed again after them)."""
    h = Harness()
    h.store.gate.clear()
    h.writer.add(attempt(1))
    await h.store.started.wait()
    h.store.failures.append(StoreUnavailable("down"))
    h.writer.close()
    h.store.gate.set()
    await asyncio.wait_for(h.task, timeout=5)
    assert h.store.batches == []


def test_when_a_row_is_due_again_after_its_outcome() -> None:
    """Retries and releases are due again (the dispatcher wakes for them); delivered and
    dead rows never are."""
    release = Release(claimed(), NOW + 3.0)
    assert due_again_at(attempt(1, "pending", NOW + 5.0)) == NOW + 5.0
    assert due_again_at(release) == NOW + 3.0
    assert due_again_at(attempt(1, "delivered")) is None
    assert due_again_at(attempt(1, "dead")) is None

"""The claiming loop alone: what it asks the store for, and where it hands each row.

A recording outbox stands in for the store and a scripted sink for the sink; the clock is
injected. The fallback timer is set to 30 s so that only the loop's own wake-ups move it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from receiver.breaker import Breaker
from receiver.metrics import Metrics
from receiver.outbox import Dispatcher, RetryPolicy
from tests.unit.outbox_doubles import NOW, Clock, RecordingOutbox, ScriptedSink, claimed

pytestmark = pytest.mark.timeout(10)  # a loop that never wakes fails fast, not after 5 min


@pytest.fixture
async def dispatch() -> AsyncIterator[Callable[..., Dispatcher]]:
    """Start a dispatcher for `sinks` (default: "erp") over an outbox; stopped after the test."""
    started: list[tuple[Dispatcher, asyncio.Task[None]]] = []

    def start(
        store: RecordingOutbox, sinks: tuple[str, ...] = ("erp",), **options: Any
    ) -> Dispatcher:
        dispatcher = Dispatcher(
            store,  # type: ignore[arg-type]  # the outbox methods the dispatcher uses
            {name: ScriptedSink(name=name) for name in sinks},
            {name: RetryPolicy() for name in sinks},
            Metrics(),
            clock=Clock(),
            poll_interval=30.0,
            **options,
        )
        started.append((dispatcher, asyncio.create_task(dispatcher.run())))
        return dispatcher

    yield start
    for dispatcher, task in started:
        await dispatcher.stop()
        await task


async def test_claimed_rows_are_sent_and_their_outcomes_written_back(
    dispatch: Callable[..., Dispatcher],
) -> None:
    """Two due rows are claimed in one go, sent, and written back as delivered."""
    store = RecordingOutbox(due=[[claimed(1), claimed(2)]])
    dispatch(store)
    await store.until(written=2)
    assert len(store.skipped) == 1
    assert sorted((a.delivery_id, a.state) for a in store.written) == [
        (1, "delivered"),
        (2, "delivered"),
    ]


async def test_a_paused_sink_is_skipped_by_the_claim(dispatch: Callable[..., Dispatcher]) -> None:
    """While a sink's circuit is open its rows stay in the queue: the claim skips that sink,
    and the other sink's rows are claimed as usual."""
    store = RecordingOutbox()
    dispatcher = dispatch(store, sinks=("erp", "crm"))
    dispatcher.senders["erp"].breaker = Breaker(open_until=NOW + 100.0, probing=True)
    await store.until(claims=1)
    assert store.skipped[0] == ["erp"]


async def test_a_row_for_a_sink_not_configured_goes_back_untouched_and_the_sink_is_skipped(
    dispatch: Callable[..., Dispatcher],
) -> None:
    """A row for a sink removed from the sinks file: handed back unsent with its attempts as
    they were, one warning, and later claims skip that sink."""
    store = RecordingOutbox(due=[[claimed(1, sink="gone", attempts=2)]])
    with structlog.testing.capture_logs() as logs:
        dispatch(store)
        await store.until(claims=2, written=1)
    ((handed_back,),) = store.batches
    assert handed_back.released and handed_back.attempt == 2
    assert store.skipped[1] == ["gone"]
    assert [e["sink"] for e in logs if e["event"] == "outbox.unknown_sink"] == ["gone"]

"""Stand-ins the dispatcher's parts are tested with: a clock a test moves, a sink that answers
from a script, a claimed row, and an outbox that records what it is asked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from receiver.models import Claimed, Delivery, Event
from receiver.sinks import Message, Receipt
from receiver.store import Attempt

NOW = 1_800_000_000.0  # an epoch second in 2027: far from 0, like the real clock


class Clock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Stopwatch:
    """A `timer` for send durations: each reading is `step` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.step, self.reading = step, 0.0

    def __call__(self) -> float:
        self.reading += self.step
        return self.reading


@dataclass
class ScriptedSink:
    """Answers each send with the next item of `script` (a Receipt, or an exception to
    raise); the last item answers for ever after. While `gate` is closed, sends wait."""

    script: list[Receipt | Exception] = field(default_factory=lambda: [Receipt(200, "ok")])
    name: str = "erp"
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[str] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.gate.set()

    async def until_in_flight(self, sends: int) -> None:
        """Return once `sends` sends are under way (waiting at the gate, if it is closed)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.in_flight >= sends)

    async def send(self, message: Message) -> Receipt:
        self.sent.append(message.event_id)
        async with self._arrived:
            self.in_flight += 1
            self._arrived.notify_all()
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        pass


def claimed(
    delivery_id: int = 1,
    *,
    sink: str = "erp",
    attempts: int = 0,
    last_error: str | None = None,
    lease_until: float = NOW + 60.0,
) -> Claimed:
    """A row claimed at NOW with a 60 s lease (by default), for an event of its own."""
    event = Event(
        id=f"evt_{delivery_id}",
        job_id="job_1",
        prediction_id="pred_1",
        status="completed",
        domain="document.invoice",
        source="callback",
        verification="hmac-sha256",
        received_at=NOW,
        body=b'{"id": "pred_1", "status": "completed"}',
    )
    delivery = Delivery(
        delivery_id, event.id, sink, "leased", attempts, NOW, NOW, NOW, last_error=last_error
    )
    return Claimed(delivery, event, lease_until, lease=1)


@dataclass
class RecordingOutbox:
    """An outbox whose `finish` records each batch; `failures` make the next calls raise;
    while `gate` is closed, a commit waits (as a slow store would). Successive claims return
    the lists in `due` (then nothing) and record the sinks they were told to skip."""

    batches: list[list[Attempt]] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    due: list[list[Claimed]] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)  # skip_sinks, claim by claim
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.gate.set()

    @property
    def written(self) -> list[Attempt]:
        """Every outcome written back so far, batch after batch."""
        return [a for batch in self.batches for a in batch]

    async def until(self, *, claims: int = 0, written: int = 0) -> None:
        """Return once this many claims have been made and outcomes written back."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self.skipped) >= claims and len(self.written) >= written
            )

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def claim(
        self, now: float, limit: int, lease_seconds: float, skip_sinks: Sequence[str] = ()
    ) -> list[Claimed]:
        self.skipped.append(list(skip_sinks))
        await self._note()
        return self.due.pop(0)[:limit] if self.due else []

    async def wait_for_work(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # no other writer: only the timer or a kick wakes us

    async def finish(self, attempts: Sequence[Attempt], now: float) -> None:
        self.started.set()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(list(attempts))
        await self._note()

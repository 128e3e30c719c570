"""`Breaker`: one sink's circuit breaker.

Closed, it lets every send through and counts consecutive failures. `threshold` of them open
it for a cool-down (`base_cooldown`, doubling on each failed probe, at most `max_cooldown`).
Once the cool-down is over it is half-open: exactly one send, the probe, goes out; its success
closes the circuit, its failure opens it again at once. A sink that is down thus costs one
send per cool-down instead of every waiting row's attempts.

Plain state and arithmetic over the `now` it is given: no clock, no I/O, no logging (the
sender that owns it says what happened).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Breaker:
    """Consecutive failures open the circuit for `cooldown` seconds (doubling, bounded)."""

    threshold: int = 5
    base_cooldown: float = 5.0
    max_cooldown: float = 600.0
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False  # half-open: the next send decides
    probe_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """The cool-down is over (or there never was one)."""
        return now >= self.open_until

    def holds_back(self, now: float) -> bool:
        """Rows for this sink should stay in the queue: cooling down, or a probe is out."""
        return not self.allows(now) or self.probe_in_flight

    def admits(self, now: float) -> bool:
        """A send may start now: closed, or half-open with no probe out yet."""
        return self.allows(now) and not (self.probing and self.probe_in_flight)

    def start(self) -> bool:
        """Note a send starting (after `admits`); True when it is the probe."""
        if self.probing:
            self.probe_in_flight = True
        return self.probing

    def probe_ended(self) -> None:
        self.probe_in_flight = False

    def success(self) -> bool:
        """Count a success; True when it closed the circuit (the probe got through)."""
        closed = self.probing
        self.failures, self.cooldown, self.open_until, self.probing = 0, 0.0, 0.0, False
        return closed

    def failure(self, now: float) -> bool:
        """Count a failure; True when this one opened the circuit."""
        self.failures += 1
        if self.failures < self.threshold and not self.probing:
            return False
        self.cooldown = min(self.max_cooldown, max(self.base_cooldown, self.cooldown * 2))
        self.open_until = now + self.cooldown
        self.probing = True  # the next attempt after the cool-down is a probe
        return True

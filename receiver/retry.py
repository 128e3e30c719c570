"""`RetryPolicy`: when a failed delivery is tried again, and when it is dead. The only retry code.

Retry schedule (delay before each attempt), by default the one Svix users know:
immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each delay ±20 % jitter; a sink's
`Retry-After` stretches a delay (bounded by `retry_after_max`). After the last attempt the
delivery is dead, and stays replayable. `RetryPolicy.exponential` builds a schedule from
`min(max, initial * base**(attempt-1))` for those who prefer a formula.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from receiver.config import SinkConfig

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

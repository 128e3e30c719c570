"""The retry policy and the circuit breaker."""

from __future__ import annotations

import random

from receiver.breaker import Breaker
from receiver.retry import SVIX_SCHEDULE, RetryPolicy


def test_default_schedule_is_svix_with_jitter() -> None:
    """Delays follow immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h within ±20 %."""
    policy = RetryPolicy()
    rng = random.Random(1)
    for made, base in enumerate(SVIX_SCHEDULE[1:], start=1):
        delay = policy.next_delay(made, rng=rng)
        assert delay is not None
        assert base * 0.8 <= delay <= base * 1.2
    assert policy.max_attempts == 8


def test_after_the_last_attempt_the_delivery_is_dead() -> None:
    """No delay after the schedule runs out: the caller marks the delivery dead."""
    assert RetryPolicy().next_delay(8) is None
    assert RetryPolicy(schedule=(0.0, 1.0)).next_delay(2) is None


def test_retry_after_stretches_the_delay_within_bounds() -> None:
    """A sink's Retry-After wins when longer than the schedule, capped at retry_after_max."""
    policy = RetryPolicy(schedule=(0.0, 5.0), jitter=0.0, retry_after_max=120.0)
    assert policy.next_delay(1, retry_after=60.0) == 60.0
    assert policy.next_delay(1, retry_after=1.0) == 5.0
    assert policy.next_delay(1, retry_after=86400.0) == 120.0


def test_exponential_formula() -> None:
    """`min(max, initial * base**(attempt-1))`, first attempt immediate."""
    policy = RetryPolicy.exponential(1.0, 2.0, 10.0, 6, jitter=0.0)
    assert policy.schedule == (0.0, 1.0, 2.0, 4.0, 8.0, 10.0)


def test_breaker_opens_after_consecutive_failures_and_closes_on_success() -> None:
    """Five failures in a row open the circuit for a cool-down; a success closes it."""
    b = Breaker(threshold=5, base_cooldown=5.0)
    assert not any(b.failure(100.0) for _ in range(4))
    assert b.failure(100.0)
    assert not b.allows(101.0) and b.allows(105.0)
    assert b.failure(106.0), "a failed probe reopens at once"
    assert b.cooldown == 10.0
    b.success()
    assert b.allows(106.0) and b.failures == 0

"""The circuit breaker alone: closed, open for a cool-down, half-open with one probe."""

from __future__ import annotations

from receiver.breaker import Breaker


def open_breaker(now: float = 100.0) -> Breaker:
    """A breaker (threshold 3, cool-down 5 s doubling to at most 20 s) just opened at `now`."""
    b = Breaker(threshold=3, base_cooldown=5.0, max_cooldown=20.0)
    assert [b.failure(now) for _ in range(3)] == [False, False, True]
    return b


def test_a_closed_breaker_lets_every_send_through_without_a_probe() -> None:
    """A healthy sink's sends all go out at once; none is singled out as a probe."""
    b = Breaker()
    assert b.admits(0.0) and not b.holds_back(0.0)
    assert [b.start() for _ in range(3)] == [False, False, False]
    assert b.admits(0.0)


def test_failures_short_of_the_threshold_are_forgotten_after_a_success() -> None:
    """Failures must come in a row to open the circuit: a success in between starts over."""
    b = Breaker(threshold=3)
    b.failure(1.0)
    b.failure(1.0)
    assert b.success() is False  # it was never open
    assert not b.failure(1.0) and not b.failure(1.0)
    assert b.admits(1.0)


def test_the_threshold_opens_the_circuit_for_the_cool_down() -> None:
    """The third failure in a row holds the sink's rows back for 5 s, then lets one through."""
    b = open_breaker(now=100.0)
    assert b.holds_back(100.0) and b.holds_back(104.9)
    assert not b.admits(104.9)
    assert b.admits(105.0) and not b.holds_back(105.0)


def test_after_the_cool_down_exactly_one_probe_goes_out() -> None:
    """Half-open: the first send is the probe; while it is out, the others wait."""
    b = open_breaker(now=100.0)
    assert b.start() is True
    assert not b.admits(105.0) and b.holds_back(105.0)
    b.probe_ended()
    assert b.admits(105.0)


def test_a_probe_that_gets_through_closes_the_circuit() -> None:
    """The sink is back: its rows flow again, and the next failure does not reopen at once."""
    b = open_breaker(now=100.0)
    b.start()
    b.probe_ended()
    assert b.success() is True
    assert b.admits(105.0) and not b.start()
    assert not b.failure(106.0)


def test_a_failed_probe_reopens_at_once_for_twice_as_long_up_to_the_bound() -> None:
    """Each failed probe doubles the cool-down (5, 10, 20 s), never beyond max_cooldown."""
    b = open_breaker(now=100.0)
    cooldowns = []
    now = 105.0
    for _ in range(3):
        assert b.failure(now), "a failed probe reopens the circuit"
        cooldowns.append(b.cooldown)
        assert not b.admits(now)
        now = b.open_until
    assert cooldowns == [10.0, 20.0, 20.0]

"""The restart policy's arithmetic: delays, jitter bounds and the sliding window (no sleeping)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from offloop._core.restart import RestartPolicy, RestartTracker


def test_delays_double_with_jitter_between_backoff_and_max_backoff() -> None:
    policy = RestartPolicy(backoff=0.5, max_backoff=4.0)
    rng = random.Random(7)
    for attempt, step in enumerate([1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        # Equal jitter: the upper half of the doubled step, never below backoff,
        # so even the first restarts of services that crashed together spread.
        assert min(delays) >= max(0.5, step / 2)
        assert max(delays) <= step
        assert max(delays) - min(delays) > step / 10, f"no jitter at attempt {attempt}"
    assert policy.delay(10_000, rng) <= 4.0  # huge attempt counts do not overflow


def test_zero_backoff_restarts_at_once() -> None:
    assert RestartPolicy(backoff=0, max_backoff=0).delay(5) == 0.0


def test_an_infinite_backoff_is_an_infinite_delay_not_nan() -> None:
    inf = float("inf")
    assert RestartPolicy(backoff=inf, max_backoff=inf).delay(0) == inf
    # Finite, but doubling it overflows: the delay is as long as a float goes.
    assert RestartPolicy(backoff=1e308, max_backoff=inf).delay(0) == inf
    assert RestartPolicy(backoff=1e308, max_backoff=1e308).delay(3) == 1e308


def test_tracker_counts_restarts_in_the_sliding_window() -> None:
    tracker = RestartTracker(
        RestartPolicy(backoff=1, max_backoff=1, max_restarts=2, restart_window=10),
        random.Random(1),
    )
    assert tracker.next_delay(0.0) == 1.0
    assert tracker.next_delay(1.0) == 1.0
    assert tracker.next_delay(2.0) is None  # a third restart within 10 s is one too many
    assert tracker.recent(2.0) == 2
    # Once the first restart leaves the window, there is room again.
    assert tracker.next_delay(10.5) == 1.0
    assert tracker.recent(10.5) == 2


def test_backoff_grows_with_recent_restarts_and_resets_when_calm() -> None:
    tracker = RestartTracker(
        RestartPolicy(backoff=1, max_backoff=100, max_restarts=None, restart_window=60),
        random.Random(3),
    )
    delays = [tracker.next_delay(float(t)) for t in range(5)]
    assert all(d is not None for d in delays)
    assert delays[4] is not None
    assert delays[4] >= 16.0  # the fifth restart: upper half of 1 * 2**5
    # An hour later the window is empty, so the next delay starts over at
    # the first step: between backoff and twice backoff.
    first = tracker.next_delay(3600.0)
    assert first is not None
    assert 1.0 <= first <= 2.0


def test_max_restarts_none_never_gives_up_and_zero_never_restarts() -> None:
    unlimited = RestartTracker(RestartPolicy(backoff=0, max_backoff=0, max_restarts=None))
    assert all(unlimited.next_delay(0.0) == 0.0 for _ in range(1000))
    never = RestartTracker(RestartPolicy(max_restarts=0))
    assert never.next_delay(0.0) is None


def test_restarts_after() -> None:
    assert RestartPolicy(restart="on-failure").restarts_after(crashed=True)
    assert not RestartPolicy(restart="on-failure").restarts_after(crashed=False)
    assert RestartPolicy(restart="always").restarts_after(crashed=False)
    assert not RestartPolicy(restart="no").restarts_after(crashed=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"restart": "sometimes"}, ValueError, "restart must be one of 'no', 'on-failure'"),
        ({"backoff": -1}, ValueError, "backoff must be at least 0 seconds, got -1"),
        ({"backoff": "1"}, TypeError, "backoff must be a number of seconds, got str"),
        ({"max_backoff": float("nan")}, ValueError, "max_backoff must be at least 0"),
        ({"backoff": 5, "max_backoff": 1}, ValueError, "max_backoff (1) must not be smaller"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be at least 0 (or None), got -1"),
        ({"max_restarts": 2.5}, TypeError, "max_restarts must be an int or None, got float"),
        ({"max_restarts": True}, TypeError, "max_restarts must be an int or None, got bool"),
        ({"restart_window": 0}, ValueError, "restart_window must be greater than 0 seconds"),
        (
            {"max_backoff": 10**400},
            ValueError,
            "max_backoff must be a number of seconds a float can hold, got a 401-digit number. "
            "Pass float('inf') instead.",
        ),
    ],
)
def test_bad_policy_values_are_named(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        RestartPolicy(**kwargs)
    assert message in str(info.value)

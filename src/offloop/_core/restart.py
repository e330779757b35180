"""Restart policy of a supervised service: when to restart and how long to wait.

The decision is pure (time and randomness are passed in), so it is tested
without sleeping.
"""

from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass
from typing import Final, Literal, get_args

from .validate import check_seconds, describe, show_number

__all__ = ["STARTUP_WINDOW", "RestartMode", "RestartPolicy", "RestartTracker"]

#: The start-up window of function services and scheduled jobs, seconds: as
#: supervisord's ``startsecs`` default. A bad token, a missing file or a
#: refused connection comes back from a first call well within it; a longer
#: window would make real crashes of a service that ran a while final. One
#: too short only lets a slow first call fail as a crash, retried as before.
STARTUP_WINDOW: Final = 1.0

RestartMode = Literal["no", "on-failure", "always"]
_MODES: tuple[str, ...] = get_args(RestartMode)


@dataclass(frozen=True)
class RestartPolicy:
    """How a service is restarted after it ends or crashes.

    Attributes:
        restart: ``"no"`` (never), ``"on-failure"`` (after a crash) or
            ``"always"`` (also after the service returned on its own).
        backoff: the first delay before a restart, in seconds.
        max_backoff: the largest delay; delays double up to it, with jitter.
        max_restarts: how many restarts are allowed within ``restart_window``
            seconds; one more crash marks the service failed. ``None``: no limit.
        restart_window: the sliding window, in seconds, restarts are counted in.
        retry_startup: whether a failure before the service was first ready
            (its ``start()`` raised) is retried like a crash. By default it is
            not: such an error is almost always configuration (a port in use,
            a missing path) that no restart fixes, so it fails at once.
        startup_window: seconds after the service's first ``start()``
            returned during which a crash still counts as a failure to start
            (not retried unless ``retry_startup``), as supervisord's
            ``startsecs``. For the function services, which are ready as soon
            as they run, so that a bad token raised by their first call is a
            start-up error. 0: only a failing ``start()`` is.
        start_timeout: seconds a ``start()`` may take before it is cancelled
            and the service stopped, as systemd's ``TimeoutStartSec``; the
            timeout counts as a failure to start (before the service was
            first ready) or a crash (on a restart). ``None`` (default): no
            limit, for a service may legitimately take long to load.

    Raises:
        TypeError, ValueError: an argument has the wrong type or range (the
            message names it).
    """

    restart: RestartMode = "on-failure"
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_restarts: int | None = 5
    restart_window: float = 60.0
    retry_startup: bool = False
    startup_window: float = 0.0
    start_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.restart not in _MODES:
            raise ValueError(
                f"restart must be one of {', '.join(map(repr, _MODES))}, got {self.restart!r}."
            )
        check_seconds(self.backoff, "backoff", positive=False)
        check_seconds(self.max_backoff, "max_backoff", positive=False)
        check_seconds(self.restart_window, "restart_window", positive=True)
        if self.max_backoff < self.backoff:
            raise ValueError(
                f"max_backoff ({self.max_backoff!r}) must not be smaller than "
                f"backoff ({self.backoff!r})."
            )
        if not isinstance(self.retry_startup, bool):
            raise TypeError(
                f"retry_startup must be True or False, got {describe(self.retry_startup)}."
            )
        # Finite: an endless window would make every crash of the first run
        # final, which restart="no" already says more plainly.
        check_seconds(self.startup_window, "startup_window", positive=False, finite=True)
        _check_start_timeout(self.start_timeout)
        mr = self.max_restarts
        if mr is not None:
            if isinstance(mr, bool) or not isinstance(mr, int):
                raise TypeError(f"max_restarts must be an int or None, got {describe(mr)}.")
            if mr < 0:
                raise ValueError(f"max_restarts must be at least 0 (or None), got {mr}.")

    def restarts_after(self, *, crashed: bool) -> bool:
        """Whether this policy wants a restart after a crash (or a normal end)."""
        if self.restart == "always":
            return True
        return crashed and self.restart == "on-failure"

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before restart number ``attempt`` (0-based) in the current window.

        "Equal jitter": it is picked at random in the upper half of a step that
        doubles with every attempt, starting at ``2 * backoff`` and capped at
        ``max_backoff``, and never below ``backoff``. So the first delay is
        between ``backoff`` and ``2 * backoff``, and services that crashed
        together do not restart in lockstep, not even the first time.
        """
        # Cap the exponent: 2**1100 overflows a float long before anyone waits that long.
        step = min(self.max_backoff, self.backoff * 2.0 ** min(attempt + 1, 64))
        if math.isinf(step):
            # An infinite backoff (or one that doubles past the largest float):
            # uniform() would make it NaN, logged as "restarting in nans".
            return step
        low = max(self.backoff, step / 2)
        return (rng or random).uniform(low, step)


def _check_start_timeout(value: object) -> None:
    # Finite and positive, or None: an infinite limit is no limit, which None
    # says plainly, and a limit of 0 would fail every start.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"start_timeout must be a number of seconds or None, got {describe(value)}. Pass "
            f"how long the service's start() may take (e.g. start_timeout=30), or None (the "
            f"default) for no limit."
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int with more than about 308 digits
        seconds = math.inf
    if not (0 < seconds < math.inf):  # NaN too
        raise ValueError(
            f"start_timeout must be a positive, finite number of seconds or None, got "
            f"{show_number(value)}. Pass how long the service's start() may take (e.g. "
            f"start_timeout=30), or None (the default) for no limit."
        )


class RestartTracker:
    """Counts one service's restarts in the sliding window and picks each delay."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng
        self._times: collections.deque[float] = collections.deque()

    def recent(self, now: float) -> int:
        """How many restarts happened within the window ending at ``now``."""
        window_start = now - self.policy.restart_window
        while self._times and self._times[0] <= window_start:
            self._times.popleft()
        return len(self._times)

    def next_delay(self, now: float) -> float | None:
        """Record a restart at ``now`` and return its delay, or ``None`` if it is one too many."""
        recent = self.recent(now)
        limit = self.policy.max_restarts
        if limit is not None and recent >= limit:
            return None
        self._times.append(now)
        return self.policy.delay(recent, self._rng)

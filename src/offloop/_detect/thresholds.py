"""The blocking detector's range of thresholds and intervals, and their checks.

Apart from the detector so that what only checks a threshold (the CLI flags,
``Supervisor(detect_blocking=...)``, the pytest marker) need not import it.
"""

from __future__ import annotations

from typing import Final

from .._core.validate import check_seconds, show_number

__all__ = [
    "MAX_THRESHOLD",
    "MIN_INTERVAL",
    "MIN_THRESHOLD",
    "check_interval",
    "check_threshold",
    "threshold_out_of_range",
]

#: The smallest threshold: a thread that wants the GIL may wait for one switch
#: interval (sys.getswitchinterval(), 5 ms) while another runs Python, so with
#: a threshold near that an idle loop, woken by the heartbeat, looks blocked.
MIN_THRESHOLD: Final = 0.01

#: The largest threshold, one day: far beyond any useful one, and far within
#: what the monitor's waits (threading.TIMEOUT_MAX) can take.
MAX_THRESHOLD: Final = 86400.0

#: The smallest interval: the monitor wakes every interval, and below this it
#: would take a CPU core to itself.
MIN_INTERVAL: Final = 0.001


def threshold_out_of_range(value: float, name: str) -> str | None:
    """Why ``value``, given as ``name``, is not a usable threshold; ``None`` if it is.

    For the options that pass a threshold on (``offloop run --detect-blocking``,
    ``offloop check --threshold``, ``Supervisor(detect_blocking=...)``): each
    checks it when given, with this one wording, rather than when the
    detector starts.
    """
    if MIN_THRESHOLD <= value <= MAX_THRESHOLD:  # NaN is refused too
        return None
    shown = f"{value:g}" if isinstance(value, float) else show_number(value)
    why = (
        f"below {MIN_THRESHOLD:g} s even an idle loop looks blocked"
        if value < MIN_THRESHOLD
        else "one day is the longest"
        if value > MAX_THRESHOLD
        else "it is not a number"
    )
    return (
        f"{name} must be between {MIN_THRESHOLD:g} and {MAX_THRESHOLD:g} seconds, got "
        f"{shown}; {why}"
    )


def check_threshold(value: object, where: str) -> float:
    """``value`` as a valid threshold in seconds; the errors name ``where``.

    Raises:
        TypeError: not a number.
        ValueError: not between :data:`MIN_THRESHOLD` and :data:`MAX_THRESHOLD`.
    """
    return check_seconds(
        value,
        "threshold",
        where=where,
        positive=True,
        low=MIN_THRESHOLD,
        high=MAX_THRESHOLD,
        why_low="below that an idle loop itself looks blocked, since a thread may wait 5 ms "
        "for the GIL",
    )


def check_interval(value: object, threshold: float, where: str) -> float:
    """``value`` as a valid interval for ``threshold`` (None: a quarter of it).

    Raises:
        TypeError: not a number.
        ValueError: below :data:`MIN_INTERVAL`, or above ``threshold``.
    """
    if value is None:
        return threshold / 4
    interval = check_seconds(
        value,
        "interval",
        where=where,
        positive=True,
        low=MIN_INTERVAL,
        high=MAX_THRESHOLD,
        why_low="the monitor thread would keep a CPU core busy",
    )
    if interval > threshold:
        raise ValueError(
            f"{where} needs interval to be at most threshold, got "
            f"interval={show_number(interval)} and threshold={show_number(threshold)}: the loop "
            f"is looked at once per interval, so a longer interval misses blocks over the "
            f"threshold. Leave interval out (it is threshold / 4) or pass one up to the threshold."
        )
    return interval

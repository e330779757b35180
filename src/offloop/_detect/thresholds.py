"""The blocking detector's range of thresholds and intervals, and their checks.

Apart from the detector so that what only checks a threshold (the CLI flags,
``Supervisor(detect_blocking=...)``, the pytest marker) need not import it.
"""

from __future__ import annotations

from typing import Final

from .._core.validate import describe

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


def _show(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"a {len(text.lstrip('-'))}-digit number"


def _check_seconds(value: object, name: str, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where} needs {name} as a number of seconds (e.g. {name}=0.1), got {describe(value)}."
        )
    if not value > 0:  # NaN too
        raise ValueError(
            f"{where} needs {name} to be a positive number of seconds, got {_show(value)}."
        )
    if value < low:
        raise ValueError(
            f"{where} needs {name} to be at least {low:g} seconds, got {_show(value)}: "
            + (
                "below that an idle loop itself looks blocked, since a thread may wait "
                "5 ms for the GIL"
                if name == "threshold"
                else "the monitor thread would keep a CPU core busy"
            )
            + f". Pass {name}={low:g} or more."
        )
    if value > high:
        raise ValueError(
            f"{where} needs {name} to be at most {high:g} seconds, got {_show(value)}. "
            f"Pass a number of seconds up to {high:g}."
        )
    return float(value)


def threshold_out_of_range(value: float, name: str) -> str | None:
    """Why ``value``, given as ``name``, is not a usable threshold; ``None`` if it is.

    For the options that pass a threshold on (``offloop run --detect-blocking``,
    ``offloop check --threshold``, ``Supervisor(detect_blocking=...)``): each
    checks it when given, with this one wording, rather than when the
    detector starts.
    """
    if MIN_THRESHOLD <= value <= MAX_THRESHOLD:  # NaN is refused too
        return None
    shown = f"{value:g}" if isinstance(value, float) else _show(value)
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
    return _check_seconds(value, "threshold", where, MIN_THRESHOLD, MAX_THRESHOLD)


def check_interval(value: object, threshold: float, where: str) -> float:
    """``value`` as a valid interval for ``threshold`` (None: a quarter of it).

    Raises:
        TypeError: not a number.
        ValueError: below :data:`MIN_INTERVAL`, or above ``threshold``.
    """
    if value is None:
        return threshold / 4
    interval = _check_seconds(value, "interval", where, MIN_INTERVAL, MAX_THRESHOLD)
    if interval > threshold:
        raise ValueError(
            f"{where} needs interval to be at most threshold, got interval={_show(interval)} "
            f"and threshold={_show(threshold)}: the loop is looked at once per interval, so a "
            f"longer interval misses blocks over the threshold. Leave interval out (it is "
            f"threshold / 4) or pass one up to the threshold."
        )
    return interval

"""``@sv.every(seconds)``: the plan of a fixed-period schedule, and the checks of both decorators.

The due times of :class:`EveryPlan` sit on a grid, ``start + first + k *
seconds``, so they never drift: a run that took long, or a loop that woke
late, delays that one run and not the ones after it. This is what a ``while
True: work(); await asyncio.sleep(seconds)`` loop gets wrong, its period being
``seconds`` plus the work plus every wake-up's lateness.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Final

from .._core.validate import check_seconds, describe
from .functions import check_service_function, is_async_function, takes_token
from .schedule import MISSED_AFTER, Clock, Missed, Overlap, Plan, ScheduledService

__all__ = ["EveryPlan", "check_policies", "make_every", "make_scheduled"]

OVERLAPS: Final = ("skip", "queue", "allow")
MISSEDS: Final = ("skip", "run_once")


class EveryPlan:
    """Due every ``seconds`` on a grid anchored at the start, the first ``first`` after it."""

    def __init__(self, seconds: float, first: float) -> None:
        self.seconds = seconds
        self.first_delay = first
        self._origin = 0.0

    def first(self, now: float) -> float:
        self._origin = now + self.first_delay
        return self._origin

    def _index(self, t: float) -> int:
        """The number of the last grid point at or before ``t``."""
        return math.floor((t - self._origin) / self.seconds)

    def after(self, t: float) -> float:
        k = max(self._index(t) + 1, 0)
        due = self._origin + k * self.seconds
        # Rounding may put the grid point a hair at or before t: the next one then.
        return due if due > t else due + self.seconds

    def latest(self, due: float, now: float) -> float:
        k_due, k_now = round((due - self._origin) / self.seconds), self._index(now)
        return due if k_now <= k_due else self._origin + k_now * self.seconds

    async def count(self, due: float, latest: float) -> tuple[int, bool]:
        # Arithmetic on the grid: exact and at once, however long the gap.
        return max(round((latest - due) / self.seconds), 0), True

    def window(self, due: float) -> float:
        return min(self.seconds, MISSED_AFTER)

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


def check_policies(overlap: object, missed: object, where: str) -> tuple[Overlap, Missed]:
    """``overlap`` and ``missed`` as their literals, or a ValueError naming the choices."""
    if overlap not in OVERLAPS:
        raise ValueError(
            f"{where} needs overlap to be 'skip' (drop a run whose time comes while the last "
            f"one still runs), 'queue' (run it once the last one ends) or 'allow' (run them "
            f"side by side), got {overlap!r}."
        )
    if missed not in MISSEDS:
        raise ValueError(
            f"{where} needs missed to be 'skip' (drop runs whose time passed while the "
            f"program was blocked or asleep) or 'run_once' (make up for them with one run), "
            f"got {missed!r}."
        )
    return overlap, missed


def make_scheduled(
    fn: Any,
    plan: Plan,
    where: str,
    *,
    name: str | None,
    overlap: Overlap,
    missed: Missed,
    jitter: float = 0.0,
    clock: Clock | None = None,
) -> ScheduledService:
    """Check ``fn`` and wrap it in the service that runs it whenever ``plan`` says.

    Raises:
        TypeError: ``fn`` is not an ``async def`` or plain ``def`` function that
            takes no argument (a plain one may take the StopToken), or ``name``
            is not a non-empty str.
    """
    check_service_function(fn, where)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"{where} needs name to be a non-empty str, got {describe(name)}.")
    named = fn.func if isinstance(fn, functools.partial) else fn
    svc_name = name or str(getattr(named, "__name__", None) or type(named).__name__)
    # An object whose __call__ is an 'async def' runs on the loop too, as under @sv.service.
    is_async = is_async_function(fn)
    pass_token = False
    if is_async:
        if any(p.default is p.empty for p in inspect.signature(fn).parameters.values()):
            raise TypeError(
                f"{where} got {describe(fn)}, which needs arguments. An 'async def' run takes "
                f"none: it is cancelled when the service stops. Bind arguments first, e.g. "
                f"with functools.partial."
            )
    else:
        pass_token = takes_token(fn, where)
    return ScheduledService(
        fn,
        svc_name,
        plan,
        is_async=is_async,
        pass_token=pass_token,
        overlap=overlap,
        missed=missed,
        jitter=jitter,
        clock=clock,
    )


def make_every(
    fn: Any,
    seconds: object,
    *,
    jitter: object,
    overlap: object,
    first: object,
    missed: object,
    name: str | None,
) -> ScheduledService:
    """The service behind ``@sv.every``; every argument is checked before anything happens.

    Raises:
        TypeError, ValueError: as documented on ``Supervisor.every``.
    """
    where = "@Supervisor.every"
    period = check_seconds(seconds, "seconds", where=where, positive=True, finite=True)
    spread = check_seconds(jitter, "jitter", where=where, positive=False, finite=True)
    if spread >= period:
        raise ValueError(
            f"{where} needs jitter to be less than seconds (the period), got jitter={spread:g} "
            f"and seconds={period:g}: each run may start up to jitter seconds after its due "
            f"time, and must not reach the next one."
        )
    delay = check_seconds(first, "first", where=where, positive=False, finite=True)
    ov, mi = check_policies(overlap, missed, where)
    return make_scheduled(
        fn, EveryPlan(period, delay), where, name=name, overlap=ov, missed=mi, jitter=spread
    )

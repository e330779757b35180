"""What a schedule is made of: the clock it runs on, its plan of due times, its status.

:class:`~offloop._services.schedule.ScheduledService` sleeps on a
:class:`Clock` until the next due time its :class:`Plan` gives
(``periodic.py``'s ``EveryPlan``, ``cron.py``'s ``CronPlan``), and reports
what it did as a :class:`ScheduleStatus`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = ["MISSED_AFTER", "Clock", "LoopClock", "Plan", "ScheduleStatus"]


#: A run reached more than this late is missed, however long its period: a
#: daily digest posted an hour late is a different decision from one a
#: second late, and ``missed=`` is where the user makes it.
MISSED_AFTER: Final = 60.0


class Clock(Protocol):
    """The time line a schedule runs on (seconds); tests inject their own."""

    def now(self) -> float:
        """The current time on this clock."""
        ...

    async def sleep_until(self, when: float) -> float:
        """Return ``when`` once ``now() >= when`` (or a little later).

        A clock that can be set back (the wall clock) returns sooner when it
        was: with ``when`` as the clock reads that instant now, that much
        earlier.
        """
        ...

    def to_wall(self, when: float) -> float:
        """``when`` as ``time.time()`` would give it, for the status."""
        ...


class LoopClock:
    """The event loop's monotonic clock, for ``every``: immune to wall-clock jumps."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, when: float) -> float:
        loop = asyncio.get_running_loop()
        # call_at with the absolute time: no delay recomputed from a stale 'now'.
        wake = loop.create_future()
        handle = loop.call_at(when, _settle, wake)
        try:
            await wake
        finally:
            handle.cancel()
        return when

    def to_wall(self, when: float) -> float:
        return time.time() + (when - asyncio.get_running_loop().time())


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Plan(Protocol):
    """When the runs of a schedule are due, on its clock's time line."""

    def first(self, now: float) -> float:
        """The first due time of a schedule started at ``now``."""
        ...

    def after(self, t: float) -> float:
        """The first due time strictly after ``t``."""
        ...

    def window(self, due: float) -> float:
        """How late the run due at ``due`` may start before it counts as missed."""
        ...

    def latest(self, due: float, now: float) -> float:
        """The latest due time at or before ``now`` (``due`` if none came after it).

        Called on the loop: it must not walk the due times in between.
        """
        ...

    async def count(self, due: float, latest: float) -> tuple[int, bool]:
        """How many due times come after ``due`` up to ``latest`` (included), and
        whether that is exact (``False``: at least that many, the count was cut).

        It may take a while after a long sleep: it gives the loop back as it goes.
        """
        ...

    def describe(self) -> str:
        """The schedule in words, for reprs and logs."""
        ...


@dataclass(frozen=True)
class ScheduleStatus:
    """The schedule of an ``@sv.every`` or ``@sv.cron`` service (``ServiceStatus.schedule``).

    Attributes:
        schedule: the schedule in words, e.g. ``"every 30s"`` or ``"cron '30 18 * * *' (UTC)"``.
        next_run: the wall-clock time (``time.time()``) the next run is due, or
            ``None`` while the service is not running.
        runs: runs that ended since the service was added.
        missed: due times that passed without their run on time (the program
            was blocked or asleep), since the service was added. At least this
            many if ``missed_exact`` is ``False``.
        overlapped: due times that found the previous run still going and were
            skipped (``overlap="skip"``) or folded into one queued run.
        last_duration: seconds the last finished run took, or ``None``.
        last_error: the exception the last run raised, or ``None`` if it returned.
        missed_exact: ``False`` once a count of missed runs was cut short: after
            the machine slept (or its clock jumped) past a million due times of
            a cron schedule, they are counted up to that bound only.
        failures: runs that raised, since the service was added (counted in ``runs`` too).
        last_success: the wall-clock time (``time.time()``) the last run that
            returned ended, or ``None`` if none has: the figure to alert on for
            a job that must keep working (see ``offloop_schedule_last_success_timestamp_seconds``).
    """

    schedule: str
    next_run: float | None
    runs: int
    missed: int
    overlapped: int
    last_duration: float | None
    last_error: BaseException | None
    missed_exact: bool = True
    failures: int = 0
    last_success: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the error becomes its ``repr``)."""
        error = None if self.last_error is None else repr(self.last_error)
        return {
            "schedule": self.schedule,
            "next_run": self.next_run,
            "runs": self.runs,
            "missed": self.missed,
            "overlapped": self.overlapped,
            "last_duration": self.last_duration,
            "last_error": error,
            "missed_exact": self.missed_exact,
            "failures": self.failures,
            "last_success": self.last_success,
        }

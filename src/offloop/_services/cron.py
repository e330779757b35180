"""``@sv.cron("30 18 * * *")``: the plan of a cron schedule, from the ``cronsim`` package.

cronsim (the ``[cron]`` extra) parses the expression and walks its due times;
it is the parser behind healthchecks.io, has no dependencies and follows
time-zone rules (a run at 02:30 on the night the clocks skip 02:00-03:00 is
run once, as cron does). The plan works in wall-clock seconds
(``time.time()``), the time line of :class:`WallClock`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any, Final

from .._core.extras import require
from .._core.validate import describe
from .periodic import check_policies, make_scheduled
from .schedule import MISSED_AFTER, Clock, ScheduledService

__all__ = ["CronPlan", "WallClock", "make_cron"]

#: How many missed due times ``count`` walks after a long sleep before it stops
#: counting and reports "at least" that many: a per-minute schedule asleep for a
#: week has about 10,000, for a year about 525,000. A wall clock that jumps by
#: decades (a board without a battery-backed clock, set by NTP after boot) would
#: otherwise keep the scheduler counting for minutes before its next sleep.
COUNT_LIMIT = 1_000_000

#: ``count`` gives the loop back after this many due times: each costs some
#: microseconds of cronsim and time-zone arithmetic (more in local time, whose
#: tzinfo is Python code), so a slice holds the loop for milliseconds, however
#: long the machine slept.
COUNT_SLICE: Final = 250


_EPOCH: Final = dt.datetime(1970, 1, 1)

#: The longest single sleep on the wall clock: it is read again after that,
#: since it can jump (NTP, a suspended machine) and a sleep on the loop's
#: monotonic clock does not see it.
WALL_NAP = 30.0

#: How far the wall clock must go back, against the monotonic clock, to count
#: as set back. NTP slews both clocks alike and steps only past 0.128 s; the
#: two readings themselves are microseconds apart.
SET_BACK: Final = 1.0


class WallClock:
    """``time.time()``, for cron: the schedule is in wall-clock terms.

    It tells a clock that was set back from one that runs on by comparing it
    with the monotonic clock, which nobody sets: their difference moves only
    when the wall clock is set (or, forward, while the machine is suspended).
    The clocks it reads can be passed in, for tests.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall, self._monotonic = wall, monotonic
        # wall - monotonic at the last now(): the due time slept for was
        # computed from that reading.
        self._offset: float | None = None

    def _read(self) -> tuple[float, float]:
        wall = self._wall()
        return wall, wall - self._monotonic()

    def now(self) -> float:
        wall, self._offset = self._read()
        return wall

    async def sleep_until(self, when: float) -> float:
        wall, offset = self._read()
        since = offset if self._offset is None else self._offset
        while True:
            if offset - since < -SET_BACK:
                return when + (offset - since)
            if wall >= when:
                return when
            await asyncio.sleep(min(when - wall, WALL_NAP))
            wall, offset = self._read()

    def to_wall(self, when: float) -> float:
        return when


class _LocalTime(dt.tzinfo):
    """The machine's local time (``TZ``, ``/etc/localtime``) as a tzinfo, DST changes included.

    cronsim applies cron's rules for the days the clocks change (a job at a
    fixed time runs once, a wildcard one in both passes of a repeated hour, a
    time skipped runs at the change) only to an aware datetime: a naive one is
    walked as if no clock ever changed, and its ``.timestamp()`` then reads a
    repeated hour's times as their first pass only. This zone answers from the
    C library's local time, as ``datetime.timestamp()`` and ``fromtimestamp()``
    do for naive datetimes, ``fold`` included.
    """

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        if when is None:
            when = dt.datetime.now()
        local = when.replace(tzinfo=None)  # keeps fold: the pass of a repeated hour
        return (local - _EPOCH) - dt.timedelta(seconds=local.timestamp())

    def dst(self, when: dt.datetime | None) -> None:
        return None

    def tzname(self, when: dt.datetime | None) -> str:
        return "local time"

    def fromutc(self, when: dt.datetime) -> dt.datetime:
        # fromtimestamp() sets fold=1 on the second pass of a repeated hour.
        stamp = (when.replace(tzinfo=None) - _EPOCH).total_seconds()
        return dt.datetime.fromtimestamp(stamp).replace(tzinfo=self)

    def __repr__(self) -> str:
        return "_LocalTime()"


class CronPlan:
    """The due times of a cron expression in a time zone (``None``: the machine's local time)."""

    def __init__(self, expr: str, tz: dt.tzinfo | None, tz_name: str) -> None:
        self._cronsim = require("cronsim", "cron", feature="Supervisor.cron")
        self.expr = expr
        self.tz = tz
        self._zone = tz if tz is not None else _LocalTime()
        self.tz_name = tz_name
        self._walk(0.0)  # refuses a bad expression now, at decoration time

    def _walk(self, t: float) -> Any:
        # Aware datetimes even for tz=None (_LocalTime): cronsim handles the
        # days the clocks change only for those.
        start = dt.datetime.fromtimestamp(t, self._zone).replace(microsecond=0)
        return iter(self._cronsim.CronSim(self.expr, start))

    def first(self, now: float) -> float:
        return self.after(now)

    def after(self, t: float) -> float:
        for when in self._walk(t):
            stamp = float(when.timestamp())
            if stamp > t:
                return stamp
        raise AssertionError("cronsim's walk ended")  # pragma: no cover - it is endless

    def latest(self, due: float, now: float) -> float:
        # A bisection on after(), whatever the gap: walking every due time from
        # `due` to `now` would hold the loop for as long as the machine slept.
        if self.after(due) > now:
            return due
        lo, hi = due, now  # after(lo) <= now < after(hi)
        # Due times are whole seconds: once hi - lo <= 1, (lo, hi] holds one at
        # most, and after(lo) is in it (after(hi) is past now); nothing later is
        # at or before now.
        while hi - lo > 1.0:
            mid = (lo + hi) / 2
            if self.after(mid) <= now:
                lo = mid
            else:
                hi = mid
        return self.after(lo)

    async def count(self, due: float, latest: float) -> tuple[int, bool]:
        passed = 0
        if latest <= due:
            return passed, True
        for when in self._walk(due):
            stamp = float(when.timestamp())
            if stamp <= due:
                continue
            if stamp > latest:
                break
            passed += 1
            if stamp == latest:
                break
            if passed >= COUNT_LIMIT:
                return passed, False
            if passed % COUNT_SLICE == 0:
                await asyncio.sleep(0)  # the loop's turn: see COUNT_SLICE
        return passed, True

    def window(self, due: float) -> float:
        return min(self.after(due) - due, MISSED_AFTER)

    def describe(self) -> str:
        return f"cron {self.expr!r} ({self.tz_name})"


def _zone(tz: object) -> tuple[dt.tzinfo | None, str]:
    if tz is None:
        return None, "local time"
    if isinstance(tz, dt.tzinfo):
        return tz, str(tz)
    if isinstance(tz, str) and tz:
        import zoneinfo

        try:
            return zoneinfo.ZoneInfo(tz), tz
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"@Supervisor.cron got tz={tz!r}, which is not a time zone this machine knows. "
                f"Pass an IANA name such as 'Europe/Paris' or 'UTC' (on a machine without the "
                f"system's zone database, install the 'tzdata' package), or None for local time."
            ) from None
    raise TypeError(
        f"@Supervisor.cron needs tz to be an IANA time-zone name (e.g. 'UTC'), a "
        f"datetime.tzinfo or None (local time), got {describe(tz)}."
    )


def make_cron(
    fn: Any,
    expr: object,
    *,
    tz: object,
    overlap: object,
    missed: object,
    name: str | None,
    clock: Clock | None = None,
) -> ScheduledService:
    """The service behind ``@sv.cron``; every argument is checked before anything happens.

    Raises:
        TypeError, ValueError: as documented on ``Supervisor.cron``.
        MissingExtraError: the ``[cron]`` extra is not installed.
    """
    where = "@Supervisor.cron"
    if not isinstance(expr, str):
        raise TypeError(
            f"{where} needs the schedule as a cron expression str such as '30 18 * * *' "
            f"(minute hour day-of-month month day-of-week), got {describe(expr)}."
        )
    fields = expr.split()
    if len(fields) in (6, 7):
        # cronsim would read a sixth field as seconds *first*; croniter (behind
        # aiomisc's CronService) reads it as seconds *last*, Quartz as seconds
        # first and some crons as a year: the same string means different times
        # to each, so it is refused rather than read one way silently.
        raise ValueError(
            f"{where} got the cron expression {expr!r} with {len(fields)} fields; expr "
            f"needs the five fields of crontab, minute hour day-of-month month day-of-week "
            f"(e.g. '30 18 * * *'). Cron libraries disagree on what a sixth field means "
            f"(seconds first, seconds last as croniter and aiomisc read it, or a year), so "
            f"offloop does not guess: drop it, and for runs more often than once a minute "
            f"use @sv.every(seconds)."
        )
    zone, zone_name = _zone(tz)
    ov, mi = check_policies(overlap, missed, where)
    try:
        plan = CronPlan(expr, zone, zone_name)
    except Exception as exc:
        cronsim = require("cronsim", "cron", feature="Supervisor.cron")
        if not isinstance(exc, cronsim.CronSimError):
            raise
        raise ValueError(
            f"{where} cannot read the cron expression {expr!r}: {exc}. It needs five fields, "
            f"minute hour day-of-month month day-of-week, e.g. '30 18 * * *' for 18:30 daily."
        ) from None
    return make_scheduled(
        fn,
        plan,
        where,
        name=name,
        overlap=ov,
        missed=mi,
        clock=clock if clock is not None else WallClock(),
    )

"""A cron schedule whose wall clock is set back: it goes on from the time the clock reads.

The clock is the cron service's own :class:`WallClock`, given a wall clock and
a monotonic clock that the test sets by hand (and short naps, so that it reads
them often): setting the wall clock back is moving it alone.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator

import pytest

from offloop import Supervisor
from offloop._services import cron
from offloop._services.cron import WallClock, make_cron
from tests.helpers import QUICK_WAIT, await_until, bounded

UTC = dt.timezone.utc


def stamp(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


class SetClocks:
    """A wall clock and a monotonic one that move only when the test moves them."""

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def set_wall(self, wall: float) -> None:
        self.wall = wall


def hourly_job(
    clocks: SetClocks, name: str
) -> tuple[Supervisor, list[float], Callable[[], float | None]]:
    """A supervisor ``name`` with an hourly cron job on ``clocks``: it, the job's runs
    (the wall time of each), and a reader of its next run."""
    runs: list[float] = []

    async def hourly() -> None:
        runs.append(clocks.wall)

    svc = make_cron(hourly, "0 * * * *", tz="UTC", overlap="skip", missed="skip", name="hourly")
    svc.clock = WallClock(lambda: clocks.wall, lambda: clocks.mono)
    sv = Supervisor(name=name)
    sv.add(svc)

    def next_run() -> float | None:
        schedule = sv.status()["hourly"].schedule
        return None if schedule is None else schedule.next_run

    return sv, runs, next_run


class SetBackLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "set back" in record.msg:
            self.messages.append(record.getMessage())


@pytest.fixture
def set_back_log() -> Iterator[SetBackLog]:
    log = SetBackLog()
    logger = logging.getLogger("offloop.supervisor")
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_clock_set_back_from_the_future_runs_the_job_when_due_by_the_clock_set_right(
    monkeypatch: pytest.MonkeyPatch, set_back_log: SetBackLog
) -> None:
    monkeypatch.setattr(cron, "WALL_NAP", 0.005)
    # The machine booted with its clock in 2098; the hourly job is due at 11:00.
    clocks = SetClocks(stamp(2098, 1, 1, 10, 59))
    sv, runs, next_run = hourly_job(clocks, "rtc")

    async with sv:
        await await_until(lambda: next_run() == stamp(2098, 1, 1, 11, 0), QUICK_WAIT, "asleep")
        # NTP sets the clock right, 72 years back. The run was a minute away: it
        # still is, at 10:00 by the clock as it reads now, not in 72 years.
        clocks.set_wall(stamp(2026, 1, 5, 9, 59))
        await await_until(
            lambda: next_run() == stamp(2026, 1, 5, 10, 0), QUICK_WAIT, "the run rescheduled"
        )
        clocks.advance(60)
        await await_until(lambda: len(runs) == 1, QUICK_WAIT, "the run at 10:00")
        assert runs == [stamp(2026, 1, 5, 10, 0)]
        await await_until(
            lambda: next_run() == stamp(2026, 1, 5, 11, 0), QUICK_WAIT, "the next hour"
        )
        # A clock set back two seconds just after a run does not run it again.
        clocks.advance(1)
        clocks.set_wall(clocks.wall - 2)
        await await_until(lambda: len(set_back_log.messages) == 2, QUICK_WAIT, "noticed")
        assert next_run() == stamp(2026, 1, 5, 11, 0)
        schedule = sv.status()["hourly"].schedule
        assert schedule is not None
        assert schedule.missed == 0
    assert runs == [stamp(2026, 1, 5, 10, 0)]
    first, second = set_back_log.messages
    years = stamp(2098, 1, 1, 10, 59) - stamp(2026, 1, 5, 9, 59)
    assert f"set back by {years:.0f}s" in first, first
    assert "comes in 60s" in first, first
    assert "set back by 2s" in second, second


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_clock_set_back_noticed_after_the_due_instant_runs_the_job_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Set back during the last nap before the run (or while the loop was
    # blocked): by the time it is noticed, the instant the run was due at has
    # passed on the clock set right. The run is due now, not an hour later.
    monkeypatch.setattr(cron, "WALL_NAP", 0.005)
    clocks = SetClocks(stamp(2026, 1, 5, 10, 59) + 50)  # 10:59:50; due at 11:00
    sv, runs, next_run = hourly_job(clocks, "late-notice")

    async with sv:
        await await_until(lambda: next_run() == stamp(2026, 1, 5, 11, 0), QUICK_WAIT, "asleep")
        # 10 s pass, and the clock is set back an hour: the due instant reads
        # 10:00:00 on it, and it reads 10:00:00.01 now.
        clocks.mono += 10.01
        clocks.wall = stamp(2026, 1, 5, 10, 0) + 0.01
        await await_until(lambda: len(runs) == 1, QUICK_WAIT, "the run due at the set-back")
        await await_until(
            lambda: next_run() == stamp(2026, 1, 5, 11, 0), QUICK_WAIT, "the next hour"
        )
    assert runs == [stamp(2026, 1, 5, 10, 0) + 0.01]

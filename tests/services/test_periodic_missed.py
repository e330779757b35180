"""Counting the runs a cron schedule missed after a long sleep, without stalling the loop.

A machine suspended for days (or a wall clock set forward) leaves thousands of
due times behind a per-minute job. The count walks them, and the walk must
leave the loop running: the loop's responsiveness is what offloop is for, and
/healthz answers from that loop. The clock is the hand-moved one of
test_periodic.py; a task beside the service ticks on every turn of the loop,
so a count done in one piece shows as (almost) no ticks while it runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import pytest

from offloop import Supervisor
from offloop._services import cron
from offloop._services.cron import CronPlan, _zone, make_cron
from offloop._services.periodic import EveryPlan
from offloop._services.schedule import ScheduleStatus
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.services.test_periodic import HandClock, stamp

DAY = 86400.0


class Ticker:
    """Counts the turns of the loop: a task that does nothing but yield."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class MissedLog(logging.Handler):
    """Keeps each 'missed' warning with the ticker's count when it was logged."""

    def __init__(self, ticker: Ticker) -> None:
        super().__init__(logging.WARNING)
        self.ticker = ticker
        self.records: list[tuple[logging.LogRecord, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "missed" in record.msg:
            self.records.append((record, self.ticker.ticks))


async def sleep_through(days: float) -> tuple[ScheduleStatus, MissedLog, int]:
    """Run a per-minute cron job, wake it ``days`` (and 30 s) after its first due time.

    Returns its schedule's status, the missed warnings with the ticks at each,
    and the ticks when the clock was woken. The supervisor is stopped on return.
    """
    start = stamp(2026, 1, 5, 9, 0)
    clock, runs = HandClock(start), []
    svc = make_cron(
        lambda: runs.append(clock.now()),
        "* * * * *",
        tz="UTC",
        overlap="skip",
        missed="skip",
        name="minutely",
    )
    svc.clock = clock
    sv = Supervisor(name="asleep")
    sv.add(svc)
    logger = logging.getLogger("offloop.supervisor")
    async with Ticker() as ticker:
        log = MissedLog(ticker)
        logger.addHandler(log)
        try:
            async with sv:
                await clock.asleep(1)
                assert clock.targets == [start + 60]
                # Asleep for `days`: the due time right before the wake is 30 s old,
                # within its minute, so it runs; all the others were missed.
                await clock.wake_at(start + 60 + days * DAY + 30)
                woken = ticker.ticks
                await clock.asleep(2)
                assert clock.targets[1] == start + 60 + days * DAY + 60
                await await_until(lambda: len(runs) == 1, QUICK_WAIT, "the run on time")
                assert runs == [start + 60 + days * DAY + 30]
                await await_until(lambda: bool(log.records), QUICK_WAIT, "the missed warning")
                schedule = sv.status()["minutely"].schedule
        finally:
            logger.removeHandler(log)
    assert schedule is not None
    return schedule, log, woken


@pytest.mark.loops("asyncio", "uvloop")
@bounded(10)
async def test_counting_runs_missed_over_days_asleep_is_exact_and_keeps_the_loop_turning() -> None:
    days = 10
    schedule, log, woken = await sleep_through(days)
    # Every minute of the ten days but the one that ran: due at start+60 (reached
    # ten days late) up to the minute before the one that ran.
    assert schedule.missed == days * 1440
    assert schedule.missed_exact
    [(record, ticks)] = log.records
    assert f"missed {days * 1440} run(s)" in record.getMessage(), record.getMessage()
    # The count walked 14,400 due times; done in one piece it lets the ticker
    # turn once or twice between the wake and the warning. Done in slices that
    # give the loop back, it turns once per slice.
    assert ticks - woken >= 10, f"the loop turned {ticks - woken} times during the count"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_count_cut_at_its_limit_says_at_least_and_the_run_due_now_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cron, "COUNT_LIMIT", 1000)
    schedule, log, _ = await sleep_through(3)  # 4,320 missed: more than the limit
    assert (schedule.missed, schedule.missed_exact) == (1000, False)
    assert schedule.to_dict()["missed_exact"] is False
    [(record, _)] = log.records
    assert "at least" in record.getMessage(), record.getMessage()


def brute_force(plan: CronPlan, due: float, now: float) -> tuple[float, int]:
    """The latest due time at or before ``now`` and the count after ``due``, one by one."""
    latest, passed, t = due, 0, due
    while (t := plan.after(t)) <= now:
        latest, passed = t, passed + 1
    return latest, passed


@pytest.mark.parametrize(
    "expr", ["* * * * *", "*/15 * * * *", "30 2 * * *", "0 9-17 * * 1-5", "* 3 1 * *"]
)
@pytest.mark.parametrize("tz", ["America/New_York", None])
def test_the_latest_due_time_and_the_count_match_a_walk_across_the_clock_changes(
    expr: str, tz: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Local time (tz=None) is New York's too, for the test.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        zone, name = _zone(tz)
        plan = CronPlan(expr, zone, name)
        # Over the autumn change (in UTC: 06:00 on 1 Nov), the spring one (07:00
        # on 8 Mar), and the end of a short month.
        for begin, end in (
            ((2026, 10, 31, 22, 7), (2026, 11, 1, 9, 1)),
            ((2026, 3, 7, 23, 59), (2026, 3, 9, 9, 30)),
            ((2026, 2, 27, 0, 0), (2026, 3, 2, 2, 0)),
        ):
            due = dt.datetime(*begin, tzinfo=dt.timezone.utc).timestamp()
            now = dt.datetime(*end, tzinfo=dt.timezone.utc).timestamp()
            latest, passed = brute_force(plan, due, now)
            assert plan.latest(due, now) == latest, (expr, tz, begin)
            assert asyncio.run(plan.count(due, latest)) == (passed, True), (expr, tz, begin)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_interval_schedule_counts_its_missed_runs_by_arithmetic() -> None:
    plan = EveryPlan(0.5, 0.0)
    origin = plan.first(1000.0)
    due = origin + 3 * 0.5
    # A year asleep: far past any walk's limit, yet exact and at once.
    now = due + 365 * DAY + 0.2
    latest = plan.latest(due, now)
    assert latest == origin + (3 + 365 * 2 * 86400) * 0.5
    assert asyncio.run(plan.count(due, latest)) == (365 * 2 * 86400, True)
    assert plan.latest(due, due + 0.4) == due

"""Scheduled services (@sv.every, @sv.cron): the schedule, missed runs, overlap, crashes, stop.

The schedule is driven by a clock the test moves by hand: the service sleeps
"until" a time the test reads, and wakes when the test says what time it is.
The cron tests use real cron expressions through cronsim.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import threading
import time
from typing import Any

import pytest

import offloop
from offloop import ServiceFailed, StopToken, Supervisor
from offloop._services.cron import make_cron
from offloop._services.periodic import EveryPlan, make_scheduled
from offloop._services.plan import ScheduleStatus
from offloop._services.schedule import Missed, Overlap, ScheduledService
from tests.helpers import QUICK_WAIT, await_until, bounded

UTC = dt.timezone.utc


class HandClock:
    """A clock that moves only when the test moves it; it records every sleep's target."""

    def __init__(self, now: float) -> None:
        self.t = now
        self.targets: list[float] = []
        self._wake: asyncio.Event | None = None
        self.woken = 0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> float:
        self.targets.append(when)
        self._wake = asyncio.Event()
        await self._wake.wait()
        return when

    def to_wall(self, when: float) -> float:
        return when

    async def asleep(self, count: int) -> None:
        """Wait until the service has gone to sleep ``count`` times in all."""
        await await_until(lambda: len(self.targets) >= count, QUICK_WAIT, f"sleep #{count}")

    async def wake_at(self, t: float | None = None) -> None:
        """Set the time (by default: the time it sleeps until) and wake the service."""
        self.woken += 1
        await self.asleep(self.woken)
        assert self._wake is not None
        self.t = self.targets[-1] if t is None else t
        self._wake.set()


def every(
    fn: Any,
    seconds: float,
    clock: HandClock,
    *,
    first: float = 0.0,
    overlap: Overlap = "skip",
    missed: Missed = "skip",
) -> ScheduledService:
    plan = EveryPlan(seconds, first)
    where = "test"
    return make_scheduled(fn, plan, where, name=None, overlap=overlap, missed=missed, clock=clock)


def stamp(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@bounded(10)
async def test_every_keeps_to_its_grid_however_late_each_run_starts() -> None:
    clock, runs = HandClock(100.0), []

    async def job() -> None:
        runs.append(clock.now())

    sv = Supervisor(name="grid")
    sv.add(every(job, 10, clock, first=5))
    async with sv:
        await clock.asleep(1)
        assert clock.targets == [105.0]
        await clock.wake_at(108.5)  # woke 3.5 s late (a busy loop)
        await clock.asleep(2)
        # The next run is due on the grid, not 10 s after the late one.
        assert clock.targets[1] == 115.0
        await clock.wake_at()
        await clock.asleep(3)
        assert clock.targets == [105.0, 115.0, 125.0]
        assert runs == [108.5, 115.0]
        st = sv.status()["job"].schedule
        assert st is not None
        assert (st.runs, st.missed, st.next_run, st.last_error) == (2, 0, 125.0, None)
        assert st.schedule == "every 10s"
        assert st.last_duration is not None
        assert st.last_duration >= 0


@pytest.mark.parametrize(
    ("missed", "runs_after_sleep"), [("skip", 0), ("run_once", 1)], ids=["skip", "run_once"]
)
@bounded(10)
async def test_runs_missed_while_asleep_are_skipped_or_made_up_once(
    missed: Missed, runs_after_sleep: int
) -> None:
    clock, runs = HandClock(0.0), []
    sv = Supervisor(name="asleep")
    sv.add(every(lambda: runs.append(clock.now()), 100, clock, first=100, missed=missed))
    async with sv:
        await clock.wake_at(130)  # 30 s late: within the minute, it still runs
        await clock.asleep(2)
        await await_until(lambda: len(runs) == 1, QUICK_WAIT, "the late run")
        # Asleep from 200 to 395: 200 and 300 have passed; 300 by more than 60 s.
        await clock.wake_at(395)
        await clock.asleep(3)
        assert clock.targets == [100, 200, 400]
        await await_until(lambda: len(runs) == 1 + runs_after_sleep, QUICK_WAIT, "runs")
        schedule = sv.status()["<lambda>"].schedule
        assert schedule is not None
        assert schedule.missed == 2
    assert runs == [130, 395][: 1 + runs_after_sleep]


@bounded(10)
async def test_cron_runs_at_the_times_of_a_real_expression_in_its_time_zone() -> None:
    paris = offloop_zone("Europe/Paris")
    # The day before the clocks go forward in Paris (2026-03-29): 18:30 in
    # Paris is 17:30 UTC on the 28th and 16:30 UTC on the 29th.
    clock, runs = HandClock(stamp(2026, 3, 28, 17, 0)), []

    async def digest() -> None:
        runs.append(dt.datetime.fromtimestamp(clock.now(), paris).strftime("%d %H:%M %Z"))

    sv = Supervisor(name="cron")
    svc = make_cron(
        digest, "30 18 * * *", tz="Europe/Paris", overlap="skip", missed="skip", name=None
    )
    svc.clock = clock
    sv.add(svc)
    async with sv:
        await clock.asleep(1)
        assert clock.targets == [stamp(2026, 3, 28, 17, 30)]
        status = sv.status()["digest"].schedule
        assert status is not None
        assert status.next_run == stamp(2026, 3, 28, 17, 30)
        assert status.schedule == "cron '30 18 * * *' (Europe/Paris)"
        await clock.wake_at()
        await clock.asleep(2)
        assert clock.targets[1] == stamp(2026, 3, 29, 16, 30)
        await clock.wake_at()
        await clock.asleep(3)
    assert runs == ["28 18:30 CET", "29 18:30 CEST"]


def offloop_zone(name: str) -> dt.tzinfo:
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


@pytest.mark.parametrize(("missed", "expected"), [("skip", 0), ("run_once", 1)])
@bounded(10)
async def test_cron_run_reached_over_a_minute_late_is_missed(missed: Missed, expected: int) -> None:
    clock, runs = HandClock(stamp(2026, 1, 5, 9, 0)), []
    svc = make_cron(
        lambda: runs.append(1),
        "*/15 9-17 * * 1-5",
        tz="UTC",
        overlap="skip",
        missed=missed,
        name="poll",
    )
    svc.clock = clock
    sv = Supervisor(name="late-cron")
    sv.add(svc)
    async with sv:
        await clock.asleep(1)
        assert clock.targets == [stamp(2026, 1, 5, 9, 15)]
        await clock.wake_at(stamp(2026, 1, 5, 9, 16, 1))  # 61 s late
        await clock.asleep(2)
        assert clock.targets[1] == stamp(2026, 1, 5, 9, 30)
        await await_until(lambda: len(runs) == expected, QUICK_WAIT, "runs")
        # Friday 17:45 is the last run of the week: the next is Monday 9:00.
        await clock.wake_at(stamp(2026, 1, 9, 17, 45))
        await clock.asleep(3)
        assert clock.targets[2] == stamp(2026, 1, 12, 9, 0)
        schedule = sv.status()["poll"].schedule
        assert schedule is not None
        # Each quarter hour from 9:15 on Monday to 17:30 on Friday passed unrun.
        assert schedule.missed == 5 * 36 - 2


@pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
@bounded(10)
async def test_a_run_due_while_the_last_one_runs_follows_overlap(overlap: Overlap) -> None:
    clock = HandClock(0.0)
    started: list[str] = []
    release = threading.Event()

    def slow(token: StopToken) -> None:
        started.append(threading.current_thread().name)
        release.wait(QUICK_WAIT)

    sv = Supervisor(name="overlap")
    sv.add(every(slow, 1, clock, overlap=overlap))
    async with sv:
        await clock.wake_at()
        await await_until(lambda: len(started) == 1, QUICK_WAIT, "the first run")
        await clock.wake_at()  # due again at 1.0 while the first still runs
        await clock.wake_at()  # and at 2.0
        await clock.asleep(4)
        expected = {"skip": 1, "queue": 1, "allow": 3}[overlap]
        await await_until(lambda: len(started) == expected, QUICK_WAIT, "side-by-side runs")
        release.set()
        # The two due meanwhile make one queued run, once the first ended.
        total = {"skip": 1, "queue": 2, "allow": 3}[overlap]
        await await_until(
            lambda: (s := sv.status()["slow"].schedule) is not None and s.runs == total,
            QUICK_WAIT,
            "the runs to end",
        )
        schedule = sv.status()["slow"].schedule
        assert schedule is not None
        assert schedule.overlapped == {"skip": 2, "queue": 2, "allow": 0}[overlap]
    assert set(started) == {"offloop-service-slow"}
    assert len(started) == total


@bounded(10)
async def test_a_run_that_raises_follows_the_restart_policy() -> None:
    calls: list[int] = []
    sv = Supervisor(name="policy")

    # retry_startup: the first run raises at once, inside the start-up window.
    @sv.every(0.005, backoff=0, max_backoff=0, retry_startup=True)
    async def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the API is down")

    async with sv:
        await await_until(lambda: len(calls) >= 3, QUICK_WAIT, "runs after the restart")
        st = sv.status()["flaky"]
        assert st.restarts == 1
        assert isinstance(st.last_error, ConnectionError)
        assert st.state == "running"


@bounded(10)
async def test_a_run_that_raises_with_restart_no_fails_the_supervisor() -> None:
    sv = Supervisor(name="no-restart")

    @sv.every(0.01, restart="no")
    def broken() -> None:
        raise KeyError("missing")

    with pytest.raises(ServiceFailed, match="'broken' failed") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, KeyError)
    schedule = sv.status()["broken"].schedule
    assert schedule is not None
    assert isinstance(schedule.last_error, KeyError)
    assert sv.status()["broken"].to_dict()["schedule"]["last_error"] == "KeyError('missing')"


@bounded(10)
async def test_stopping_sets_the_token_of_a_sync_run_and_cancels_an_async_one() -> None:
    sv = Supervisor(name="stop", grace=QUICK_WAIT)
    in_sync, in_async = threading.Event(), asyncio.Event()
    seen: list[str] = []

    @sv.every(3600)
    def sync_job(token: StopToken) -> None:
        assert offloop.current_token() is token
        in_sync.set()
        seen.append(f"token set: {token.wait(QUICK_WAIT)}")

    @sv.every(3600)
    async def async_job() -> None:
        in_async.set()
        try:
            await asyncio.sleep(QUICK_WAIT)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async with sv:
        await asyncio.wait_for(in_async.wait(), QUICK_WAIT)
        await await_until(in_sync.is_set, QUICK_WAIT, "the sync run")
    assert sorted(seen) == ["cancelled", "token set: True"]
    assert {st.state for st in sv.status().values()} == {"stopped"}


def job() -> None:
    """A valid job."""


@pytest.mark.parametrize(
    ("decorate", "error", "words"),
    [
        (lambda sv: sv.every(0), ValueError, "seconds to be a positive"),
        (lambda sv: sv.every("5"), TypeError, "seconds as a number"),
        (lambda sv: sv.every(float("inf")), ValueError, "seconds"),
        (lambda sv: sv.every(1, jitter=1), ValueError, "jitter to be less than seconds"),
        (lambda sv: sv.every(1, jitter=-1), ValueError, "jitter to be at least 0"),
        (lambda sv: sv.every(1, first=-2), ValueError, "first to be at least 0"),
        (lambda sv: sv.every(1, overlap="drop"), ValueError, "overlap to be 'skip'"),
        (lambda sv: sv.every(1, missed="all"), ValueError, "missed to be 'skip'"),
        (lambda sv: sv.every(1, backoff=-1), ValueError, "backoff"),
        (lambda sv: sv.cron("61 * * * *"), ValueError, "cannot read the cron expression '61"),
        (lambda sv: sv.cron("* * *"), ValueError, "five fields"),
        # cronsim would take "0" as seconds (every 5 minutes); croniter, whose
        # sixth field is seconds last, every second of each 5th hour's minute 0.
        (lambda sv: sv.cron("0 */5 * * * *"), ValueError, "with 6 fields; expr needs the five"),
        (lambda sv: sv.cron("*/5 * * * * 30"), ValueError, "seconds last as croniter"),
        (lambda sv: sv.cron("0 0 12 * * ? 2030"), ValueError, "with 7 fields"),
        (lambda sv: sv.cron(30), TypeError, "cron expression str"),
        (lambda sv: sv.cron("0 * * * *", tz="Mars/Base"), ValueError, "not a time zone"),
        (lambda sv: sv.cron("0 * * * *", tz=5), TypeError, "IANA time-zone name"),
        (lambda sv: sv.every(1)(lambda x, y: None), TypeError, "needs the arguments (x, y)"),
        (lambda sv: sv.every(1)(None), TypeError, "needs an 'async def' or plain 'def'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_registered(
    decorate: Any, error: type[Exception], words: str
) -> None:
    sv = Supervisor(name="bad")
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        decorate(sv)(job)
    assert sv.services == {}


def test_a_coroutine_object_is_refused_and_closed() -> None:
    async def job() -> None: ...

    sv = Supervisor(name="coro")
    coro = job()
    with pytest.raises(TypeError, match="coroutine object"):
        sv.every(1)(coro)  # type: ignore[type-var,unused-coroutine]
    # Closed: no "never awaited" warning follows.
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_the_decorators_return_the_function_and_name_the_service() -> None:
    sv = Supervisor(name="names")
    assert sv.every(5, name="poller")(job) is job
    assert sv.cron("30 18 * * *", tz="UTC")(job) is job
    assert list(sv.services) == ["poller", "job"]
    assert repr(sv.services["poller"]).startswith("<ScheduledService 'poller' idle every 5s")
    assert "cron '30 18 * * *' (UTC)" in repr(sv.services["job"])
    with pytest.raises(ValueError, match="already has a service named 'poller'"):
        sv.every(5, name="poller")(job)


class AsyncJob:
    """An object whose __call__ is an 'async def': iscoroutinefunction() says False of it."""

    def __init__(self) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def __call__(self) -> None:
        self.loops.append(asyncio.get_running_loop())


class AsyncJobWithArgument:
    async def __call__(self, when: float) -> None: ...


@bounded(10)
async def test_an_object_with_an_async_call_runs_on_the_loop_as_under_service() -> None:
    sv = Supervisor(name="callable", grace=1)
    poll, digest = AsyncJob(), AsyncJob()
    sv.every(0.01, name="poll")(poll)
    sv.cron("30 18 * * *", tz="UTC", name="digest")(digest)
    for svc in sv.services.values():
        # It used to run in a thread, where calling it only made a coroutine:
        # its first run failed the supervisor ("returned a coroutine").
        assert isinstance(svc, ScheduledService)
        assert svc.is_async
    async with sv:
        await await_until(lambda: len(poll.loops) >= 2, QUICK_WAIT, "two runs on the loop")
        assert sv.status()["poll"].state == "running"
    assert set(poll.loops) == {asyncio.get_running_loop()}
    # And one that needs an argument is refused at the decorator, as an 'async def' is.
    with pytest.raises(TypeError, match="which needs arguments"):
        sv.every(1)(AsyncJobWithArgument())


@bounded(10)
async def test_status_from_another_thread_shows_the_next_run_as_wall_clock_time() -> None:
    sv = Supervisor(name="wall")
    sv.every(3600, first=1800, name="hourly")(job)
    async with sv:
        schedule = await asyncio.to_thread(lambda: sv.status()["hourly"].schedule)
        assert schedule is not None
        assert schedule.next_run is not None
        # Due half an hour after the start, on the wall clock (a minute of slack
        # for a slow machine; the point is the time line, not the precision).
        assert abs(schedule.next_run - (time.time() + 1800)) < 60
        assert (schedule.runs, schedule.last_duration, schedule.last_error) == (0, None, None)
    after = sv.status()["hourly"].schedule
    assert after is not None
    assert after.next_run is None  # stopped: no next run


@pytest.fixture
def new_york_local_time(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The machine's local time is New York's for the test (TZ and tzset)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def due_times(expr: str, tz: str | None, start: dt.datetime, count: int) -> list[float]:
    plan = make_cron(job, expr, tz=tz, overlap="skip", missed="skip", name=None).plan
    out, t = [], start.timestamp()
    for _ in range(count):
        t = plan.after(t)
        out.append(t)
    return out


@pytest.mark.parametrize("expr", ["*/15 * * * *", "0 * * * *", "30 1 * * *", "30 2 * * *"])
def test_cron_in_local_time_keeps_the_days_the_clocks_change_as_in_its_named_zone(
    expr: str, new_york_local_time: None
) -> None:
    ny = offloop_zone("America/New_York")
    for night in (
        dt.datetime(2026, 11, 1, 0, 50, tzinfo=ny),
        dt.datetime(2026, 3, 8, 0, 50, tzinfo=ny),
    ):
        named = due_times(expr, "America/New_York", night, 8)
        # Every quarter hour of the hour lived twice in November runs twice, as
        # in the named zone (cron runs such a job "normally"); 02:30 on the
        # night that skips it runs once, at 03:00, not at 03:30.
        assert due_times(expr, None, night, 8) == named, [
            dt.datetime.fromtimestamp(t, ny).strftime("%m-%d %H:%M %Z") for t in named
        ]


@bounded(10)
async def test_a_crash_beside_a_running_run_is_logged_when_it_happens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # overlap="allow": the service's run, and the supervisor's "crashed" line,
    # end only with the run still going, here one that does not honour its token.
    clock = HandClock(0.0)
    release = threading.Event()
    runs: list[int] = []

    def job() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            assert release.wait(QUICK_WAIT)
        else:
            raise ConnectionError("the API is down")

    sv = Supervisor(name="allow", grace=QUICK_WAIT)
    sv.add(every(job, 1, clock, overlap="allow"), restart="no")
    serving = asyncio.get_running_loop().create_task(sv.serve())
    try:
        await clock.wake_at()
        await await_until(lambda: len(runs) == 1, QUICK_WAIT, "the first run")
        await clock.wake_at()  # the second run, beside the first, crashes
        await await_until(
            lambda: any("a run crashed" in r.getMessage() for r in caplog.records),
            QUICK_WAIT,
            "the crash to be logged while the first run goes on",
        )
        assert not release.is_set()
        assert not serving.done()
        (record,) = [r for r in caplog.records if "a run crashed" in r.getMessage()]
        assert record.levelname == "ERROR"
        assert record.getMessage() == (
            "allow: service 'job': a run crashed with ConnectionError('the API is down'); "
            "the service stops once its 1 other run(s) end"
        )
        assert record.exc_info is not None
    finally:
        release.set()
    with pytest.raises(ServiceFailed) as info:
        await serving
    assert isinstance(info.value.__cause__, ConnectionError)


@bounded(10)
@pytest.mark.parametrize("worked", [True, False])
async def test_a_schedule_that_worked_goes_on_with_its_grid_after_a_crash(worked: bool) -> None:
    # An hourly job whose API is down for a minute must not be retried at the
    # restart's pace (which would use up the restart budget in seconds and
    # fail the program): restarted, it runs at its next due time. A job that
    # never worked starts afresh, and fails fast.
    clock, runs = HandClock(100.0), []

    async def job() -> None:
        runs.append(clock.now())
        if len(runs) == (2 if worked else 1):
            raise ConnectionError("the API is down")

    sv = Supervisor(name="resume")
    sv.add(every(job, 10, clock, first=5), backoff=0, max_backoff=0, retry_startup=True)
    async with sv:
        await clock.asleep(1)
        assert clock.targets == [105.0]
        if worked:
            await clock.wake_at()  # runs, and works
            await clock.asleep(2)
            assert clock.targets[1] == 115.0
        await clock.wake_at(clock.targets[-1] + 1)  # this run raises
        # The crashed schedule went to sleep once more before it was stopped
        # (until 125, or 115); then the restarted one does.
        restarted = 4 if worked else 3
        await clock.asleep(restarted)
        assert sv.status()["job"].restarts == 1
        # Worked: the next grid point after the crash (116 -> 125); never
        # worked: a fresh schedule, first=5 after the restart (106 -> 111).
        assert clock.targets[restarted - 2 :] == ([125.0, 125.0] if worked else [115.0, 111.0])
        schedule = sv.status()["job"].schedule
        assert schedule is not None
        assert schedule.next_run == clock.targets[-1]


@bounded(10)
async def test_a_crash_after_a_run_that_worked_is_restarted_even_within_the_startup_window() -> (
    None
):
    # A job every 10 ms whose second run meets an outage: the first run showed
    # that its configuration works, so the crash, within the start-up window
    # as it is, is restarted instead of failing the program as a bad start.
    calls: list[int] = []
    sv = Supervisor(name="worked")

    @sv.every(0.01, backoff=0, max_backoff=0)
    async def poll() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("the API is down")

    async with sv:
        await await_until(lambda: len(calls) >= 3, QUICK_WAIT, "a run after the restart")
        st = sv.status()["poll"]
        assert st.restarts == 1
        assert st.state == "running"
        assert st.schedule is not None
        assert st.schedule.failures == 1


@bounded(10)
async def test_a_job_slower_than_its_schedule_is_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # overlap="skip" drops the runs due while one is going: a job always
    # slower than its schedule runs at half the rate or less, which the
    # status alone would keep quiet about. One WARNING per streak of them.
    clock = HandClock(100.0)
    gates: list[threading.Event] = []

    def job(token: StopToken) -> None:
        gate = threading.Event()
        gates.append(gate)
        gate.wait(QUICK_WAIT)

    sv = Supervisor(name="slow")
    sv.add(every(job, 10, clock))
    caplog.set_level("WARNING", logger="offloop.supervisor")

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "came due while" in r.getMessage()]

    def schedule() -> ScheduleStatus:
        status = sv.status()["job"].schedule
        assert status is not None
        return status

    async with sv:
        await clock.wake_at()  # 100: the first run starts, and holds
        await await_until(lambda: len(gates) == 1, QUICK_WAIT, "the first run")
        await clock.wake_at()  # 110: skipped
        await clock.wake_at()  # 120: skipped, not said again
        await clock.asleep(4)
        assert schedule().overlapped == 2
        (message,) = warned()
        assert "slow: service 'job': a run of every 10s came due while the last one" in message
        assert "it was skipped (overlap='skip')" in message
        gates[0].set()
        await await_until(lambda: schedule().runs == 1, QUICK_WAIT, "the first run to end")
        await clock.wake_at()  # 130: on time, the streak ends
        await await_until(lambda: len(gates) == 2, QUICK_WAIT, "the second run")
        await clock.wake_at()  # 140: skipped: a new streak, said again
        await clock.asleep(6)
        assert len(warned()) == 2
        gates[1].set()

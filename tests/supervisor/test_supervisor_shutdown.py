"""Supervisor: stopping is thread-safe, bounded by grace, and never restarts anything."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import pytest

import offloop
from offloop import Service, StopToken, Supervisor
from offloop._supervisor import signals
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_stop_during_restart_backoff_does_not_wait_for_it() -> None:
    sv = Supervisor()

    @sv.service(backoff=3600, max_backoff=3600, retry_startup=True)
    async def broken() -> None:
        raise ValueError("nope")

    async with sv:
        await await_until(lambda: sv.status()["broken"].state == "restarting", WAIT)
        assert sv.status()["broken"].restarts == 0  # the restart is still to come
    assert sv.status()["broken"].state == "stopped"
    # It never came, so it is not counted (it used to say restarts=1).
    assert sv.status()["broken"].restarts == 0


@bounded(10)
async def test_stop_is_thread_safe() -> None:
    sv = Supervisor()
    running = threading.Event()

    @sv.service
    def worker(token: StopToken) -> None:
        running.set()
        token.wait()

    def stop_from_a_thread() -> None:
        assert running.wait(WAIT)
        sv.stop()

    thread = threading.Thread(target=stop_from_a_thread)
    thread.start()
    try:
        await sv.serve()
    finally:
        thread.join(WAIT)
    assert sv.state == "stopped"
    sv.stop()  # stopping a stopped supervisor does nothing


@pytest.mark.loops("asyncio")
@pytest.mark.allow_leaks  # checks the abandoned thread itself, then ends it
@bounded(10)
async def test_shutdown_is_bounded_and_reports_an_abandoned_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    sv = Supervisor(grace=0.2, name="sv")
    started = threading.Event()
    release = threading.Event()

    @sv.service
    def deaf() -> None:
        started.set()
        release.wait(WAIT)  # ignores its token on purpose

    @sv.service
    def polite(token: StopToken) -> None:
        token.wait()

    try:
        async with sv:
            await await_until(started.is_set, WAIT)
        abandoned = [t for t in threading.enumerate() if t.name == "offloop-service-deaf"]
        assert len(abandoned) == 1
        assert abandoned[0].is_alive()
        assert abandoned[0].daemon
        assert sv.status()["polite"].state == "stopped"  # still stopped after the grace ran out
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "sv: service 'deaf' did not stop within the grace period; killed it" in warnings
        report = next(w for w in warnings if "abandoned" in w)
        assert report.startswith("sv: service 'deaf' abandoned thread 'offloop-service-deaf'")
        assert "in deaf\n    release.wait(WAIT)" in report  # its current stack
        # Stopped, but not cleanly: the status and one summary line say so.
        status = sv.status()
        assert (status["deaf"].state, status["deaf"].killed) == ("stopped", True)
        assert (status["polite"].state, status["polite"].killed) == ("stopped", False)
        assert status["deaf"].to_dict()["killed"] is True
        assert "killed" in repr(status["deaf"])
        assert warnings[-1].startswith(
            "sv: stopped, but 1 service(s) did not stop politely and were killed: 'deaf'."
        )
        assert not any(r.getMessage() == "sv: stopped" for r in caplog.records)
    finally:
        release.set()
    abandoned[0].join(WAIT)
    assert not abandoned[0].is_alive()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_coroutine_that_swallows_cancellation_is_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(grace=0.1)
    swallowed = 0

    @sv.service
    async def sulky() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1
        await asyncio.sleep(3600)  # the second cancellation (kill) ends it

    async with sv:
        pass
    assert swallowed == 1
    assert any("'sulky' did not stop within the grace period" in m for m in caplog.messages)


class SlowStop(Service):
    """Takes its time to stop, so the test can act while the shutdown is under way."""

    name = "slow"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()
        self._ended = asyncio.Event()

    async def start(self) -> None:
        self._ended.clear()

    async def wait(self) -> None:
        await self._ended.wait()

    async def stop(self) -> None:
        self.stopping.set()
        await self.release.wait()
        self._ended.set()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_crash_during_shutdown_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(name="sv")
    crash_now = threading.Event()

    @sv.service(backoff=0, max_backoff=0)
    def early(token: StopToken) -> None:
        crash_now.wait(WAIT)
        raise ValueError("late crash")

    slow = sv.add(SlowStop())

    async def run() -> None:
        async with sv:
            pass

    task = asyncio.create_task(run())
    await asyncio.wait_for(slow.stopping.wait(), WAIT)  # the shutdown is stopping 'slow'
    crash_now.set()
    await await_until(lambda: sv.status()["early"].state == "stopped", WAIT)
    slow.release.set()
    await asyncio.wait_for(task, WAIT)
    status = sv.status()["early"]
    assert status.restarts == 0
    assert repr(status.last_error) == "ValueError('late crash')"
    assert "sv: service 'early' crashed while stopping: ValueError('late crash')" in caplog.messages
    assert sv.state == "stopped"


@bounded(10)
async def test_services_stop_even_when_their_runner_tasks_were_cancelled() -> None:
    # What asyncio.run() does on Python 3.10 at Ctrl-C: it cancels every task.
    sv = Supervisor()
    got_token = threading.Event()

    @sv.service
    def worker(token: StopToken) -> None:
        token.wait()
        got_token.set()

    async with sv:
        runners = {t for t in asyncio.all_tasks() if t.get_name() == "offloop-supervise-worker"}
        assert len(runners) == 1
        for task in runners:
            task.cancel()
        await asyncio.wait(runners)
        assert not got_token.is_set()
    assert got_token.is_set()
    assert sv.status()["worker"].state == "stopped"


@pytest.mark.loops("asyncio")
@pytest.mark.allow_leaks  # checks the abandoned loop thread itself, then ends it
@bounded(10)
async def test_loop_service_blocked_in_sync_code_is_abandoned_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(grace=0.2, name="sv")
    blocking = threading.Event()
    release = threading.Event()

    @sv.service(isolate="loop")
    async def frozen() -> None:
        blocking.set()
        release.wait(WAIT)  # blocks its own loop: cancellation cannot reach it

    try:
        async with sv:
            await await_until(blocking.is_set, WAIT)
        report = next(m for m in caplog.messages if "abandoned" in m)
        assert report.startswith(
            "sv: service 'frozen' abandoned thread 'offloop-loop-service-frozen', currently at:"
        )
        assert "in frozen\n    release.wait(WAIT)" in report
        assert "asyncio" not in report  # only the user's frames
        assert sv.status()["frozen"].state == "stopped"
    finally:
        release.set()
    stuck = [t for t in threading.enumerate() if t.name == "offloop-loop-service-frozen"]
    for thread in stuck:
        thread.join(WAIT)
        assert not thread.is_alive()


class BrokenStop(Service):
    """A service whose stop() raises instead of stopping."""

    name = "broken"

    async def start(self) -> None:
        self._ended = asyncio.Event()

    async def wait(self) -> None:
        await self._ended.wait()

    async def stop(self) -> None:
        raise OSError("the socket was already gone")

    def kill(self) -> list[str]:
        self._ended.set()
        return []


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_stop_that_raises_is_logged_as_such_and_the_service_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(name="broken-stop", grace=5)
    sv.add(BrokenStop())
    with caplog.at_level(logging.INFO, logger="offloop"):
        async with sv:
            pass
    assert sv.status()["broken"].state == "stopped"
    assert "stopping service 'broken' raised" in caplog.text
    assert "OSError: the socket was already gone" in caplog.text
    assert "service 'broken' could not be stopped politely (its stop() raised); killed it" in (
        caplog.text
    )
    assert "grace period" not in caplog.text  # it did not wait out the 5 s grace either


class DeafStop(Service):
    """A stop() that swallows its cancellation and ends only once kill() was called."""

    name = "deaf-stop"

    def __init__(self) -> None:
        self.cancelled = 0

    async def start(self) -> None:
        self._ended = asyncio.Event()
        self.killed = asyncio.Event()

    async def wait(self) -> None:
        await self._ended.wait()

    async def stop(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1  # e.g. a client library that retries on cancellation
        await self.killed.wait()

    def kill(self) -> list[str]:
        self.killed.set()
        self._ended.set()
        return []


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_stop_that_swallows_its_cancellation_does_not_hold_up_the_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Waiting for the cancelled stop() to end would deadlock: it only ends once killed.
    sv = Supervisor(grace=0.2, name="sv")
    svc = sv.add(DeafStop())
    async with sv:
        pass
    assert svc.cancelled == 1
    assert sv.status()["deaf-stop"].state == "stopped"
    assert "sv: service 'deaf-stop' did not stop within the grace period; killed it" in (
        caplog.messages
    )
    # The abandoned stop() ends once killed: nothing is left on the loop.
    stoppers = [t for t in asyncio.all_tasks() if t.get_name() == "offloop-stop-deaf-stop"]
    await asyncio.wait_for(asyncio.gather(*stoppers), WAIT)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_errors_raised_while_stopping_are_recorded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(grace=5, name="sv")
    running = threading.Event()
    entered = asyncio.Event()

    @sv.service
    def flusher(token: StopToken) -> None:
        running.set()
        token.wait()
        raise OSError("could not flush the buffer")

    @sv.service
    async def closer() -> None:
        try:
            entered.set()
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("could not close the connection")

    with caplog.at_level(logging.INFO, logger="offloop"):
        async with sv:
            await await_until(running.is_set, WAIT)
            await asyncio.wait_for(entered.wait(), WAIT)
    status = sv.status()
    assert repr(status["flusher"].last_error) == "OSError('could not flush the buffer')"
    assert repr(status["closer"].last_error) == "RuntimeError('could not close the connection')"
    assert status["flusher"].state == status["closer"].state == "stopped"
    crashed = [m for m in caplog.messages if "crashed while stopping" in m]
    assert sorted(crashed) == [
        "sv: service 'closer' crashed while stopping: "
        "RuntimeError('could not close the connection')",
        "sv: service 'flusher' crashed while stopping: OSError('could not flush the buffer')",
    ]
    assert sv.state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_stop_that_raises_becomes_the_last_error() -> None:
    sv = Supervisor(name="broken-stop", grace=5)
    sv.add(BrokenStop())
    async with sv:
        pass
    assert repr(sv.status()["broken"].last_error) == "OSError('the socket was already gone')"


@pytest.mark.loops("asyncio")
@pytest.mark.allow_leaks  # abandons deaf threads on purpose, then ends them itself
@bounded(20)
async def test_many_stuck_services_still_stop_in_about_grace() -> None:
    # Each stuck service used to get its last chance after the one before: 0.1 s apiece.
    count, grace = 30, 0.3
    sv = Supervisor(grace=grace, name="sv")
    release = threading.Event()
    started: list[str] = []

    def deaf() -> None:
        started.append("one more")
        release.wait(WAIT)  # ignores its token on purpose

    for i in range(count):
        sv.service(name=f"deaf{i}")(deaf)
    try:
        async with sv:
            await await_until(lambda: len(started) == count, WAIT)
            began = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - began
        assert all(st.state == "stopped" for st in sv.status().values())
        # The bound is grace + SHUTDOWN_OVERRUN (0.4 s); the rest is slack for a loaded
        # machine. 30 last chances one after another would take 3 s more.
        assert took < grace + 1.0, took
    finally:
        release.set()
    for thread in [t for t in threading.enumerate() if t.name.startswith("offloop-service-deaf")]:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_run_logs_leftover_tasks_that_raise_or_ignore_their_cancellation(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stubborn task never ends, so the whole wait is spent: keep it short.
    monkeypatch.setattr(signals, "LEFTOVER_WAIT", 0.1)
    keep: list[asyncio.Task[None]] = []

    async def raises_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    async def ignores_its_cancellation() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()

    sv = Supervisor(name="leftovers")

    @sv.service(restart="no")
    async def leaves_tasks() -> None:
        keep.append(asyncio.create_task(raises_when_cancelled(), name="raiser"))
        keep.append(asyncio.create_task(ignores_its_cancellation(), name="stubborn"))

    with caplog.at_level(logging.WARNING, logger="offloop.supervisor"):
        assert sv.run() == 0
    said = "leftovers: task raiser raised while stopping"
    raised = [r for r in caplog.records if r.getMessage() == said]
    assert len(raised) == 1
    assert raised[0].exc_info is not None
    assert isinstance(raised[0].exc_info[1], ValueError)
    assert "leftovers: abandoned task stubborn, which ignores cancellation" in caplog.messages
    assert keep[0].done()
    assert not keep[1].done()
    # Abandoned by design, on a loop now closed: no "destroyed but pending" at exit.
    keep[1]._log_destroy_pending = False  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", ["service", "task of the service", "thread service"])
@bounded(10)
async def test_a_service_that_closes_its_own_supervisor_is_stopped_with_the_others(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    # aclose() waits for the stop, which stops the service that awaits it: that
    # service must end as its turn comes (its await raises CancelledError), not
    # wait for itself until grace runs out and be killed (which the log would say).
    sv = Supervisor(grace=3)
    after: list[str] = []

    async def close_it() -> None:
        await sv.aclose()
        after.append("aclose() returned")  # never: the service is stopped

    def in_a_thread(token: StopToken) -> None:
        with contextlib.suppress(offloop.CallerGoneError):
            offloop.from_thread(close_it)

    async def in_a_task() -> None:
        task = asyncio.create_task(close_it())
        try:
            await task
        finally:
            task.cancel()  # the service's own task, which it ends as it stops

    if where == "thread service":
        sv.service(name="boss")(in_a_thread)
    else:
        sv.service(name="boss")(in_a_task if where == "task of the service" else close_it)

    @sv.service
    async def other() -> None:
        await asyncio.Event().wait()

    with caplog.at_level(logging.INFO, logger="offloop.supervisor"):
        await sv.serve()
    assert {name: st.state for name, st in sv.status().items()} == {
        "boss": "stopped",
        "other": "stopped",
    }
    assert after == []
    assert "killed" not in caplog.text
    assert caplog.records[-1].getMessage() == f"{sv.name}: stopped"
    assert not any(st.killed for st in sv.status().values())
    assert "did not stop within the grace period" not in caplog.text

"""A supervisor started with ``start()`` whose event loop ends without ``aclose()``.

``asyncio.run`` cancels the tasks left when ``main()`` returns. The
supervisor takes that as a stop: the thread services' tokens are set, the
usual shutdown runs (a thread that ignores its token is abandoned and
reported), and the supervisor ends ``stopped`` with one warning naming the
fix. The tests run their own ``asyncio.run`` (plain functions, not on the
suite's loop runner) and wait for the thread with an event.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import offloop
from tests.conftest import new_loop, run_on
from tests.helpers import QUICK_WAIT, WAIT, await_until

Runner = Callable[[Coroutine[Any, Any, None]], None]

RUNNERS: dict[str, Runner] = {
    "asyncio.run": asyncio.run,
    "uvloop": lambda coro: run_on("uvloop", coro),
}

NO_ACLOSE = "aclose() has not been called"


def warnings_about_aclose(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "offloop.supervisor" and NO_ACLOSE in r.getMessage()
    ]


def told_worker(sv: offloop.Supervisor) -> tuple[list[str | None], threading.Event]:
    """Add a thread service that waits for its token; the reasons it got, and its end."""
    reasons: list[str | None] = []
    ended = threading.Event()

    @sv.service
    def worker() -> None:
        token = offloop.current_token()
        token.wait()
        reasons.append(token.reason)
        ended.set()

    return reasons, ended


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_loop_that_ends_without_aclose_stops_the_thread_services(
    runner: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="orphan", grace=WAIT)
    reasons, ended = told_worker(sv)
    cleaned: list[str] = []

    @sv.service
    async def beside() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("beside")

    async def main() -> None:
        await sv.start()  # and no aclose(): main() just returns

    RUNNERS[runner](main())

    assert ended.wait(QUICK_WAIT), "the thread service was not told to stop"
    assert reasons == ["the supervisor's event loop is shutting down"]
    assert cleaned == ["beside"]
    assert sv.state is offloop.SupervisorState.STOPPED
    assert {s.state for s in sv.status().values()} == {offloop.ServiceState.STOPPED}
    (warning,) = warnings_about_aclose(caplog)
    assert "'async with sv:'" in warning
    assert "await sv.aclose()" in warning
    assert [r.levelname for r in caplog.records if NO_ACLOSE in r.getMessage()] == ["WARNING"]

    # Stopped for good: each later call says how it stopped.
    with pytest.raises(RuntimeError, match=r"Cannot start\(\) .*its event loop shut down"):
        asyncio.run(sv.start())
    with pytest.raises(RuntimeError, match=r"has stopped, so it is not ready: its event loop"):
        asyncio.run(sv.wait_ready())
    with pytest.raises(RuntimeError, match=r"Cannot enter .*its event loop shut down"):
        asyncio.run(sv.__aenter__())
    asyncio.run(sv.aclose())  # the stop is over: nothing to wait for, from a new loop


def test_a_thread_deaf_to_its_token_is_abandoned_as_a_stop_reports_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="orphan", grace=0.05)
    release = threading.Event()
    running = threading.Event()
    threads: list[threading.Thread] = []

    @sv.service
    def deaf() -> None:
        threads.append(threading.current_thread())
        running.set()
        release.wait(WAIT)

    async def main() -> None:
        await sv.start()
        await asyncio.to_thread(running.wait, WAIT)

    try:
        asyncio.run(main())
        abandoned = [
            r.levelname
            for r in caplog.records
            if "abandoned thread 'offloop-service-deaf'" in r.getMessage()
        ]
        assert abandoned == ["WARNING"]
        assert sv.state is offloop.SupervisorState.STOPPED
        assert len(warnings_about_aclose(caplog)) == 1
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)


async def _forever() -> None:
    await asyncio.Event().wait()


def _run_cancelling_first(coro: Coroutine[Any, Any, None], first: str) -> None:
    # What asyncio.run does when main() returns, but with the task named
    # ``first`` cancelled first: asyncio.run cancels in whatever order its set
    # of tasks gives, and each order must work.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
        left = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name() != first)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("host", "first"),
    [
        ("aclose in its cleanup", "host"),
        ("aclose in its cleanup", "offloop-loop-end-held"),
        ("aclose after other cleanup", "host"),
        ("aclose after other cleanup", "offloop-loop-end-held"),
        ("async with", "host"),
    ],
)
def test_a_host_task_that_stops_it_as_the_loop_ends_gets_no_warning(
    host: str, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The host's own cleanup, in a task the loop's end cancels, stops the
    # supervisor: the stop it asked for, not one it forgot, whichever of the
    # two tasks the loop cancels first.
    caplog.set_level(logging.INFO, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="held", grace=WAIT)
    ended = threading.Event()

    @sv.service
    def worker(token: offloop.StopToken) -> None:
        token.wait()
        ended.set()

    tasks: list[asyncio.Task[None]] = []

    async def hosted() -> None:
        if host == "async with":
            async with sv:
                await _forever()
        else:
            await sv.start()
            try:
                await _forever()
            finally:
                if host == "aclose after other cleanup":
                    await asyncio.sleep(0.01)  # closing a connection of its own, say
                await sv.aclose()

    async def main() -> None:
        # Left running when main() returns: the loop's end cancels it.
        tasks.append(asyncio.create_task(hosted(), name="host"))
        await sv.wait_ready()

    _run_cancelling_first(main(), first)

    assert ended.wait(QUICK_WAIT)
    assert sv.state is offloop.SupervisorState.STOPPED
    assert warnings_about_aclose(caplog) == []


def test_a_stop_under_way_when_the_loop_ends_is_finished() -> None:
    # stop() was called (or a service failed) and main() returned without
    # aclose(): asyncio.run cancels the shutdown task itself, before it has
    # reached every service. The stop is finished all the same.
    sv = offloop.Supervisor(name="cut", grace=WAIT)
    ended = threading.Event()

    @sv.service
    def worker(token: offloop.StopToken) -> None:
        token.wait()
        ended.set()

    @sv.service
    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # stopped first (reverse order): holds the shutdown here

    async def main() -> None:
        await sv.start()
        sv.stop()
        await asyncio.sleep(0)  # the shutdown task begins with slow_to_stop

    asyncio.run(main())
    assert ended.is_set(), "the stop was not waited for"
    assert sv.state is offloop.SupervisorState.STOPPED
    assert {s.state for s in sv.status().values()} == {offloop.ServiceState.STOPPED}


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_loop_end_cancels_async_services_once_so_their_cleanup_runs_to_its_end(
    runner: str,
) -> None:
    # The loop's end has cancelled the services' tasks already: the stop
    # that follows waits for them, as aclose() would, and does not cancel
    # them again in the middle of a cleanup that awaits: a service's, a
    # scheduled run's. A service on its own loop thread awaits that thread's
    # join in its cleanup.
    sv = offloop.Supervisor(name="tidy", grace=WAIT)
    cleaned: list[str] = []

    @sv.service
    async def tidy() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # closing a connection, say
            cleaned.append("tidy")

    @sv.service(isolate="loop")
    async def apart() -> None:
        await asyncio.Event().wait()

    began = asyncio.Event()

    @sv.every(WAIT)
    async def job() -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)
            cleaned.append("job")

    async def main() -> None:
        await sv.start()
        await asyncio.wait_for(began.wait(), QUICK_WAIT)

    RUNNERS[runner](main())

    assert sorted(cleaned) == ["job", "tidy"]
    assert [t for t in threading.enumerate() if "loop-service-apart" in t.name] == []
    assert {s.state for s in sv.status().values()} == {offloop.ServiceState.STOPPED}


def _scheduled_run_cancelled_first() -> tuple[list[str], tuple[object, ...]]:
    """A supervisor whose loop's end cancels its running scheduled run first; what it says."""
    sv = offloop.Supervisor(name="sched", grace=WAIT)
    began = asyncio.Event()
    cancelled: list[str] = []

    @sv.every(WAIT)
    async def job() -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("job")
            raise

    async def main() -> None:
        await sv.start()
        await asyncio.wait_for(began.wait(), QUICK_WAIT)

    _run_cancelling_first(main(), "offloop-run-job")
    status = sv.status()["job"]
    return cancelled, (sv.state, status.state, status.last_error)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.cancelling() tells who cancelled a run (3.11+)"
)
def test_a_scheduled_run_the_loop_end_cancels_first_is_no_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The run's task may get the loop's cancellation before the stop has
    # begun: a cancel asked from outside is that stop, not the run's own
    # CancelledError (a crash, whose error nobody would read).
    caplog.set_level(logging.ERROR)
    cancelled, states = _scheduled_run_cancelled_first()
    assert cancelled == ["job"]
    assert states == (offloop.SupervisorState.STOPPED, offloop.ServiceState.STOPPED, None)
    # A crash's error left in a future nobody read is logged as it is
    # collected: the supervisor is gone with the helper's frame.
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


LOOPS = ("asyncio", "uvloop")

CLOSED = "its event loop was closed while it ran"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_loop_closed_without_cancelling_its_tasks_still_tells_the_thread_services(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # python-telegram-bot's run_polling closes its loop without cancelling
    # the tasks left on it: a program without post_shutdown never stops the
    # supervisor, and no stop can run on the closed loop. The threads can
    # still be told, by the loop's close().
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="closed", grace=WAIT)
    reasons, ended = told_worker(sv)

    loop = new_loop(loop_kind)
    try:
        loop.run_until_complete(sv.start())
    finally:
        loop.close()  # with the supervisor's tasks still pending
    # Told and waited for within close(): the program may end right after it.
    assert ended.is_set(), "the thread service was not told to stop, or not waited for"
    assert reasons == ["the supervisor's event loop is shutting down"]
    closed = [r.getMessage() for r in caplog.records if CLOSED in r.getMessage()]
    assert len(closed) == 1, caplog.text
    assert "await sv.aclose()" in closed[0]
    del loop
    gc.collect()  # the pending tasks' "destroyed but pending" errors, here not later


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_loop_closed_after_aclose_says_nothing_more(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="tidy", grace=WAIT)

    @sv.service
    def worker() -> None:
        offloop.current_token().wait()

    loop = new_loop(loop_kind)
    try:
        loop.run_until_complete(sv.start())
        loop.run_until_complete(sv.aclose())
    finally:
        loop.close()
    assert sv.state.value == "stopped"
    assert not [r for r in caplog.records if CLOSED in r.getMessage()], caplog.text


def test_a_thread_that_ignores_its_token_at_a_loop_close_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="deafclose", grace=0.05)
    release = threading.Event()

    @sv.service
    def deaf() -> None:
        release.wait(WAIT)  # never looks at its token

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(sv.start())
    finally:
        loop.close()
    try:
        closed = [r.getMessage() for r in caplog.records if CLOSED in r.getMessage()]
        assert len(closed) == 1, caplog.text
        assert "still running after 0.05s: 'offloop-service-deaf'" in closed[0]
    finally:
        release.set()
    del loop
    gc.collect()


def test_a_loop_close_waits_only_for_its_own_supervisors_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another supervisor, on a loop of its own, has a service of the same
    # name, so a thread of the same name: it was not told to stop, and the
    # close must neither wait for it nor name it.
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    other = offloop.Supervisor(name="other", grace=WAIT)
    other_up, release = threading.Event(), threading.Event()

    @other.service
    def worker() -> None:
        other_up.set()
        offloop.current_token().wait()

    async def run_other() -> None:
        async with other:
            await offloop.to_thread(release.wait, WAIT)

    runner = threading.Thread(target=asyncio.run, args=(run_other(),))
    runner.start()
    try:
        assert other_up.wait(WAIT)
        sv = offloop.Supervisor(name="mine", grace=WAIT)
        ended = threading.Event()

        @sv.service(name="worker")
        def mine() -> None:
            offloop.current_token().wait()
            ended.set()

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(sv.start())
        finally:
            loop.close()
        assert ended.is_set()
        closed = [r.getMessage() for r in caplog.records if CLOSED in r.getMessage()]
        assert len(closed) == 1, caplog.text
        assert "still running" not in closed[0]
        del loop
        gc.collect()
    finally:
        release.set()
        runner.join(WAIT)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_loop_closed_without_cancelling_its_tasks_stops_a_loop_services_thread(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A service on a loop thread of its own (isolate="loop") runs on there
    # after the supervisor's loop is closed: nobody is left to close it. The
    # loop's close() closes it, as it tells the thread services, and waits
    # for its thread within grace.
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    sv = offloop.Supervisor(name="closed", grace=WAIT)
    _, ended = told_worker(sv)
    running, cleaned = threading.Event(), threading.Event()

    @sv.service(isolate="loop")
    async def apart() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    loop = new_loop(loop_kind)
    try:
        loop.run_until_complete(sv.start())
        loop.run_until_complete(await_until(running.is_set, QUICK_WAIT, "the loop service"))
    finally:
        loop.close()  # with the supervisor's tasks still pending
    assert [t.name for t in threading.enumerate() if "loop-service-apart" in t.name] == []
    assert cleaned.is_set(), "the loop service's coroutine was not cancelled"
    assert ended.is_set(), "the thread service was not told to stop, or not waited for"
    closed = [r.getMessage() for r in caplog.records if CLOSED in r.getMessage()]
    assert len(closed) == 1, caplog.text
    assert "still running" not in closed[0]
    del loop
    gc.collect()

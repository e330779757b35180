"""start() / aclose() / wait_ready() for hosts that own the loop, and where a failure goes then."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import pytest

import offloop
from offloop import ServiceFailed, Supervisor, SupervisorState
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_probes import SlowToStart
from tests.supervisor.test_supervisor import Recorder


def crashing(sv: Supervisor, crash: asyncio.Event) -> None:
    """Add a service 'flaky' that crashes (restart='no') once ``crash`` is set."""

    @sv.service(restart="no", name="flaky")
    async def flaky() -> None:
        await crash.wait()
        raise ConnectionResetError("flaky broke")


@pytest.mark.loops("asyncio", "uvloop")
@bounded(10)
async def test_start_and_aclose_from_different_tasks_are_idempotent() -> None:
    journal: list[str] = []
    sv = Supervisor(name="hooks")
    sv.add(Recorder("db", journal))
    sv.add(Recorder("api", journal))
    # Two startup hooks, then two shutdown hooks, each in a task of its own.
    await asyncio.gather(asyncio.ensure_future(sv.start()), asyncio.ensure_future(sv.start()))
    assert sv.state is SupervisorState.RUNNING
    assert journal == ["start db", "start api"]
    await sv.start()  # once more: already ready
    await sv.wait_ready()
    await asyncio.gather(asyncio.ensure_future(sv.aclose()), asyncio.ensure_future(sv.aclose()))
    assert journal == ["start db", "start api", "stop api", "stop db"]
    assert str(sv.state) == "stopped"
    await sv.aclose()
    with pytest.raises(RuntimeError, match=r"Cannot start\(\) .*aclose\(\) was called already"):
        await sv.start()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_wait_ready_signals_serve_in_a_task() -> None:
    journal: list[str] = []
    sv = Supervisor(name="served")
    sv.add(Recorder("db", journal))
    waiter = asyncio.ensure_future(sv.wait_ready())  # before it even started
    serving = asyncio.ensure_future(sv.serve())
    await asyncio.wait_for(waiter, QUICK_WAIT)
    assert sv.state is SupervisorState.RUNNING
    assert journal == ["start db"]
    with pytest.raises(RuntimeError, match=r"it was started by 'async with', serve\(\) or run\(\)"):
        await sv.start()
    sv.stop()
    await asyncio.wait_for(serving, QUICK_WAIT)
    with pytest.raises(RuntimeError, match="has stopped, so it is not ready"):
        await sv.wait_ready()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_start_up_error_is_raised_by_start_and_by_wait_ready() -> None:
    journal: list[str] = []
    sv = Supervisor(name="broken")
    sv.add(Recorder("db", journal, start_failures=1))
    waiter = asyncio.ensure_future(sv.wait_ready())
    with pytest.raises(ServiceFailed, match="'db' failed: it failed to start") as info:
        await sv.start()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ServiceFailed) as waited:
        await asyncio.wait_for(waiter, QUICK_WAIT)
    assert waited.value is info.value
    with pytest.raises(ServiceFailed) as again:
        await sv.aclose()  # the shutdown hook of the host ends with the same error
    assert again.value is info.value


@pytest.mark.loops("asyncio", "uvloop")
@bounded(10)
async def test_a_failure_after_start_cancels_the_caller_and_aclose_raises_it() -> None:
    crash = asyncio.Event()
    sv = Supervisor(name="embedded")
    crashing(sv, crash)

    async def host() -> str:
        # What aiogram's start_polling and discord.py's runner do: start in the
        # startup hook, run until cancelled, call the shutdown hook in finally.
        await sv.start()
        try:
            crash.set()
            await asyncio.sleep(QUICK_WAIT * 2)
            return "the host kept running half-dead"
        finally:
            await sv.aclose()

    task = asyncio.ensure_future(host())
    with pytest.raises(ServiceFailed, match="'flaky' failed: it crashed") as info:
        await asyncio.wait_for(task, QUICK_WAIT)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert sv.state is SupervisorState.FAILED
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    if cancelling is not None:
        assert cancelling() == 0  # the failure replaced the cancellation it caused


def test_a_failure_after_start_stops_a_loop_run_forever_when_the_caller_has_ended() -> None:
    # python-telegram-bot's run_polling: post_init runs as a task of its own,
    # then loop.run_forever() until something stops the loop.
    loop = asyncio.new_event_loop()
    try:
        crash = asyncio.Event()
        sv = Supervisor(name="ptb-like")
        crashing(sv, crash)
        loop.run_until_complete(sv.start())
        loop.call_soon(crash.set)
        loop.call_later(QUICK_WAIT, loop.stop)  # the bound: the supervisor must stop it first
        started = loop.time()
        loop.run_forever()
        assert loop.time() - started < QUICK_WAIT, "the failure did not stop the loop"
        with pytest.raises(ServiceFailed, match="'flaky' failed"):
            loop.run_until_complete(sv.aclose())
    finally:
        loop.close()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_on_failure_replaces_the_default_and_may_be_a_coroutine() -> None:
    crash = asyncio.Event()
    told: asyncio.Future[ServiceFailed] = asyncio.get_running_loop().create_future()

    async def on_failure(failure: ServiceFailed) -> None:
        await asyncio.sleep(0)
        told.set_result(failure)

    sv = Supervisor(name="told", on_failure=on_failure)
    crashing(sv, crash)
    await sv.start()
    crash.set()
    failure = await asyncio.wait_for(told, QUICK_WAIT)  # this task was not cancelled
    assert failure.service == "flaky"
    with pytest.raises(ServiceFailed) as info:
        await sv.aclose()
    assert info.value is failure


def test_bad_on_failure_is_refused() -> None:
    with pytest.raises(TypeError, match=r"on_failure=.*got 'stop' \(a str\)|on_failure=.*'stop'"):
        Supervisor(on_failure="stop")  # type: ignore[arg-type]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_each_illegal_transition_has_its_own_message() -> None:
    journal: list[str] = []
    closed = Supervisor(name="closed")
    await closed.aclose()  # never started: it will never start
    assert closed.state is SupervisorState.STOPPED
    with pytest.raises(RuntimeError, match=r"aclose\(\) was called already"):
        await closed.start()
    with pytest.raises(RuntimeError, match=r"closed with aclose\(\) before it started"):
        await closed.wait_ready()
    # The others said "it has already run and stopped" (or "already started") of it.
    never = r"aclose\(\) was called before it started, so it never runs"
    with pytest.raises(RuntimeError, match=r"Cannot enter <Supervisor 'closed' stopped.*" + never):
        await closed.__aenter__()
    with pytest.raises(RuntimeError, match=r"Cannot serve <Supervisor 'closed' stopped.*" + never):
        await closed.serve()
    with pytest.raises(RuntimeError, match=r"Cannot add the service 'db' to .*" + never):
        closed.add(Recorder("db", journal))

    entered = Supervisor(name="entered")
    entered.add(Recorder("db", journal))
    async with entered:
        with pytest.raises(RuntimeError, match=r"started by 'async with'"):
            await entered.start()
    with pytest.raises(RuntimeError, match=r"Cannot start\(\) .*has already run and stopped"):
        await entered.start()

    stopping = Supervisor(name="stopping")
    stopping.add(Recorder("db", journal))
    await stopping.start()
    closing = asyncio.ensure_future(stopping.aclose())
    await asyncio.sleep(0)  # the shutdown has begun
    assert stopping.state is SupervisorState.STOPPING
    with pytest.raises(RuntimeError, match=r"is stopping, so it will not be ready"):
        await stopping.wait_ready()
    await closing

    other = Supervisor(name="other-loop")
    other.add(Recorder("db", journal))
    await other.start()
    try:
        with pytest.raises(RuntimeError, match=re.escape("called from another event loop")):
            await asyncio.to_thread(asyncio.run, _aclose(other))
    finally:
        await other.aclose()


async def _aclose(sv: Supervisor) -> None:
    await sv.aclose()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_aclose_during_start_stops_it_and_start_says_so() -> None:
    gate = asyncio.Event()
    sv = Supervisor(name="raced")

    @sv.service(name="slow")
    async def slow() -> None:
        await asyncio.Event().wait()

    class Slow(Recorder):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    sv.add(Slow("gated", []))
    starting = asyncio.ensure_future(sv.start())
    await asyncio.sleep(0)  # start() runs up to the gated service
    assert sv.state is SupervisorState.STARTING
    await sv.aclose()
    with pytest.raises(RuntimeError, match=r"was stopped .* while start\(\) was starting it"):
        await starting


def test_lifespan_takes_a_supervisor() -> None:
    with pytest.raises(TypeError, match=r"offloop.lifespan\(\) takes the offloop.Supervisor"):
        offloop.lifespan("sv")  # type: ignore[arg-type]
    # Passed uncalled (FastAPI(lifespan=offloop.lifespan)), it gets the app: say how to call it.
    with pytest.raises(TypeError, match=re.escape("FastAPI(lifespan=offloop.lifespan(sv))")):
        offloop.lifespan(object())  # type: ignore[arg-type]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_sync_on_failure_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    crash, called = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    def on_failure(failure: ServiceFailed) -> None:
        calls.append(failure.service)
        called.set()
        raise LookupError("the alert went nowhere")

    sv = Supervisor(name="alerting", on_failure=on_failure)
    crashing(sv, crash)
    await sv.start()
    crash.set()
    await asyncio.wait_for(called.wait(), QUICK_WAIT)
    with pytest.raises(ServiceFailed):
        await sv.aclose()
    assert calls == ["flaky"]
    assert any("on_failure=" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_serve_after_start_waits_for_the_stop_and_a_stop_before_start_is_kept() -> None:
    journal: list[str] = []
    sv = Supervisor(name="started")
    sv.add(Recorder("db", journal))
    await sv.start()
    serving = asyncio.ensure_future(sv.serve())
    await asyncio.sleep(0)
    assert not serving.done()
    sv.stop()
    await asyncio.wait_for(serving, QUICK_WAIT)
    assert journal == ["start db", "stop db"]

    early = Supervisor(name="early")
    early.add(Recorder("db", journal))
    early.stop()  # before it started: kept, so start() starts nothing and says so
    with pytest.raises(RuntimeError, match=r"was stopped \(stop\(\) or aclose\(\)\) while start"):
        await early.start()
    assert journal == ["start db", "stop db"]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_wait_ready_on_another_loop_sees_a_start_that_lands_while_it_registers() -> None:
    # wait_ready() on another thread's loop checks the state, then registers
    # its waiter: the supervisor may become ready in between, and its wake-up
    # call then finds nobody registered. The waiter must still return.
    journal: list[str] = []
    sv = Supervisor(name="race")
    sv.add(Recorder("db", journal))
    checking, started = threading.Event(), threading.Event()

    class Interleaved(asyncio.SelectorEventLoop):
        def create_future(self) -> asyncio.Future[Any]:
            if not started.is_set():  # wait_ready's waiter, made after its check
                checking.set()
                started.wait(QUICK_WAIT)
            return super().create_future()

    outcome: list[str] = []

    def other_thread() -> None:
        loop = Interleaved()

        async def waiting() -> None:
            # Bounded without wait_for, whose own future would come first.
            task = asyncio.current_task()
            assert task is not None
            loop.call_later(QUICK_WAIT, task.cancel)
            await sv.wait_ready()

        try:
            loop.run_until_complete(waiting())
            outcome.append("ready")
        except BaseException as exc:
            outcome.append(repr(exc))
        finally:
            loop.close()

    thread = threading.Thread(target=other_thread, name="race-waiter")
    thread.start()
    try:
        await asyncio.to_thread(checking.wait, QUICK_WAIT)
        await sv.start()
        started.set()
        await asyncio.to_thread(thread.join, QUICK_WAIT + 1)
        assert outcome == ["ready"]
    finally:
        started.set()
        thread.join(QUICK_WAIT + 1)
        await sv.aclose()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_aclose_stops_within_grace_a_service_that_ignores_its_stop() -> None:
    sv = Supervisor(name="stubborn", grace=0.1)
    release, entered = threading.Event(), threading.Event()

    @sv.service
    def stubborn(token: offloop.StopToken) -> None:
        entered.set()
        release.wait(QUICK_WAIT)  # never looks at its token

    await sv.start()
    await asyncio.to_thread(entered.wait, QUICK_WAIT)
    try:
        await sv.aclose()  # returns without waiting for the thread: it is abandoned
        assert str(sv.state) == "stopped"
        assert not release.is_set()
        assert [t for t in threading.enumerate() if t.name == "offloop-service-stubborn"]
    finally:
        release.set()
    await await_until(
        lambda: not [t for t in threading.enumerate() if t.name == "offloop-service-stubborn"],
        what="the abandoned thread to end once released",
    )


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_aclose_refused_on_another_loop_leaves_the_supervisor_as_it_was() -> None:
    journal: list[str] = []
    sv = Supervisor(name="refused")
    sv.add(Recorder("db", journal))
    await sv.start()
    try:
        with pytest.raises(RuntimeError) as refused:
            await asyncio.to_thread(asyncio.run, _aclose(sv))
        assert sv.state is SupervisorState.RUNNING
        assert str(refused.value) == (
            f"aclose() of {sv!r} was called from another event loop (or thread) than the one "
            f"it runs on. Await aclose() on that loop, or call sv.stop() (thread-safe) to stop "
            f"it from here."
        )
        await sv.start()  # a second start() still waits for the first, as if never closed
        await sv.wait_ready()
    finally:
        await sv.aclose()
    assert journal == ["start db", "stop db"]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_serve_on_another_loop_is_refused_before_it_waits() -> None:
    # Its wait is on the supervisor's loop: from another loop it would be woken
    # from the wrong thread, or not at all.
    journal: list[str] = []
    sv = Supervisor(name="one-loop")
    sv.add(Recorder("db", journal))
    await sv.start()
    try:
        with pytest.raises(RuntimeError) as refused:
            await asyncio.to_thread(asyncio.run, _serve(sv))
        assert sv.state is SupervisorState.RUNNING
        # Who calls serve() wants to wait for the services, not to stop them.
        assert str(refused.value) == (
            f"serve() of {sv!r} was called from another event loop (or thread) than the one "
            f"it runs on. Await serve() on the loop that started it; from another loop, "
            f"await sv.wait_ready() and stop it with sv.stop() (thread-safe)."
        )
    finally:
        await sv.aclose()
    assert journal == ["start db", "stop db"]


async def _serve(sv: Supervisor) -> None:
    await asyncio.wait_for(sv.serve(), QUICK_WAIT)


@pytest.mark.loops("asyncio")
@bounded(10)
@pytest.mark.parametrize("how", ["start()", "async with"])
async def test_serve_while_another_task_starts_it_says_what_to_await(how: str) -> None:
    journal: list[str] = []
    sv = Supervisor(name="half")
    slow = sv.add(SlowToStart("slow", journal))
    left = asyncio.Event()

    async def enter() -> None:
        async with sv:
            await left.wait()

    starting = asyncio.ensure_future(sv.start() if how == "start()" else enter())
    await await_until(lambda: journal == ["start slow"], QUICK_WAIT, "the start to begin")
    with pytest.raises(RuntimeError) as info:
        await sv.serve()
    assert str(info.value) == (
        f"Cannot serve() {sv!r} while another task starts it ('async with' or start() has not "
        f"returned yet): await sv.wait_ready(), then serve()."
    )
    slow.go.set()
    await asyncio.wait_for(sv.wait_ready(), QUICK_WAIT)
    serving = asyncio.ensure_future(sv.serve())  # as the message says: it now waits
    await asyncio.sleep(0)  # one step: serve() runs up to its wait, with nothing to await before
    assert not serving.done()
    sv.stop()
    await asyncio.wait_for(serving, QUICK_WAIT)
    left.set()
    await asyncio.wait_for(starting, QUICK_WAIT)
    await sv.aclose()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_an_app_it_serves_with_its_own_lifespan_is_refused_by_name() -> None:
    # The supervisor's start waits for the ASGIService, whose app's lifespan
    # would wait for the supervisor's start: say so, not "use wait_ready()".
    fastapi = pytest.importorskip("fastapi")
    sv = Supervisor(name="circular", grace=1)
    app = fastapi.FastAPI(lifespan=offloop.lifespan(sv))
    sv.add(offloop.ASGIService(app, port=0, access_log=False, name="api"))
    with pytest.raises(ServiceFailed) as caught:
        async with sv:
            pass
    message = str(caught.value)
    assert "start() of <Supervisor 'circular'" in message
    assert "was called in the start of its own service 'api'" in message
    assert "drop the lifespan from that app" in message
    assert "wait_ready" not in message


class WaitsForAll(offloop.Service):
    """A service whose start() waits for every service of its supervisor to be ready."""

    def __init__(self, sv: Supervisor) -> None:
        self.name = "impatient"
        self.sv = sv

    async def start(self) -> None:
        await self.sv.wait_ready()

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        pass


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_wait_ready_in_the_start_of_its_own_service_is_refused_but_after_it_waits() -> None:
    sv = Supervisor(name="own")
    sv.add(WaitsForAll(sv))
    with pytest.raises(ServiceFailed, match=r"wait_ready\(\) of .* its own service 'impatient'"):
        async with sv:
            pass
    # Once ready, a service may wait for the others: the bot that waits for its web app.
    sv = Supervisor(name="after")
    seen: list[str] = []

    @sv.service
    async def bot() -> None:
        await sv.wait_ready()
        seen.append(str(sv.state))
        await asyncio.Event().wait()

    sv.add(Recorder("api", []))
    async with sv:
        await await_until(lambda: seen == ["running"], QUICK_WAIT, "the bot past wait_ready()")

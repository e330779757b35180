"""Supervisor: bad registrations and illegal transitions, each with its own message."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import offloop
from offloop import OffloopError, ServiceFailed, StopToken, Supervisor
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded
from tests.supervisor.test_supervisor import Recorder


def test_decorator_returns_the_function_and_names_the_service() -> None:
    sv = Supervisor()

    def plain() -> int:
        return 42

    assert sv.service(plain) is plain
    assert sv.service(name="second")(plain) is plain
    assert plain() == 42
    assert list(sv.services) == ["plain", "second"]
    assert repr(sv.services["plain"]).startswith("<ThreadService 'plain' idle fn=function")


async def _never() -> None:
    await asyncio.sleep(3600)


def _two_args(a: int, b: int) -> None:
    pass


def _ticks() -> Any:
    yield "tick"


async def _async_ticks() -> Any:
    yield "tick"


@pytest.mark.parametrize(
    ("register", "error", "message"),
    [
        (lambda sv: sv.service(42), TypeError, "needs an 'async def' or plain 'def' function"),
        (lambda sv: sv.service(_two_args), TypeError, "which needs the arguments (a, b)"),
        (
            lambda sv: sv.service(_ticks),
            TypeError,
            "got function '_ticks', a generator function (it contains 'yield'), which would "
            "only make a generator object: write it without 'yield'.",
        ),
        (
            lambda sv: sv.every(1)(_async_ticks),
            TypeError,
            "got function '_async_ticks', an async generator function (it contains 'yield')",
        ),
        (
            lambda sv: sv.service(isolate="thread")(_never),
            TypeError,
            "use isolate='loop' to give it its own loop",
        ),
        (
            lambda sv: sv.service(isolate="loop")(_two_args),
            TypeError,
            "isolate='loop', which is for coroutine functions",
        ),
        (lambda sv: sv.service(isolate="gpu")(_never), ValueError, "isolate must be None,"),
        (lambda sv: sv.service(backoff=-1)(_never), ValueError, "backoff must be at least 0"),
        (
            lambda sv: sv.add(_never),
            TypeError,
            "needs an offloop.Service (e.g. offloop.WSGIService(app)), got function '_never'. "
            "To supervise a function, decorate it with @sv.service instead.",
        ),
        (lambda sv: sv.service(name="")(_never), TypeError, "name must be a non-empty str"),
    ],
)
def test_bad_registrations_are_explained(
    register: object, error: type[Exception], message: str
) -> None:
    sv = Supervisor()
    with pytest.raises(error) as info:
        register(sv)  # type: ignore[operator]
    assert message in str(info.value)
    # A rejected registration leaves the supervisor usable.
    sv.service(_never)
    assert list(sv.services) == ["_never"]


def test_a_function_with_the_wrong_isolate_is_named_once() -> None:
    sv = Supervisor()
    with pytest.raises(TypeError) as info:
        sv.service(isolate="thread")(_never)
    assert str(info.value) == (
        "@Supervisor.service got function '_never', a coroutine function, with "
        "isolate='thread'. A coroutine runs on an event loop: use isolate='loop' to give it "
        "its own loop in its own thread."
    )
    with pytest.raises(TypeError) as info:
        sv.service(isolate="loop")(lambda: None)
    assert str(info.value) == (
        "@Supervisor.service got function 'test_a_function_with_the_wrong_isolate_is_named_once"
        ".<locals>.<lambda>', a plain function, with isolate='loop', which is for coroutine "
        "functions. A plain 'def' already runs in its own thread; use "
        "isolate=None (or 'thread')."
    )


def test_coroutine_object_is_rejected_without_a_warning() -> None:
    sv = Supervisor()
    with pytest.raises(TypeError, match="Decorate the 'async def' function itself"):
        sv.service(_never())  # type: ignore[call-overload]


def test_duplicate_names_and_services_are_rejected() -> None:
    sv = Supervisor(name="dup")
    svc = sv.add(Recorder("api", []))
    with pytest.raises(ValueError, match=r"already has a service named 'api'; pass name="):
        sv.add(Recorder("api", []))
    with pytest.raises(ValueError, match=r"<Recorder 'api'> is already supervised by <Supervisor"):
        sv.add(svc)
    with pytest.raises(TypeError, match="grace must be a number of seconds"):
        Supervisor(grace="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^grace must be a number of seconds a float can hold"):
        Supervisor(grace=10**400)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_illegal_transitions_have_their_own_messages() -> None:
    sv = Supervisor(name="once")
    sv.add(Recorder("api", []))
    async with sv:
        with pytest.raises(RuntimeError, match=r"Cannot enter <Supervisor 'once' running"):
            await sv.__aenter__()
        with pytest.raises(RuntimeError, match="Cannot add the service 'late' to <Supervisor"):
            sv.add(Recorder("late", []))
        with pytest.raises(RuntimeError, match=r"\.run\(\) was called from a running event loop"):
            sv.run()
    with pytest.raises(RuntimeError, match=r"it has already run and stopped\. A supervisor runs"):
        await sv.serve()
    with pytest.raises(RuntimeError, match="Cannot enter <Supervisor 'once' stopped"):
        async with sv:
            pass


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_function_service_lifecycle_errors() -> None:
    sv = Supervisor()

    @sv.service
    def idle(token: StopToken) -> None:
        token.wait()

    svc = sv.services["idle"]
    with pytest.raises(RuntimeError, match=r"Cannot wait <ThreadService 'idle' idle .* start\(\)"):
        await svc.wait()
    await svc.start()
    with pytest.raises(RuntimeError, match="it is already running; stop it before"):
        await svc.start()
    assert repr(svc).startswith("<ThreadService 'idle' running")
    await asyncio.wait_for(svc.stop(), WAIT)
    await svc.wait()
    assert repr(svc).startswith("<ThreadService 'idle' ended")
    # Restartable: a fresh run after the stop.
    await svc.start()
    await asyncio.wait_for(svc.stop(), WAIT)
    assert svc.kill() == []


class AsyncCallable:
    """Callable objects hide their async nature from iscoroutinefunction()."""

    def __init__(self) -> None:
        self.ran_on: asyncio.AbstractEventLoop | None = None

    async def __call__(self) -> None:
        self.ran_on = asyncio.get_running_loop()


@pytest.mark.loops("asyncio")
async def test_an_object_with_an_async_call_runs_as_an_async_service_and_partials_are_named() -> (
    None
):
    sv = Supervisor()
    hidden = AsyncCallable()
    sv.service(restart="no", name="hidden")(hidden)
    sv.service(functools.partial(_two_args, 1, 2))
    assert list(sv.services) == ["hidden", "_two_args"]
    await asyncio.wait_for(sv.serve(), WAIT)
    # It used to run in a thread and crash with "returned a coroutine".
    assert hidden.ran_on is asyncio.get_running_loop()
    assert sv.status()["hidden"].state == "stopped"
    assert sv.status()["hidden"].last_error is None


def test_detect_blocking_values_are_checked() -> None:
    assert Supervisor(detect_blocking=False).detector is None
    assert Supervisor(detect_blocking=True).detector is None  # created when the run starts
    with pytest.raises(ValueError, match="detect_blocking must be greater than 0 seconds"):
        Supervisor(detect_blocking=0)
    with pytest.raises(TypeError, match="detect_blocking must be a number of seconds, got str"):
        Supervisor(detect_blocking="fast")  # type: ignore[arg-type]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_stop_before_start_is_kept_and_no_service_starts() -> None:
    journal: list[str] = []
    sv = Supervisor(name="early")
    sv.add(Recorder("api", journal))
    sv.stop()  # e.g. from another thread, just before the thread running sv.run() gets going
    assert sv.state is offloop.SupervisorState.NEW
    await asyncio.wait_for(sv.serve(), WAIT)
    assert journal == []
    assert str(sv.state) == "stopped"


def test_a_stop_racing_run_in_another_thread_is_never_lost() -> None:
    # Whichever thread gets there first, run() returns: repeat to cover both orders.
    for n in range(20):
        journal: list[str] = []
        sv = Supervisor(name=f"race-{n}")
        sv.add(Recorder("api", journal))
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(sv.run()))  # noqa: B023
        thread.start()
        sv.stop()
        thread.join(WAIT)
        assert not thread.is_alive(), f"run() ignored a stop() sent while it started (round {n})"
        assert outcome == [0]


def test_run_in_another_thread_says_it_handles_no_signal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Ctrl-C reaches the main thread only: without a word, a program that
    # runs sv.run() in a thread learns it when Ctrl-C skips the graceful stop.
    caplog.set_level(logging.INFO, logger="offloop.supervisor")
    handler = signal.getsignal(signal.SIGINT)
    sv = Supervisor(name="threaded")
    sv.add(Recorder("api", []))
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(sv.run()), name="runner")
    thread.start()
    sv.stop()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert outcome == [0]
    said = [r.getMessage() for r in caplog.records if "not the main thread" in r.getMessage()]
    assert said == [
        "threaded: run() in thread 'runner', not the main thread: it does not handle SIGINT "
        "or SIGTERM (only the main thread can). Call sv.stop() where the program gets them "
        "(on KeyboardInterrupt in the main thread, say) for a graceful stop."
    ]
    assert signal.getsignal(signal.SIGINT) is handler  # untouched


def add_polite_neighbour(sv: Supervisor) -> threading.Event:
    """A thread service that stops when asked; the event says it did."""
    stopped_politely = threading.Event()

    @sv.service
    def neighbour(token: StopToken) -> None:
        token.wait()
        stopped_politely.set()

    return stopped_politely


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_system_exit_in_an_async_service_is_a_crash_of_that_service_only() -> None:
    # A task lets it escape through the event loop: the supervisor itself would end.
    error = SystemExit(3)
    sv = Supervisor(name="sv")
    stopped_politely = add_polite_neighbour(sv)

    @sv.service(restart="no")
    async def quitter() -> None:
        raise error

    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    cause = info.value.__cause__
    assert isinstance(cause, OffloopError)
    assert str(cause).startswith("Service 'quitter' raised SystemExit(3), which would have")
    assert cause.__cause__ is error
    assert stopped_politely.is_set()
    assert sv.status()["neighbour"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_keyboard_interrupt_in_an_async_service_stops_the_supervisor_gracefully() -> None:
    # Ctrl-C on Python 3.10 lands in whatever code runs: a restart would make
    # it impossible to stop the program, and escaping the loop skips the grace.
    sv = Supervisor(name="sv", grace=5)
    stopped_politely = add_polite_neighbour(sv)
    starts: list[int] = []

    @sv.service(restart="always")
    async def interrupted() -> None:
        starts.append(1)
        raise KeyboardInterrupt

    await sv.serve()  # returns: a stop, not a failure
    assert starts == [1]  # never restarted
    assert stopped_politely.is_set()
    status = sv.status()
    assert status["neighbour"].state == "stopped"
    assert status["interrupted"].state == "stopped"
    assert "raised KeyboardInterrupt" in str(status["interrupted"].last_error)
    assert sv.state is offloop.SupervisorState.STOPPED


@pytest.mark.parametrize("grace", [float("inf"), float("nan")], ids=repr)
def test_grace_must_be_finite(grace: float) -> None:
    # inf crashed the signal watchdog at the first Ctrl-C ("timestamp out of range").
    with pytest.raises(ValueError, match=r"^grace must be ") as info:
        Supervisor(grace=grace)
    assert repr(grace) in str(info.value)
    with pytest.raises(ValueError, match=r"^detect_blocking must be "):
        Supervisor(detect_blocking=grace)


@pytest.mark.parametrize(
    ("threshold", "why"),
    [(0.005, "below 0.01 s even an idle loop looks blocked"), (86401.0, "one day is the longest")],
    ids=repr,
)
def test_detect_blocking_outside_the_detector_range_is_refused_at_once(
    threshold: float, why: str
) -> None:
    # It used to pass here and fail only when the supervisor started.
    expected = r"^detect_blocking must be between 0\.01 and 86400 seconds"
    with pytest.raises(ValueError, match=expected) as info:
        Supervisor(detect_blocking=threshold)
    assert why in str(info.value)  # a value too large was told about the lower bound


def test_restart_durations_may_still_be_infinite() -> None:
    # The shared check_seconds() refuses infinity only where something waits it out.
    sv = Supervisor()
    sv.service(max_backoff=float("inf"), restart_window=float("inf"))(_never)


@bounded()
async def test_a_detector_that_cannot_start_leaves_the_supervisor_enterable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offloop._detect.detector import BlockingDetector

    real_start = BlockingDetector.start

    def refuse(self: BlockingDetector) -> BlockingDetector:
        raise RuntimeError("detector refused")

    sv = Supervisor(name="det", detect_blocking=0.5, grace=1)
    monkeypatch.setattr(BlockingDetector, "start", refuse)
    with pytest.raises(RuntimeError, match="detector refused"):
        async with sv:
            pass
    assert sv.state is offloop.SupervisorState.NEW
    monkeypatch.setattr(BlockingDetector, "start", real_start)
    async with sv:  # it used to be stuck "starting", refusing as "already running"
        assert sv.detector is not None
    assert sv.state.value == "stopped"  # (mypy narrowed the state to NEW above)


@bounded()
async def test_a_stop_after_a_start_the_detector_refused_is_kept_for_the_next_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offloop._detect.detector import BlockingDetector

    real_start = BlockingDetector.start

    def refuse(self: BlockingDetector) -> BlockingDetector:
        raise RuntimeError("detector refused")

    sv = Supervisor(name="det", detect_blocking=0.5, grace=1)
    started: list[str] = []

    @sv.service
    async def job() -> None:
        started.append("job")
        await asyncio.Event().wait()

    monkeypatch.setattr(BlockingDetector, "start", refuse)
    with pytest.raises(RuntimeError, match="detector refused"):
        async with sv:
            pass
    # It used to fail an assertion here: the supervisor, left new, kept the loop
    # of the start that failed, so stop() asked it for a shutdown it never set up.
    sv.stop()
    monkeypatch.setattr(BlockingDetector, "start", real_start)
    async with sv:  # kept, as a stop before any start is: it stops at once
        pass
    assert started == []
    assert sv.state.value == "stopped"


def supervisor_with_an_interrupting_service() -> Supervisor:
    """A supervisor whose one service, 'interrupted', raises KeyboardInterrupt at once."""
    sv = Supervisor(name="sv", grace=5)

    @sv.service
    async def interrupted() -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    return sv


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_keyboard_interrupt_in_a_service_cuts_the_async_with_body_short() -> None:
    sv = supervisor_with_an_interrupting_service()
    body_went_on = asyncio.Event()

    async def body() -> None:
        async with sv:
            await asyncio.sleep(WAIT)  # cut short, not waited out
            body_went_on.set()

    with pytest.raises(KeyboardInterrupt) as info:  # as Ctrl-C would end it
        await body()
    assert not body_went_on.is_set()
    assert "raised KeyboardInterrupt" in str(info.value.__cause__)
    assert sv.status()["interrupted"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_service_s_keyboard_interrupt_is_raised_even_if_the_body_caught_its_cut() -> None:
    sv = supervisor_with_an_interrupting_service()

    async def body() -> None:
        async with sv:
            with contextlib.suppress(asyncio.CancelledError):  # a body that cleans up
                await asyncio.sleep(WAIT)

    with pytest.raises(KeyboardInterrupt):  # it used to be lost
        await body()


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        (5, TypeError, r"^Supervisor\(name=\.\.\.\) must be a str, got int 5\. Pass"),
        (b"api", TypeError, r"^Supervisor\(name=\.\.\.\) must be a str, got bytes"),
        ("", ValueError, r"^Supervisor\(name=\.\.\.\) must not be empty.*Pass a name"),
    ],
)
def test_a_bad_supervisor_name_is_refused(name: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Supervisor(name=name)  # type: ignore[arg-type]


class _Inner:
    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        pass

    async def wait(self) -> None:
        await self.stopped.wait()

    async def stop(self) -> None:
        self.stopped.set()


def _traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A sync wrapper (tracing, retries) around an 'async def': it returns its coroutine.
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


class _Delegating(offloop.Service):
    """start() and stop() are plain defs returning the inner object's coroutines."""

    name = "delegating"

    def __init__(self) -> None:
        self.inner = _Inner()

    def start(self) -> Awaitable[None]:  # type: ignore[override]
        return self.inner.start()

    @_traced
    async def wait(self) -> None:
        await self.inner.wait()

    def stop(self) -> Awaitable[None]:  # type: ignore[override]
        return asyncio.ensure_future(self.inner.stop())  # a future is awaitable too


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_methods_that_are_plain_defs_returning_awaitables_are_awaited() -> None:
    sv = Supervisor()
    svc = sv.add(_Delegating())
    serving = asyncio.ensure_future(sv.serve())
    await asyncio.wait_for(sv.wait_ready(), WAIT)
    assert sv.status()["delegating"].state == "running"
    sv.stop()
    await asyncio.wait_for(serving, WAIT)
    assert svc.inner.stopped.is_set()
    assert sv.status()["delegating"].state == "stopped"
    assert sv.status()["delegating"].last_error is None


class _SyncMethod(offloop.Service):
    """A hand-written service whose method ``broken`` is a plain def returning None."""

    name = "handmade"

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.ended = asyncio.Event()
        setattr(self, broken, lambda: None)

    async def start(self) -> None:
        pass

    async def wait(self) -> None:
        await self.ended.wait()

    async def stop(self) -> None:
        self.ended.set()


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("broken", ["start", "wait", "stop"])
@bounded(10)
async def test_a_method_that_returns_no_awaitable_is_named_and_the_others_still_stop(
    broken: str,
) -> None:
    # A plain stop() once made the supervisor's own shutdown raise "a coroutine
    # was expected, got None", leaving the other services running.
    sv = Supervisor(grace=WAIT)
    sv.add(_SyncMethod(broken), restart="no")
    worker_ended = threading.Event()

    @sv.service
    def worker(token: StopToken) -> None:
        token.wait()
        worker_ended.set()

    serving = asyncio.ensure_future(sv.serve())
    if broken == "stop":
        await asyncio.wait_for(sv.wait_ready(), WAIT)
        sv.stop()
        await asyncio.wait_for(serving, WAIT)
        assert worker_ended.is_set()  # its token was set: it was stopped, not abandoned
    else:
        with pytest.raises(ServiceFailed) as info:
            await asyncio.wait_for(serving, WAIT)
        assert info.value.service == "handmade"
    assert sv.status()["worker"].state == "stopped"
    # Its thread has handed its end to the loop; it may still be returning.
    await await_until(
        lambda: not [t for t in threading.enumerate() if t.name == "offloop-service-worker"],
        WAIT,
        "the worker's thread to end",
    )
    error = sv.status()["handmade"].last_error
    assert isinstance(error, TypeError)
    assert str(error) == (
        f"The {broken}() of service 'handmade' (<_SyncMethod 'handmade'>) returned None, not "
        f"an awaitable. The supervisor awaits start(), wait() and stop() on its loop: make "
        f"{broken}() an 'async def' method, or have it return a coroutine or future."
    )

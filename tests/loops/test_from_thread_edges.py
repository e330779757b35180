"""offloop.from_thread at its edges: what it refuses, rare exceptions, a worker's stop token."""

from __future__ import annotations

import asyncio
import functools
import gc
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest

import offloop
from offloop import CallerGoneError, from_thread
from offloop._core.token import StopToken, WorkerCall, thread_state
from offloop._loops.target import shared as shared_loop_thread
from tests.helpers import in_plain_thread, where_am_i

WAIT = 10.0  # bound on every wait: a hang fails the test instead of stalling it


# -- plain threads: the shared background loop ---------------------------------


def test_an_async_generator_function_is_refused_with_how_to_wrap_it() -> None:
    async def rows() -> Any:
        yield 1

    with pytest.raises(
        TypeError, match=r"\.rows' is an async generator function.*async def collect"
    ):
        from_thread(rows)
    with offloop.LoopThread(name="agen") as lt, pytest.raises(TypeError, match="async generator"):
        lt.call(rows)


def test_a_sync_function_is_refused_before_it_runs_anywhere() -> None:
    ran: list[str] = []

    def sync_fn() -> int:
        ran.append(threading.current_thread().name)
        return 1

    class Callable_:
        def __call__(self) -> int:
            ran.append("object")
            return 3

    for fn in (sync_fn, functools.partial(sync_fn), Callable_(), len, lambda: sync_fn()):
        with pytest.raises(TypeError, match=r"from_thread\(\) needs a coroutine function.*sync"):
            from_thread(fn)  # type: ignore[arg-type]
    with offloop.LoopThread(name="refuses") as lt:
        with pytest.raises(TypeError, match=r"LoopThread\.call\(\) needs a coroutine function"):
            lt.call(sync_fn)  # type: ignore[arg-type]

        async def from_a_loop() -> None:
            with pytest.raises(TypeError, match=r"to_loop\(\) needs a coroutine function"):
                await offloop.to_loop(sync_fn)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"LoopThread\.run\(\) needs a coroutine function"):
                await lt.run(sync_fn)  # type: ignore[arg-type]

        asyncio.run(from_a_loop())
        assert " 0 tasks" in repr(lt)
    assert ran == []


def test_what_returns_a_coroutine_is_still_accepted() -> None:
    async def double(x: int) -> int:
        return 2 * x

    @functools.wraps(double)
    def sync_decorator(x: int) -> Any:  # a decorator that is not async itself
        return double(x)

    class AsyncCallable:
        async def __call__(self, x: int) -> int:
            return 3 * x

    class Holder:
        async def method(self, x: int) -> int:
            return 4 * x

    @offloop.threaded
    def in_a_worker(x: int) -> int:
        return 5 * x

    assert from_thread(functools.partial(double, 1)) == 2
    assert from_thread(sync_decorator, 1) == 2
    assert from_thread(AsyncCallable(), 1) == 3
    assert from_thread(Holder().method, 1) == 4
    assert from_thread(in_a_worker, 1) == 5


class Fatal(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


async def fatal() -> None:
    await asyncio.sleep(0)
    raise Fatal("from the coroutine")


@pytest.mark.loops("asyncio", "uvloop")
async def test_a_base_exception_reaches_the_worker_and_is_not_logged_as_never_retrieved() -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: reported.append(context))

    def worker() -> str:
        try:
            from_thread(fatal)
        except Fatal as exc:
            return str(exc)
        return "no exception"

    # And from a plain thread, onto the shared loop thread.
    shared_reported: list[dict[str, Any]] = []
    shared = shared_loop_thread.get().loop
    assert shared is not None
    shared.set_exception_handler(lambda loop, context: shared_reported.append(context))
    try:
        assert await offloop.to_thread(worker) == "from the coroutine"
        assert await asyncio.to_thread(worker) == "from the coroutine"
        gc.collect()  # a task with an exception nobody retrieved is reported when collected
        assert reported == []
        assert shared_reported == []
    finally:
        loop.set_exception_handler(None)
        shared.set_exception_handler(None)


class FactoryRefused(Exception):
    pass


def refusing_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    coro.close()
    raise FactoryRefused("no tasks today")


@pytest.mark.loops("asyncio", "uvloop")
async def test_a_task_factory_that_raises_reaches_the_worker_instead_of_hanging_it() -> None:
    loop = asyncio.get_running_loop()

    def worker() -> str:
        try:
            from_thread(where_am_i)
        except FactoryRefused as exc:
            return str(exc)
        return "no exception"

    loop.set_task_factory(refusing_factory)
    try:
        outcome = await asyncio.wait_for(offloop.to_thread(worker), 10)
    finally:
        loop.set_task_factory(None)
    assert outcome == "no tasks today"


# -- a worker's stop token and its crossing: the outcome on every interleaving --

CALLS: dict[str, Callable[[offloop.LoopThread, Callable[[], Any]], Any]] = {
    "from_thread": lambda lt, async_fn: from_thread(async_fn),
    "LoopThread.call": lambda lt, async_fn: lt.call(async_fn),
}


def as_worker(
    lt: offloop.LoopThread, token: StopToken, call: Callable[[], Any]
) -> Callable[[], Any]:
    """``call`` run as an offloop worker sent by ``lt``'s loop, with ``token``."""

    def worker() -> Any:
        thread_state.call = WorkerCall(worker, lt.loop, token)
        try:
            return call()
        finally:
            thread_state.call = None

    return worker


@pytest.mark.parametrize("via", CALLS)
def test_a_token_set_before_the_call_refuses_it_on_every_interleaving(
    via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = threading.Event()
    either = threading.Event()  # the coroutine ran, or the caller got its outcome

    async def record() -> str:
        ran.set()
        either.set()
        return "ran"

    token = StopToken()
    token.set("cancelled")
    outcome: queue.SimpleQueue[Any] = queue.SimpleQueue()
    with offloop.LoopThread(name="pre-set") as lt:
        worker = as_worker(lt, token, lambda: CALLS[via](lt, record))

        def caller() -> None:
            try:
                outcome.put(worker())
            except BaseException as exc:  # recorded for the assertions below
                outcome.put(exc)
            either.set()

        # A caller that sent the call first and only then looked at its token
        # stalls in add_callback() here while the loop starts the coroutine;
        # refused up front, it never gets that far.
        released = threading.Event()
        add_callback = StopToken.add_callback

        def stalled(self: StopToken, callback: Callable[[StopToken], object]) -> None:
            assert released.wait(WAIT)
            add_callback(self, callback)

        monkeypatch.setattr(StopToken, "add_callback", stalled)
        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        try:
            assert either.wait(WAIT)
        finally:
            released.set()
            monkeypatch.undo()
        first = outcome.get(timeout=WAIT)
        thread.join(WAIT)
        assert lt.call(asyncio.sleep, 0, "idle") == "idle"  # whatever was sent has run
    assert not ran.is_set()
    assert isinstance(first, CallerGoneError), first
    assert "'cancelled'" in str(first)


@pytest.mark.parametrize("via", CALLS)
@pytest.mark.parametrize("completes", [True, False], ids=["completes", "pending"])
def test_a_token_set_while_the_coroutine_runs_cancels_it_unless_it_completed(
    via: str, completes: bool
) -> None:
    in_step = threading.Event()
    release = threading.Event()
    cancelled = threading.Event()

    async def last_step() -> str:
        in_step.set()
        assert release.wait(WAIT)  # holds the loop thread mid-step, on purpose
        if not completes:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "completed"

    token = StopToken()
    with offloop.LoopThread(name="late-stop") as lt:
        worker = as_worker(lt, token, lambda: CALLS[via](lt, last_step))
        outcome: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def caller() -> None:
            try:
                outcome.put(worker())
            except BaseException as exc:  # recorded for the assertions below
                outcome.put(exc)

        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        assert in_step.wait(WAIT)
        token.set("cancelled")  # while the coroutine runs, before it completes or awaits
        release.set()
        result = outcome.get(timeout=WAIT)
        thread.join(WAIT)
    if completes:
        # It completed before the stop reached its loop: its work is done,
        # and the caller gets its result.
        assert result == "completed"
    else:
        assert isinstance(result, CallerGoneError), result
        assert cancelled.is_set()


def test_a_token_set_while_the_loop_does_not_run_ends_the_wait() -> None:
    # The stop is decided on the coroutine's loop; one that is not running
    # cannot decide it (nor run the coroutine), so the caller stops waiting.
    loop = asyncio.new_event_loop()
    ran = threading.Event()
    waiting = threading.Event()

    async def never() -> None:
        ran.set()

    token = StopToken()

    def worker() -> None:
        thread_state.call = WorkerCall(worker, loop, token)
        waiting.set()
        try:
            from_thread(never)
        finally:
            thread_state.call = None

    def stop_once_waiting() -> None:
        assert waiting.wait(WAIT)
        token.set("pool closing")

    stopper = threading.Thread(target=stop_once_waiting)
    stopper.start()
    try:
        with pytest.raises(CallerGoneError, match="'pool closing'"):
            in_plain_thread(worker)
        loop.run_until_complete(asyncio.sleep(0))  # run what was scheduled
        assert not ran.is_set()
    finally:
        stopper.join(WAIT)
        loop.close()


# -- the calling thread's own event loop, not running ---------------------------


def test_asyncio_keeps_this_threads_loop_where_the_idle_loop_check_reads_it() -> None:
    # refuse_own_idle_loop() reads the default policy's per-thread loop, a
    # private attribute: the public getter may create a loop or warn. If a
    # Python release moves it, this names what moved (the check would then
    # refuse nothing, and the crossing would hang as it did before it).
    def in_thread() -> bool:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            policy = asyncio.events._event_loop_policy  # type: ignore[attr-defined]
            return policy._local._loop is loop
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    assert in_plain_thread(in_thread), "asyncio.events._event_loop_policy._local._loop moved"


def test_a_blocking_crossing_into_this_threads_idle_loop_is_refused_at_once() -> None:
    # Only this thread would run its own loop, and it would block waiting for
    # that loop to run the call: refused before anything is sent.
    ran: list[str] = []

    async def coro() -> str:
        ran.append("coro")
        return "ran"

    def fn() -> str:
        ran.append("fn")
        return "ran"

    def in_thread() -> list[str]:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        refused: list[str] = []
        try:
            portal = offloop.Portal(loop)
            offloop.set_from_thread_loop(loop)
            try:
                crossings: list[tuple[str, Callable[[], str]]] = [
                    ("from_thread", lambda: from_thread(coro)),
                    ("Portal.call", lambda: portal.call(coro)),
                    ("Portal.call_sync", lambda: portal.call_sync(fn)),
                ]
                for where, cross in crossings:
                    with pytest.raises(offloop.WouldDeadlockError) as caught:
                        cross()
                    refused.append(where)
                    assert "this thread's event loop" in str(caught.value)
                    assert "not running" in str(caught.value)
            finally:
                offloop.set_from_thread_loop(None)
            # Nothing was left queued there for a later run.
            loop.run_until_complete(asyncio.sleep(0))
            assert ran == []
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        return refused

    assert in_plain_thread(in_thread) == ["from_thread", "Portal.call", "Portal.call_sync"]


def test_a_loop_another_thread_runs_later_is_still_waited_for() -> None:
    # Not running yet, but not the calling thread's: another thread may start it.
    loop = asyncio.new_event_loop()
    sent = threading.Event()

    async def coro() -> str:
        return "ran"

    def call() -> str:
        sent.set()
        return offloop.Portal(loop).call(coro)

    caller = threading.Thread(target=lambda: results.put(call()), name="idle-loop-caller")
    results: queue.SimpleQueue[str] = queue.SimpleQueue()
    caller.start()
    try:
        assert sent.wait(WAIT)

        async def until_answered() -> str:
            return await asyncio.to_thread(results.get, True, WAIT)

        assert loop.run_until_complete(until_answered()) == "ran"
    finally:
        caller.join(WAIT)
        loop.close()
    assert not caller.is_alive()

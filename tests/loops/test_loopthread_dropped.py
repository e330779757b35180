"""A LoopThread its user dropped without closing it: warned about, and stopped.

Its thread holds it only weakly, so a started LoopThread that nobody
references any more is collected: a ResourceWarning names it, and its loop is
shut down as close() does it (tasks cancelled, executor shut down, loop
closed) and its thread exits. A call in flight keeps it alive until that call
is over.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from offloop._loops import loopthread as _loopthread
from offloop._loops.loopthread import LoopThread
from tests.helpers import (
    WAIT,
    await_until,
    collected,
    open_fds,
    resource_warnings,
    the_warning,
    wait_until,
    warned,
)

WARNING = (
    r"LoopThread '{name}' was garbage collected without being closed; its thread "
    r"offloop-loop-{name} and its event loop are being stopped now .* 'lt.close\(\)'"
)


@pytest.fixture(scope="module", autouse=True)
def _uvloop_opened() -> None:
    # uvloop's first loop opens descriptors that live as long as the process:
    # open them before any test's leak snapshot.
    uvloop.new_event_loop().close()


def loop_threads(name: str) -> list[threading.Thread]:
    """The loop thread ``offloop-loop-<name>`` and its executor's threads."""
    prefix = f"offloop-loop-{name}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"{thread.name} still runs"


async def executor_thread() -> str:
    # Starts a thread of the loop's default executor, which the drop must shut down.
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: threading.current_thread().name
    )


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_dropped_running_loop_thread_warns_and_stops_its_loop_and_thread(
    loop_factory: Any,
) -> None:
    fds_before = open_fds()
    started, cleaned_up = threading.Event(), threading.Event()

    async def pending() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.set()

    async def spawn() -> None:
        # A task of its own, not a call: a call in flight would keep the LoopThread alive.
        asyncio.get_running_loop().create_task(pending())

    lt = LoopThread(name="dropped", loop_factory=loop_factory).start()
    lt.call(spawn)
    assert lt.call(executor_thread).startswith("offloop-loop-dropped-executor")
    assert started.wait(WAIT)
    loop = lt.loop
    assert loop is not None
    threads = loop_threads("dropped")
    assert len(threads) == 2, [t.name for t in threads]
    ref = weakref.ref(lt)
    with resource_warnings() as found:
        del lt
        wait_until(
            lambda: collected(ref) and warned(found, WARNING.format(name="dropped")),
            WAIT,
            "the dropped LoopThread to be collected and warn",
        )
    the_warning(found, WARNING.format(name="dropped"))
    join_all(threads)
    assert loop.is_closed()
    assert cleaned_up.is_set(), "the task still pending on the loop was not cancelled"
    assert open_fds() <= fds_before


def test_a_loop_thread_dropped_during_a_call_lives_until_the_call_returns() -> None:
    lt = LoopThread(name="dropped-busy").start()
    loop = lt.loop
    assert loop is not None
    gate: asyncio.Future[None] = lt.call(new_future)
    entered = threading.Event()

    async def held() -> str:
        entered.set()
        await gate
        return "done"

    results: list[str] = []

    def call_held(call: Callable[[Callable[[], Awaitable[str]]], str]) -> None:
        results.append(call(held))

    # Another thread calls; the thread holds the bound method (so the LoopThread) as it runs.
    caller = threading.Thread(target=call_held, args=(lt.call,), name="test-caller")
    threads = loop_threads("dropped-busy")
    ref = weakref.ref(lt)
    del lt
    with resource_warnings() as found:
        caller.start()
        assert entered.wait(WAIT), "the call never started"
        gc.collect()
        assert ref() is not None, "a LoopThread running a call was collected"
        assert found == []
        loop.call_soon_threadsafe(gate.set_result, None)
        caller.join(WAIT)
        assert not caller.is_alive(), "the call never returned"
        assert results == ["done"]
        wait_until(
            lambda: collected(ref) and warned(found, WARNING.format(name="dropped-busy")),
            WAIT,
            "the dropped LoopThread to be collected and warn",
        )
    the_warning(found, WARNING.format(name="dropped-busy"))
    join_all(threads)
    assert loop.is_closed()


async def new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def test_a_loop_thread_dropped_on_its_own_thread_holding_its_lock_stops_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The finalizer runs on whichever thread drops the last reference: here
    # the loop thread, in a callback, while that thread holds the LoopThread's
    # lock. A finalizer that took the lock or waited for the loop would hang.
    finalized_on: list[str] = []
    dropped = getattr(_loopthread, "dropped", None)

    def spy(*args: Any) -> None:
        finalized_on.append(threading.current_thread().name)
        assert dropped is not None
        dropped(*args)

    monkeypatch.setattr(_loopthread, "dropped", spy, raising=False)
    lt = LoopThread(name="dropped-on-loop").start()
    loop, lock = lt.loop, lt._lock
    assert loop is not None
    threads = loop_threads("dropped-on-loop")
    ref = weakref.ref(lt)
    box = [lt]
    del lt

    def drop() -> None:
        with lock:
            box.clear()
            gc.collect()

    with resource_warnings() as found:
        loop.call_soon_threadsafe(drop)
        join_all(threads)
    the_warning(found, WARNING.format(name="dropped-on-loop"))
    assert finalized_on == ["offloop-loop-dropped-on-loop"]
    assert ref() is None
    assert loop.is_closed()


def test_only_a_started_unclosed_loop_thread_warns() -> None:
    async def leave() -> None:
        raise SystemExit(3)

    async def nothing() -> None:
        pass

    never_started = LoopThread(name="never-started")
    closed = LoopThread(name="closed")
    closed.call(nothing)
    closed.close()
    exited = LoopThread(name="exited")  # its loop stopped by a coroutine's SystemExit
    with pytest.raises(SystemExit):
        exited.call(leave)
    exited_threads = loop_threads("exited")
    join_all(exited_threads)
    dropped = LoopThread(name="dropped-among-others").start()
    threads = loop_threads("dropped-among-others")
    refs = [weakref.ref(lt) for lt in (never_started, closed, exited, dropped)]
    with resource_warnings() as found:
        del never_started, closed, exited, dropped
        wait_until(
            lambda: (
                all(map(collected, refs))
                and warned(found, WARNING.format(name="dropped-among-others"))
            ),
            WAIT,
            "the LoopThreads to be collected and warn",
        )
    the_warning(found, WARNING.format(name="dropped-among-others"))
    join_all(threads)


async def _raises() -> None:
    raise ValueError("from the loop thread")


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("crossing", ["call", "run"])
async def test_a_loop_thread_whose_last_call_raised_is_freed_as_soon_as_it_is_dropped(
    crossing: str,
) -> None:
    # The error's traceback holds the frame that ran the coroutine: if that
    # frame also held the error, the cycle kept the LoopThread (its loop, thread
    # and executor) alive until the garbage collector happened to run.
    name = f"raised-{crossing}"
    lt = LoopThread(name=name).start()
    if crossing == "call":
        with pytest.raises(ValueError, match="from the loop thread"):
            await asyncio.to_thread(lt.call, _raises)
    else:
        with pytest.raises(ValueError, match="from the loop thread"):
            await lt.run(_raises)
    ref = weakref.ref(lt)
    gc.disable()
    try:
        # The loop still holds the handle that woke this task, with the future
        # holding the error, until this step ends.
        await asyncio.sleep(0)
        with resource_warnings() as found:
            del lt
            # The loop thread (or asyncio.to_thread's worker) may still be
            # returning from the call it answered; with the collector off,
            # only the last reference going away can free it, so a cycle
            # would keep it forever and fail this wait.
            await await_until(
                lambda: ref() is None and warned(found, WARNING.format(name=name)),
                WAIT,
                "the dropped LoopThread to be freed and warn",
            )
        the_warning(found, WARNING.format(name=name))
    finally:
        gc.enable()
    await asyncio.to_thread(wait_until, lambda: not loop_threads(name), WAIT, "the thread to end")

"""Edge cases of the thread pool found by trying to break it: closing, cancelling, callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import offloop
from tests.helpers import WAIT, await_until, wait_until


@pytest.mark.loops("asyncio")
async def test_a_stop_callback_that_looks_at_the_pool_does_not_deadlock_its_close() -> None:
    pool = offloop.ThreadPool(2, name="lookback")
    seen: list[str] = []
    started = threading.Event()

    def work() -> None:
        token = offloop.current_token()
        token.add_callback(lambda _: seen.append(repr(pool)))  # takes the pool's lock
        started.set()
        token.wait(WAIT)

    call = pool.run(work)
    assert await asyncio.to_thread(started.wait, WAIT)
    await asyncio.wait_for(pool.aclose(), WAIT)
    await call
    assert len(seen) == 1
    assert seen[0].startswith("<ThreadPool 'lookback' closing")


@pytest.mark.loops("asyncio")
async def test_close_with_every_thread_stuck_fails_the_queued_calls_at_once() -> None:
    pool = offloop.ThreadPool(1, name="stuck-close")
    release = threading.Event()
    stuck = pool.run(release.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    queued = pool.run(abs, -1)
    try:
        await asyncio.wait_for(pool.aclose(timeout=0.01), WAIT)
        with pytest.raises(offloop.PoolClosedError, match="closed before this call of"):
            await asyncio.wait_for(queued, WAIT)  # not left waiting behind the stuck call
        assert pool.statistics()["queued"] == 0
        with pytest.raises(offloop.PoolClosedError, match="the call was abandoned"):
            await asyncio.wait_for(stuck, WAIT)
    finally:
        release.set()


@pytest.mark.loops("asyncio")
async def test_wait_policy_delivers_a_timeout_not_the_result() -> None:
    # asyncio.wait_for on 3.10/3.11 returned the result when cancel() was refused.
    async with offloop.ThreadPool(1, name="waiting", on_cancel="wait") as pool:
        finished: list[bool] = []

        def cooperative() -> str:
            stopped = offloop.current_token().wait(WAIT)
            finished.append(stopped)
            return "partial result"

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.run(cooperative), 0.05)
        assert finished == [True]  # the function returned before the timeout surfaced
        fut = pool.run(cooperative)
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
        assert fut.cancel() is True  # accepted, delivered when the function returns
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert fut.cancelled()
        assert pool.statistics()["cancelled"] == 2


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("policy", ["abandon", "wait"])
async def test_a_task_cancelled_before_its_first_step_cancels_the_call(policy: str) -> None:
    async with offloop.ThreadPool(1, name="early", on_cancel=policy) as pool:  # type: ignore[arg-type]
        release = threading.Event()
        blocker = pool.run(release.wait, WAIT)
        fut = pool.run(abs, -1)  # queued behind the blocker
        task = asyncio.create_task(fut)
        task.cancel()  # before the task ever ran: it throws into the future
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled()
        assert fut.token.is_set()
        release.set()
        await blocker
        assert pool.statistics()["cancelled"] == 1


def test_a_raising_stop_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = offloop.StopToken()
    ran: list[str] = []
    token.add_callback(lambda _: 1 / 0)
    token.add_callback(lambda _: ran.append("second"))
    with caplog.at_level(logging.ERROR, logger="offloop"):
        token.set("stop")  # does not raise into whoever sets it
    assert ran == ["second"]
    assert "StopToken callback" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def failing_cleanup() -> Iterator[int]:
    try:
        yield from range(100)
    finally:
        raise RuntimeError("could not release the cursor")


@pytest.mark.loops("asyncio")
async def test_iterate_aclose_raises_what_closing_the_source_raised() -> None:
    it = offloop.iterate(failing_cleanup(), buffer=2)
    async for _ in it:
        break
    with pytest.raises(RuntimeError, match="could not release the cursor"):
        await asyncio.wait_for(it.aclose(), WAIT)
    await it.aclose()  # reported once


@pytest.mark.loops("asyncio")
async def test_iterate_dropped_logs_what_closing_the_source_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="offloop"):
        async for _ in offloop.iterate(failing_cleanup(), buffer=2):
            break  # the iterator is dropped: nobody awaits aclose()
        await await_until(lambda: "closing the source" in caplog.text, WAIT, "the log line")
    assert "could not release the cursor" in caplog.text


@pytest.mark.loops("asyncio")
async def test_close_from_one_of_its_own_workers_is_refused_not_a_hang() -> None:
    pool = offloop.ThreadPool(2, name="selfclose")

    def closer() -> None:
        pool.close(timeout=WAIT)  # would wait for this very thread to exit

    with pytest.raises(offloop.WouldDeadlockError, match="own worker threads"):
        await asyncio.wait_for(pool.run(closer), WAIT)
    assert await pool.run(abs, -2) == 2  # refused before anything changed
    await asyncio.wait_for(pool.aclose(), WAIT)


@pytest.mark.loops("asyncio")
async def test_a_thread_that_fails_to_start_leaves_its_call_unrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_start = threading.Thread.start
    failures = [RuntimeError("can't start new thread")]

    def flaky_start(thread: threading.Thread) -> None:
        if failures and thread.name.startswith("offloop-nostart-"):
            raise failures.pop()
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    ran: list[str] = []
    pool = offloop.ThreadPool(2, name="nostart")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pool.run(ran.append, "told it failed")
    assert pool.statistics()["queued"] == 0
    await asyncio.wait_for(pool.run(ran.append, "second"), WAIT)
    await asyncio.wait_for(pool.aclose(), WAIT)
    assert ran == ["second"]  # the call whose run() raised never ran
    stats = pool.statistics()
    assert (stats["completed"], stats["queued"], stats["threads"]) == (1, 0, 0)


@pytest.mark.loops("asyncio")
async def test_calls_that_lost_their_thread_hold_no_slot_once_no_thread_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A call whose thread failed to start waits, dispatched, for the next
    # thread that comes free. With no thread left none ever does: were it
    # still counted as dispatched, it would hold its CPU slot for good, and
    # the pool would not dispatch another call even once threads start again.
    real_start = threading.Thread.start
    failing = threading.Event()
    failing.set()

    def flaky_start(thread: threading.Thread) -> None:
        if failing.is_set() and thread.name.startswith("offloop-noslot-"):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    pool = offloop.ThreadPool(2, name="noslot", cpu_slots=1)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pool.run(abs, -1)
    failing.clear()
    assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2
    await asyncio.wait_for(pool.aclose(), WAIT)
    stats = pool.statistics()
    assert (stats["completed"], stats["queued"], stats["threads"]) == (1, 0, 0)


@pytest.mark.loops("asyncio")
async def test_an_awaiter_cancelled_while_the_pool_closes_counts_as_cancelled() -> None:
    pool = offloop.ThreadPool(1, name="cancelclosing")
    release = threading.Event()
    call = pool.run(release.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    closing = asyncio.ensure_future(pool.aclose())
    await await_until(lambda: pool.statistics()["state"] == "closing", WAIT)
    assert call.cancel()
    stats = pool.statistics()
    assert (stats["abandoned"], stats["cancelled"]) == (1, 1)
    release.set()
    await asyncio.wait_for(closing, WAIT)


@pytest.mark.loops("asyncio")
async def test_a_function_raising_cancelled_error_reaches_the_awaiter_as_that_error() -> None:
    def give_up() -> None:
        raise asyncio.CancelledError("the function's own")

    # As with asyncio.to_thread: the exception itself, message and traceback kept.
    with pytest.raises(asyncio.CancelledError, match="the function's own") as info:
        await asyncio.wait_for(offloop.to_thread(give_up), WAIT)
    assert info.traceback[-1].name == "give_up"


@pytest.mark.loops("asyncio")
async def test_a_growth_thread_that_fails_to_start_is_logged_and_its_call_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_start = threading.Thread.start
    refused: list[str] = []

    def flaky_start(thread: threading.Thread) -> None:
        if thread.name.startswith("offloop-nogrow-") and thread.name != "offloop-nogrow-1":
            refused.append(thread.name)  # every thread growth adds
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    pool = offloop.ThreadPool(2, name="nogrow")
    release = threading.Event()
    busy = pool.run(release.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    queued = pool.run(abs, -5)  # queues behind the busy thread: growth tries a second one
    await await_until(lambda: bool(refused), WAIT, "the growth check to try a thread")
    assert "could not start a worker thread" in caplog.text
    assert pool.statistics()["threads"] == 1  # no thread-less worker left behind
    assert refused == ["offloop-nogrow-2"]  # not retried every period, nor logged each time
    release.set()
    assert await asyncio.wait_for(queued, WAIT) == 5  # run by the first thread once free
    assert await busy is True
    await asyncio.wait_for(pool.aclose(), WAIT)  # waits for no thread that never started


class _Lines:
    def lines(self) -> Iterator[str]:
        yield "a"


@pytest.mark.loops("asyncio")
async def test_a_generator_function_is_refused_with_a_pointer_to_iterate() -> None:
    # In a worker only the generator's creation would run; its blocking body
    # would run later, on the loop's thread, wherever it is iterated.
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(
        TypeError,
        match=r"^offloop\.to_thread\(\) got function .*numbers', a generator function.*"
        r"offloop\.iterate\(numbers\(\.\.\.\)\)",
    ):
        offloop.to_thread(numbers)
    async with offloop.ThreadPool(1, name="gens") as pool:
        for fn in (_Lines().lines, functools.partial(numbers)):
            with pytest.raises(TypeError, match=r"a generator function.*offloop\.iterate"):
                pool.run(fn)
        assert pool.statistics()["threads"] == 0  # nothing was queued
    with pytest.raises(TypeError, match=r"^offloop\.threaded got .*, a generator function"):
        offloop.threaded(numbers)
    with pytest.raises(TypeError, match=r"got a generator object.*offloop\.iterate"):
        offloop.to_thread(numbers())  # type: ignore[arg-type]


def test_the_loop_of_a_finished_asyncio_run_is_not_kept_alive() -> None:
    # A thread that ran asyncio.run() and then does something else (or
    # nothing) must not keep the closed loop, and all it references, alive.
    refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await offloop.to_thread(len, "abc") == 3
        async with offloop.ThreadPool(1, name="collectable") as pool:
            assert await pool.run(len, "ab") == 2
            assert [x async for x in offloop.iterate(range(3), pool=pool)] == [0, 1, 2]

    asyncio.run(main())
    gc.collect()
    assert refs[0]() is None, gc.get_referrers(refs[0]())


def test_a_closed_loop_that_left_calls_running_is_not_kept_alive() -> None:
    # Calls still running when their loop closes finish later; their results
    # reach nobody and must not keep the closed loop alive.
    loop = asyncio.new_event_loop()
    ref = weakref.ref(loop)
    first = threading.Event()
    others = threading.Event()
    pool = offloop.ThreadPool(1, name="left-running")

    async def start() -> None:
        pool.run(first.wait, WAIT)
        pool.run(others.wait, WAIT)
        pool.run(others.wait, WAIT)

    try:
        loop.run_until_complete(start())
        # The first result's delivery is scheduled on the loop, which is
        # closed before it runs again; the next two arrive after the close.
        first.set()
        wait_until(lambda: pool.statistics()["completed"] == 1, WAIT, "the first call")
        loop.close()
        del loop
        others.set()
        wait_until(lambda: pool.statistics()["completed"] == 3, WAIT, "the other calls")
        gc.collect()
        assert ref() is None, gc.get_referrers(ref())
    finally:
        pool.close()


def test_a_pool_that_grew_for_a_loop_does_not_keep_it_alive() -> None:
    # A loop that queued calls behind busy threads arms the pool's growth
    # check; closed with the check still armed, it must not stay referenced.
    release = threading.Event()
    pool = offloop.ThreadPool(2, name="grew")
    refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        pool.run(release.wait, WAIT)
        pool.run(release.wait, WAIT)  # queued behind the first: the check is armed

    try:
        asyncio.run(main())
        release.set()
        wait_until(lambda: pool.statistics()["completed"] == 2, WAIT, "the calls to finish")
        gc.collect()
        assert refs[0]() is None, gc.get_referrers(refs[0]())
    finally:
        pool.close()


class Payload:
    """An argument, keyword or context value whose lifetime the tests watch."""


payload_var: contextvars.ContextVar[Payload | None] = contextvars.ContextVar(
    "payload_var", default=None
)


@pytest.mark.loops("asyncio", "uvloop")
async def test_a_finished_call_does_not_keep_its_arguments_and_context_alive() -> None:
    def use(arg: Payload, *, kw: Payload) -> str:
        return type(arg).__name__

    arg, kw, in_context = Payload(), Payload(), Payload()
    refs = [weakref.ref(x) for x in (arg, kw, in_context)]
    payload_var.set(in_context)
    done = offloop.to_thread(use, arg, kw=kw)
    payload_var.set(None)
    del arg, kw, in_context
    assert await done == "Payload"
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]  # while `done` is still referenced

    # A call cancelled before it started never runs: dropped at once too.
    release = threading.Event()
    async with offloop.ThreadPool(1, name="drops") as pool:
        blocker = pool.run(release.wait, WAIT)
        queued_arg = Payload()
        queued_ref = weakref.ref(queued_arg)
        queued = pool.run(use, queued_arg, kw=queued_arg)
        del queued_arg
        queued.cancel()
        gc.collect()
        assert queued_ref() is None
        release.set()
        assert await blocker
    assert queued.cancelled()


BAD_TIMEOUTS = [
    ("x", TypeError, r"must be a number of seconds or None, got str 'x'\. Pass"),
    (-1, ValueError, r"must be at least 0 seconds, got -1\. Pass 0"),
    (float("nan"), ValueError, r"must be at least 0 seconds, got nan"),
    (True, TypeError, r"must be a number of seconds or None, got bool"),
]


@pytest.mark.loops("asyncio")
async def test_a_bad_close_timeout_is_refused_before_the_pool_closes() -> None:
    pool = offloop.ThreadPool(1, name="timeouts")
    for timeout, error, match in BAD_TIMEOUTS:
        with pytest.raises(error, match=r"^ThreadPool\.aclose\(timeout=\.\.\.\) " + match):
            await pool.aclose(timeout=timeout)  # type: ignore[arg-type]
        assert pool.statistics()["state"] == "open"
        with pytest.raises(error, match=r"^ThreadPool\.close\(timeout=\.\.\.\) " + match):
            await asyncio.to_thread(pool.close, timeout=timeout)  # type: ignore[arg-type]
        assert pool.statistics()["state"] == "open"
    assert await pool.run(abs, -2) == 2
    # Beyond what a wait can take (threading.TIMEOUT_MAX): no timeout.
    await asyncio.to_thread(pool.close, timeout=1e10)
    assert pool.statistics()["state"] == "closed"


@pytest.mark.loops("asyncio")
async def test_an_object_with_an_async_call_is_refused_when_sent_not_when_awaited() -> None:
    class Handler:
        async def __call__(self) -> int:
            return 1

    class Lines:
        def __call__(self) -> Iterator[str]:
            yield "a"

    with pytest.raises(
        TypeError, match=r"^offloop\.to_thread\(\) got Handler .*whose __call__ is a coroutine"
    ):
        offloop.to_thread(Handler())
    with pytest.raises(TypeError, match=r"whose __call__ is a generator function.*iterate"):
        offloop.to_thread(Lines())


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("to", ["an idle thread", "a new thread"])
async def test_a_call_dispatched_while_another_thread_closes_the_pool_is_never_stranded(
    to: str,
) -> None:
    # A call is handed to an idle thread, or put on the queue for a new one,
    # under the pool's lock: a close() from another thread waits for it, so
    # it either knows of the call or the call sees the pool closing, never
    # neither. The wrappers widen the window a close could slip into between
    # the count and the hand-over.
    pool = offloop.ThreadPool(2, name="close-race")
    closer_started = threading.Event()
    closed = threading.Event()

    def close_it() -> None:
        closer_started.set()
        pool.close(timeout=WAIT)
        closed.set()

    def widen() -> None:
        threading.Thread(target=close_it, daemon=True).start()
        closer_started.wait(WAIT)
        time.sleep(0.05)  # not a bound: gives the closer time to try its close

    if to == "an idle thread":
        await pool.run(int)  # one warm worker, idle
        (worker,) = pool._idle
        real_wake = worker.wake

        class WidenedWake:
            def acquire(self, *args: Any) -> bool:
                return real_wake.acquire(*args)

            def release(self) -> None:
                if worker.hand is not None:  # the call, not the close's None
                    widen()
                real_wake.release()

        worker.wake = WidenedWake()  # type: ignore[assignment]
    else:
        real_queue = pool._queue

        class WidenedQueue:
            def put(self, item: Any) -> None:
                if item is not None:
                    widen()
                real_queue.put(item)

            def get(self, *args: Any, **kwargs: Any) -> Any:
                return real_queue.get(*args, **kwargs)

            def get_nowait(self) -> Any:
                return real_queue.get_nowait()

        pool._queue = WidenedQueue()  # type: ignore[assignment]
    call = pool.run(int, 7)
    # Either it ran before the close, or the close failed it: never a hang.
    with contextlib.suppress(offloop.PoolClosedError):
        assert await asyncio.wait_for(asyncio.shield(call), WAIT) == 7
    assert await asyncio.to_thread(closed.wait, WAIT)
    assert closer_started.is_set()  # the window was really widened


@pytest.mark.allow_leaks  # the stuck thread is abandoned on purpose, then released
def test_a_sync_close_that_times_out_fails_the_awaiters_of_the_stuck_calls() -> None:
    # The awaiter lives on a loop thread of its own; close() runs in this plain thread.
    pool = offloop.ThreadPool(1, name="stuck-sync")
    release = threading.Event()
    outcome: list[BaseException | bool] = []
    running = threading.Event()

    async def awaiter() -> None:
        call = pool.run(release.wait, WAIT)
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
        running.set()
        try:
            outcome.append(await call)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=asyncio.run, args=(awaiter(),))
    thread.start()
    try:
        assert running.wait(WAIT)
        pool.close(timeout=0.01)
        thread.join(WAIT)
        assert not thread.is_alive(), "the awaiter still waits for the abandoned call"
        assert len(outcome) == 1
        assert isinstance(outcome[0], offloop.PoolClosedError)
    finally:
        release.set()
        thread.join(WAIT)

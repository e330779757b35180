"""pool.executor(): a concurrent.futures executor over ThreadPool and ProcessPool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import operator
import threading
from typing import Any

import pytest

import offloop
from tests.helpers import WAIT, await_until, in_plain_thread, wait_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def whoami(tag: int) -> tuple[int, str, str]:
    return tag, threading.current_thread().name, request_id.get()


async def test_default_executor_sends_to_thread_through_the_pool() -> None:
    async with offloop.ThreadPool(1, name="view") as pool:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(pool.executor())
        request_id.set("req-1")
        assert await asyncio.to_thread(whoami, 1) == (1, "offloop-view-1", "req-1")
        assert await loop.run_in_executor(None, whoami, 2) == (2, "offloop-view-1", "req-1")
        with pytest.raises(ZeroDivisionError):
            await asyncio.to_thread(operator.truediv, 1, 0)

        # max_workers=1 holds for third-party code too: the second call queues.
        release = threading.Event()
        first = asyncio.ensure_future(asyncio.to_thread(release.wait, WAIT))
        second = asyncio.ensure_future(asyncio.to_thread(whoami, 3))
        await await_until(
            lambda: pool.statistics()["queued"] == 1 and pool.statistics()["running"] == 1,
            what="one call running, one queued",
        )
        assert not second.done()
        release.set()
        assert await first
        assert (await second)[0] == 3


async def test_cancelling_the_awaiter_sets_the_calls_stop_token() -> None:
    async with offloop.ThreadPool(1, name="view-cancel") as pool:
        asyncio.get_running_loop().set_default_executor(pool.executor())
        started = threading.Event()
        stopped = threading.Event()
        queued_ran: list[int] = []

        def blocking() -> None:
            started.set()
            if offloop.current_token().wait(WAIT):
                stopped.set()

        running = asyncio.ensure_future(asyncio.to_thread(blocking))
        queued = asyncio.ensure_future(asyncio.to_thread(queued_ran.append, 1))
        await await_until(started.is_set, what="the call to start")
        queued.cancel()  # still queued behind it: it never runs
        running.cancel()
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        await await_until(stopped.is_set, what="the running call to see its token")
        assert queued_ran == []


def test_plain_threads_submit_and_map_through_the_view() -> None:
    pool = offloop.ThreadPool(2, name="view-plain")
    try:
        executor = pool.executor()

        def body() -> list[tuple[int, str, str]]:
            request_id.set("plain")
            with executor:
                assert executor.submit(whoami, 0).result(WAIT)[2] == "plain"
                return list(executor.map(whoami, range(3)))

        results = in_plain_thread(body)
        assert [tag for tag, _, _ in results] == [0, 1, 2]
        assert all(name.startswith("offloop-view-plain-") for _, name, _ in results)
        assert "shut down: 0 calls" in repr(executor)
        with pytest.raises(RuntimeError, match="shut down"):
            executor.submit(whoami, 9)
        assert pool.statistics()["state"] == "open"  # the view leaves the pool to its owner
    finally:
        pool.close()


def test_shutdown_cancel_futures_stops_calls_in_flight() -> None:
    pool = offloop.ThreadPool(1, name="view-shutdown")
    try:
        executor = pool.executor()
        started = threading.Event()
        stopped = threading.Event()

        def blocking() -> None:
            started.set()
            if offloop.current_token().wait(WAIT):
                stopped.set()

        running = executor.submit(blocking)
        queued = executor.submit(whoami, 1)
        assert started.wait(WAIT)
        executor.shutdown(wait=True, cancel_futures=True)
        assert running.cancelled()
        assert queued.cancelled()
        assert stopped.wait(WAIT)  # the running call was told to stop
        done, _ = cf.wait([running, queued], timeout=WAIT)
        assert len(done) == 2
    finally:
        pool.close()


@pytest.mark.loops("asyncio")
async def test_a_process_pool_as_the_default_executor() -> None:
    async with offloop.ProcessPool(1) as pool:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(pool.executor())
        assert await asyncio.to_thread(pow, 2, 10) == 1024
        assert await loop.run_in_executor(None, operator.add, 2, 3) == 5


async def test_shutdown_and_wait_on_the_loop_its_calls_report_to_is_refused() -> None:
    # The view's calls report to the loop that submitted them: waiting for
    # them on that loop's thread would block the very loop that has to deliver
    # them (a plain ThreadPoolExecutor's shutdown(wait=True) returns here).
    async with offloop.ThreadPool(1, name="view-deadlock") as pool:
        executor = pool.executor()
        release = threading.Event()
        future = executor.submit(release.wait, WAIT)
        with pytest.raises(offloop.WouldDeadlockError, match=r"shutdown\(wait=True\)"):
            executor.shutdown(wait=True)
        assert "open: 1 calls" in repr(executor)  # refused before anything changed
        release.set()
        assert await asyncio.wrap_future(future) is True
        executor.shutdown(wait=True)  # nothing left to wait for
        executor2 = pool.executor()
        pending = executor2.submit(release.wait, WAIT)
        executor2.shutdown(wait=True, cancel_futures=True)  # cancelling needs no loop
        assert pending.cancelled()


def test_submit_refuses_what_cannot_run_in_a_worker_before_anything_starts() -> None:
    async def coroutine_function() -> None:
        pass

    pool = offloop.ThreadPool(1, name="view-refuse")
    try:
        executor = pool.executor()

        def body() -> None:
            with pytest.raises(TypeError, match="coroutine function"):
                executor.submit(coroutine_function)
            with pytest.raises(TypeError, match="callable"):
                executor.submit(42)  # type: ignore[arg-type]

        in_plain_thread(body)
        # Refused before the view started its loop thread for plain threads.
        assert not [t for t in threading.enumerate() if "view-refuse-executor" in t.name]
        assert "open: 0 calls" in repr(executor)
        executor.shutdown()
    finally:
        pool.close()


async def test_a_call_cancelled_just_after_it_ended_stays_cancelled_without_errors() -> None:
    # The call's end is delivered on the loop; a cancel() that comes before
    # that delivery must win quietly (no "Future in unexpected state").
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with offloop.ThreadPool(1, name="view-late-cancel") as pool:
            executor = pool.executor()
            ran = threading.Event()
            future = executor.submit(ran.set)
            assert ran.wait(WAIT)
            # Let the worker post its outcome to this loop, still undelivered.
            wait_until(lambda: pool.statistics()["running"] == 0, what="the call to end")
            assert future.cancel()
            await await_until(lambda: "0 calls" in repr(executor), what="the call to settle")
            await asyncio.sleep(0)
            assert future.cancelled()
            executor.shutdown()
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_map_on_the_loop_its_calls_report_to_is_refused_before_submitting() -> None:
    # Its results can only be delivered by this loop, which iterating them
    # would block: the iteration would never end.
    async with offloop.ThreadPool(1, name="view-map-refused") as pool:
        executor = pool.executor()
        with pytest.raises(offloop.WouldDeadlockError, match=r"map\(\)"):
            executor.map(abs, [-1, -2])
        assert "open: 0 calls" in repr(executor)
        assert pool.statistics()["completed"] == 0
        executor.shutdown()

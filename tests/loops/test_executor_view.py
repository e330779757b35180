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


async def test_the_worker_completes_the_future_without_the_loop() -> None:
    # The worker that ends a call completes the view's future itself: a loop
    # thread blocked on it (what a sync library on that thread may do) gets
    # the outcome, and the future's callbacks run in the worker, as with a
    # ThreadPoolExecutor.
    async with offloop.ThreadPool(1, name="view-direct") as pool:
        view = pool.executor()
        gate = threading.Event()
        callback_threads: list[str] = []
        future = view.submit(gate.wait, WAIT)
        future.add_done_callback(lambda f: callback_threads.append(threading.current_thread().name))
        gate.set()
        assert future.result(WAIT) is True  # on the loop's thread, the loop blocked
        assert callback_threads == ["offloop-view-direct-1"]
        with pytest.raises(ZeroDivisionError):
            view.submit(operator.truediv, 1, 0).result(WAIT)
        with pytest.raises(RuntimeError, match="StopIteration") as caught:
            view.submit(next, iter(())).result(WAIT)
        assert isinstance(caught.value.__cause__, StopIteration)
        assert "open: 0 calls" in repr(view)
        view.shutdown()


async def test_cancelling_an_awaiter_whose_result_arrived_is_harmless() -> None:
    # The result reaches the view's future while the awaiter is being
    # cancelled: the cancel loses, and nothing is reported to the loop.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with offloop.ThreadPool(1, name="view-race") as pool:
            view = pool.executor()
            future = view.submit(whoami, 1)
            awaiter = asyncio.wrap_future(future)  # what run_in_executor returns
            assert future.result(WAIT)[0] == 1  # delivered while the loop is blocked
            assert not awaiter.cancel() or awaiter.cancelled()
            assert not future.cancel()  # finished: a cancel() from its awaiter loses too
            assert await pool.run(whoami, 2)  # a round trip: every callback above has run
            assert reported == []
            assert not future.cancelled()
            assert "open: 0 calls" in repr(view)
            view.shutdown()
    finally:
        loop.set_exception_handler(None)


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
        futures: list[cf.Future[Any]] = [running, queued]
        done, _ = cf.wait(futures, timeout=WAIT)
        assert len(done) == 2
    finally:
        pool.close()


def test_a_queued_call_cancelled_from_another_thread_never_runs_while_its_loop_is_busy() -> None:
    # The calls are made on a loop that is busy when another thread cancels
    # the second one: the cancel must hold at once, not once that loop gets
    # round to it, by which time a freed thread may have started the call.
    pool = offloop.ThreadPool(1, name="view-busy-loop")
    executor = pool.executor()
    release_first = threading.Event()
    release_loop = threading.Event()
    loop_busy = threading.Event()
    ran: list[int] = []
    futures: list[cf.Future[Any]] = []

    async def submit_then_block() -> None:
        futures.append(executor.submit(release_first.wait, WAIT))
        futures.append(executor.submit(ran.append, 1))  # queued behind the first
        loop_busy.set()
        release_loop.wait(WAIT)  # blocks the loop, as a long callback would
        await asyncio.sleep(0)

    thread = threading.Thread(target=asyncio.run, args=(submit_then_block(),))
    thread.start()
    try:
        assert loop_busy.wait(WAIT)
        first, queued = futures
        assert queued.cancel()
        release_first.set()
        assert first.result(WAIT) is True
        # The thread that ran the first call chose its next one before it
        # completed that call's future: it is idle now unless it took the
        # cancelled call, which it would then run before going idle.
        wait_until(lambda: pool.statistics()["idle"] == 1, what="the thread to go idle")
        assert ran == []
        assert pool.statistics()["cancelled"] == 1
    finally:
        release_first.set()
        release_loop.set()
        thread.join(WAIT)
        pool.close()


class _Interrupt(BaseException):
    """Not an Exception: what concurrent.futures lets out of a done callback."""


def test_a_done_callback_raising_a_base_exception_leaves_the_pools_thread_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The worker that ends a call completes the view's future, and so runs
    # its done callbacks: one that re-raises the call's outcome through
    # result() must not end the thread, which its pool would keep counting.
    pool = offloop.ThreadPool(1, name="view-callback")
    executor = pool.executor()
    release = threading.Event()
    callback_threads: list[str] = []

    def interrupted() -> None:
        release.wait(WAIT)
        raise _Interrupt

    def reraise(future: cf.Future[Any]) -> None:
        callback_threads.append(threading.current_thread().name)
        future.result()

    try:
        future = executor.submit(interrupted)
        future.add_done_callback(reraise)  # before the call ends: the worker runs it
        release.set()
        with pytest.raises(_Interrupt):
            future.result(WAIT)
        assert executor.submit(abs, -4).result(WAIT) == 4  # the pool's one thread serves on
        assert callback_threads == ["offloop-view-callback-1"]
        assert "done callback" in caplog.text
    finally:
        release.set()
        pool.close(timeout=WAIT)
    assert pool.statistics()["threads"] == 0


def test_code_that_sizes_its_work_by_the_executor_sees_the_pools_size_now() -> None:
    # dask.compute(scheduler=executor) keeps executor._max_workers tasks in
    # flight: after pool.max_workers is raised it must run that many at once,
    # not as many as the pool had when the view was made.
    from dask.base import compute
    from dask.delayed import delayed

    pool = offloop.ThreadPool(2, name="view-sized")
    try:
        view = pool.executor()
        assert view._max_workers == 2
        pool.max_workers = 4
        assert view._max_workers == 4
        # Four tasks that each wait for all four: they finish only if dask
        # submits them together.
        barrier = threading.Barrier(4, timeout=WAIT)
        tasks = [delayed(barrier.wait)(dask_key_name=f"wait-{i}") for i in range(4)]
        results = compute(*tasks, scheduler=view)  # type: ignore[no-untyped-call]
        assert sorted(results) == [0, 1, 2, 3]
        pool.max_workers = 1
        assert view._max_workers == 1
        with pytest.raises(AttributeError, match=r"set pool\.max_workers = 3 instead"):
            view._max_workers = 3
        assert pool.max_workers == 1
    finally:
        pool.close()
    processes = offloop.ProcessPool(1)
    try:
        view = processes.executor()
        processes.max_workers = 3
        assert view._max_workers == 3
    finally:
        processes.close()


@pytest.mark.loops("asyncio")
async def test_a_process_pool_as_the_default_executor() -> None:
    async with offloop.ProcessPool(1) as pool:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(pool.executor())
        assert await asyncio.to_thread(pow, 2, 10) == 1024
        assert await loop.run_in_executor(None, operator.add, 2, 3) == 5
        # Completed by the pool's own thread, not through the loop.
        assert pool.executor().submit(pow, 2, 3).result(WAIT) == 8


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


def test_closing_the_pool_ends_the_loop_thread_of_a_view_never_shut_down() -> None:
    pool = offloop.ThreadPool(1, name="view-left-open")
    executor = pool.executor()
    # From a plain thread: the view drives its calls from a loop thread of its own.
    assert executor.submit(abs, -3).result(WAIT) == 3
    assert [t for t in threading.enumerate() if t.name == "offloop-view-left-open-executor"]
    pool.close()
    wait_until(
        lambda: (
            not [t for t in threading.enumerate() if t.name == "offloop-view-left-open-executor"]
        ),
        what="the view's loop thread to end with its pool",
    )
    with pytest.raises(RuntimeError, match="shut down"):
        executor.submit(abs, -1)


@pytest.mark.allow_leaks  # the stuck thread is abandoned on purpose, then released
def test_a_call_abandoned_by_a_bounded_close_fails_the_view_s_future_at_once() -> None:
    pool = offloop.ThreadPool(1, name="view-abandoned")
    release = threading.Event()
    executor = pool.executor()
    future = executor.submit(release.wait, WAIT)
    try:
        wait_until(lambda: pool.statistics()["running"] == 1, what="the call to start")
        pool.close(timeout=0.01)
        with pytest.raises(offloop.PoolClosedError, match="the call was abandoned"):
            future.result(WAIT)
    finally:
        release.set()
    wait_until(
        lambda: not [t for t in threading.enumerate() if "view-abandoned" in t.name],
        what="the pool's and the view's threads to end",
    )


async def test_a_waiting_shutdown_from_one_of_the_view_s_own_calls_is_refused_not_a_hang() -> None:
    # It would wait for its own call to end, forever (ThreadPoolExecutor fails
    # it too, joining its own thread); pool.close() refuses the same way.
    async with offloop.ThreadPool(2, name="view-self") as pool:
        view = pool.executor()

        def shut_from_inside() -> str:
            with pytest.raises(offloop.WouldDeadlockError, match=r"own calls.*wait=False"):
                view.shutdown(wait=True)
            view.shutdown(wait=False)  # does not wait: allowed
            return "refused"

        future = view.submit(shut_from_inside)
        try:
            assert await asyncio.wait_for(asyncio.wrap_future(future), WAIT) == "refused"
        finally:
            future.cancel()  # a hung shutdown waits for this future: free it
        with pytest.raises(RuntimeError, match="shut down"):
            view.submit(whoami, 1)
        assert (await pool.run(whoami, 2))[0] == 2  # the pool itself stays open

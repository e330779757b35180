"""offloop.LoopThread and offloop.to_loop: coroutines on a loop of their own."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

import offloop
from offloop import LoopThread, PoolClosedError, WouldDeadlockError
from tests.helpers import await_until, state, where_am_i

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


async def fail() -> None:
    await asyncio.sleep(0)
    raise KeyError("missing")


def test_lifecycle_thread_name_and_repr() -> None:
    lt = LoopThread(name="jobs")
    assert state(lt) == "created"
    assert repr(lt) == "<LoopThread 'jobs' created: 0 tasks, no loop>"
    assert lt.start() is lt
    assert lt.start() is lt  # starting twice is a no-op
    assert state(lt) == "running"
    name, loop = lt.call(where_am_i)
    assert name == "offloop-loop-jobs"
    assert loop is lt.loop
    assert repr(lt) == "<LoopThread 'jobs' running: 0 tasks, _UnixSelectorEventLoop>"
    thread = next(t for t in threading.enumerate() if t.name == "offloop-loop-jobs")
    lt.close()
    assert not thread.is_alive()
    assert loop.is_closed()
    assert state(lt) == "closed"
    assert repr(lt) == "<LoopThread 'jobs' closed: 0 tasks, _UnixSelectorEventLoop>"
    lt.close()  # closing twice is allowed


def test_call_starts_lazily_and_propagates_results_errors_and_context() -> None:
    tenant.set("acme")

    async def read_tenant() -> str:
        return tenant.get()

    with LoopThread() as lt:
        assert lt.call(read_tenant) == "acme"
        with pytest.raises(KeyError, match="missing"):
            lt.call(fail)
        assert lt.call(asyncio.sleep, 0, "next call works") == "next call works"
    lazy = LoopThread(name="lazy")
    try:
        assert state(lazy) == "created"
        assert lazy.call(where_am_i)[0] == "offloop-loop-lazy"
    finally:
        lazy.close()


async def before_any_await() -> tuple[bool, str, str]:
    # Everything here runs in the task's first step, which a crossing onto an
    # asyncio loop takes at once (_loops/crossing.py's _step_now) instead of next iteration.
    task = asyncio.current_task()
    assert task is not None
    assert not task.done()
    tenant.set("changed in the coroutine")  # must not leak back to the caller
    return task is asyncio.current_task(), threading.current_thread().name, tenant.get()


async def fail_at_once() -> None:
    raise KeyError("at once")


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
async def test_a_coroutine_finishing_in_its_first_step_runs_as_a_task(loop_factory: Any) -> None:
    tenant.set("caller")
    async with LoopThread(name="first", loop_factory=loop_factory) as lt:
        expected = (True, "offloop-loop-first", "changed in the coroutine")
        assert await asyncio.to_thread(lt.call, before_any_await) == expected
        assert await asyncio.wait_for(lt.run(before_any_await), 10) == expected
        with pytest.raises(KeyError, match="at once"):
            await asyncio.to_thread(lt.call, fail_at_once)
        with pytest.raises(KeyError, match="at once"):
            await asyncio.wait_for(lt.run(fail_at_once), 10)
        assert await asyncio.wait_for(lt.run(quick_tenant), 10) == "caller"
        assert " 0 tasks" in repr(lt)
    assert tenant.get() == "caller"


async def quick_tenant() -> str:
    return tenant.get()


def test_closed_loop_thread_refuses_with_its_state_in_the_message() -> None:
    lt = LoopThread(name="done")
    lt.close()  # never started: closes at once, no thread
    assert state(lt) == "closed"
    with pytest.raises(PoolClosedError, match=r"<LoopThread 'done' closed.*> is closed and takes"):
        lt.call(where_am_i)
    with pytest.raises(PoolClosedError, match="cannot start because it is closed"):
        lt.start()
    with pytest.raises(PoolClosedError, match="cannot start because it is closed"), lt:
        pass


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match=r"name=\.\.\.\) must be a str, got int"):
        LoopThread(name=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"LoopThread\(name=\.\.\.\) must not be empty"):
        LoopThread(name="")
    with pytest.raises(ValueError, match=r"ThreadPool\(name=\.\.\.\) must not be empty"):
        offloop.ThreadPool(name="")
    # It used to be numbered silently, unlike the other two.
    with pytest.raises(ValueError, match=r"ProcessPool\(name=\.\.\.\) must not be empty"):
        offloop.ProcessPool(name="")
    with pytest.raises(TypeError, match=r"loop_factory=\.\.\.\) must be a callable"):
        LoopThread(loop_factory="uvloop")  # type: ignore[arg-type]
    lt = LoopThread(loop_factory=lambda: "not a loop")  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"must return an event loop.*str 'not a loop'"):
        lt.start()
    lt.close()


def test_blocking_calls_refused_on_the_loop_thread_itself() -> None:
    with LoopThread(name="self") as lt:

        async def call_itself() -> None:
            lt.call(where_am_i)

        async def close_itself() -> None:
            lt.close()

        with pytest.raises(WouldDeadlockError, match=r"\.call\(\) was called on the thread"):
            lt.call(call_itself)
        with pytest.raises(WouldDeadlockError, match=r"\.close\(\) was called on the loop thread"):
            lt.call(close_itself)
        assert lt.call(where_am_i)[0] == "offloop-loop-self"  # refused before closing anything


@pytest.mark.loops("asyncio")
async def test_call_and_close_refused_on_another_running_loop() -> None:
    async with LoopThread() as lt:
        with pytest.raises(WouldDeadlockError, match=r"await lt\.run"):
            lt.call(where_am_i)
        with pytest.raises(WouldDeadlockError, match=r"await lt\.aclose\(\)"):
            lt.close()
        assert (await lt.run(where_am_i))[1] is lt.loop


async def test_run_from_another_loop() -> None:
    tenant.set("from the caller")

    async def read_tenant() -> tuple[str, bool]:
        return tenant.get(), asyncio.get_running_loop() is lt.loop

    async with LoopThread(name="remote") as lt:
        assert await asyncio.wait_for(lt.run(read_tenant), 10) == ("from the caller", True)
        with pytest.raises(KeyError, match="missing"):
            await lt.run(fail)
        assert await lt.run(asyncio.sleep, 0, "ok") == "ok"
    assert state(lt) == "closed"


async def test_cancelling_the_awaiter_cancels_the_remote_task() -> None:
    started = threading.Event()
    remote_cancelled = threading.Event()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            remote_cancelled.set()
            raise

    async with LoopThread() as lt:
        task = asyncio.ensure_future(lt.run(wait_forever))
        await await_until(started.is_set, what="the remote coroutine to start")
        assert repr(lt).endswith(": 1 task, " + type(lt.loop).__name__ + ">")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await await_until(remote_cancelled.is_set, what="the remote cancellation")
        await await_until(lambda: "0 tasks" in repr(lt), what="the task count to drop")
        assert await lt.run(asyncio.sleep, 0, 1) == 1


@pytest.mark.loops("asyncio")
async def test_remote_cancellation_reaches_the_awaiter() -> None:
    async def cancel_myself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    async with LoopThread() as lt:
        awaiter = asyncio.ensure_future(lt.run(cancel_myself))
        await asyncio.wait_for(asyncio.wait([awaiter]), 10)
        assert awaiter.cancelled()


@pytest.mark.loops("asyncio")
async def test_closing_cancels_running_tasks_and_finalizes_async_generators() -> None:
    started = threading.Event()
    finalized: list[str] = []
    keep: list[AsyncIterator[int]] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            finalized.append("async generator")

    async def hold() -> None:
        gen = numbers()
        keep.append(gen)  # suspended, not collected: only shutdown_asyncgens closes it
        await gen.__anext__()
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            finalized.append("task")

    lt = LoopThread(name="closing")
    running = asyncio.ensure_future(lt.run(hold))
    await await_until(started.is_set, what="the remote task to start")
    sync_errors: list[BaseException] = []
    sync_started = threading.Event()

    async def wait_forever() -> None:
        sync_started.set()
        await asyncio.Event().wait()

    def sync_caller() -> None:
        try:
            lt.call(wait_forever)
        except PoolClosedError as exc:
            sync_errors.append(exc)

    caller = threading.Thread(target=sync_caller)
    caller.start()
    await await_until(sync_started.is_set, what="the sync caller's coroutine to start")
    assert "2 tasks" in repr(lt)
    await asyncio.wait_for(lt.aclose(), 10)
    assert state(lt) == "closed"
    assert finalized == ["task", "async generator"]
    caller.join(10)
    assert len(sync_errors) == 1
    assert "wait_forever" in str(sync_errors[0])
    with pytest.raises(PoolClosedError, match=r"was closed while .*hold.* ran there"):
        await asyncio.wait_for(running, 10)
    with pytest.raises(PoolClosedError, match="is closed and takes no new calls"):
        await lt.run(where_am_i)


def test_uvloop_as_loop_factory() -> None:
    with LoopThread(name="uv", loop_factory=uvloop.new_event_loop) as lt:
        name, loop = lt.call(where_am_i)
        assert isinstance(loop, uvloop.Loop)
        assert name == "offloop-loop-uv"
        assert "uvloop.Loop" in repr(lt) or "Loop>" in repr(lt)
        with pytest.raises(KeyError):
            lt.call(fail)


async def test_run_on_a_uvloop_loop_thread_from_any_loop() -> None:
    async with LoopThread(loop_factory=uvloop.new_event_loop) as lt:
        _, loop = await asyncio.wait_for(lt.run(where_am_i), 10)
        assert isinstance(loop, uvloop.Loop)


@pytest.mark.loops("asyncio")
async def test_aclose_on_its_own_loop_is_refused() -> None:
    async with LoopThread() as lt:

        async def close_from_inside() -> None:
            await lt.aclose()

        with pytest.raises(WouldDeadlockError, match="awaited on its own loop"):
            await lt.run(close_from_inside)


def test_close_with_timeout_abandons_a_blocked_coroutine(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    blocked = threading.Event()

    async def block_in_sync_code() -> None:
        blocked.set()
        release.wait(10)  # sync blocking: cancellation cannot reach it

    lt = LoopThread(name="stuck").start()
    results: list[None] = []
    caller = threading.Thread(target=lambda: results.append(lt.call(block_in_sync_code)))
    caller.start()
    assert blocked.wait(10)
    with caplog.at_level(logging.WARNING, logger="offloop"):
        lt.close(timeout=0.05)
    assert "did not stop within 0.05 s" in caplog.text
    assert state(lt) == "closing"
    release.set()
    lt.close()  # the coroutine returns, and the loop stops right after
    caller.join(10)
    assert not caller.is_alive()
    assert results == [None]  # it finished before it could be cancelled
    assert state(lt) == "closed"


# -- to_loop ------------------------------------------------------------------


async def test_to_loop_isolates_a_coroutine_that_blocks() -> None:
    release = threading.Event()
    blocking_started = threading.Event()

    async def blocks_its_loop() -> str:
        blocking_started.set()
        # Sync blocking inside async def: on our loop this would wait forever
        # for the set() below, which our loop could then never run.
        assert release.wait(10), "the caller's loop was stalled"
        return threading.current_thread().name

    pending = asyncio.ensure_future(offloop.to_loop(blocks_its_loop))
    ticks = 0
    while not blocking_started.is_set() or ticks < 3:
        await asyncio.sleep(0.001)  # our loop keeps ticking meanwhile
        ticks += 1
    release.set()
    assert await asyncio.wait_for(pending, 10) == "offloop-shared-loop-to_loop"


@pytest.mark.loops("asyncio")
async def test_to_loop_cancellation_context_and_nesting() -> None:
    tenant.set("t1")
    started = threading.Event()
    cancelled = threading.Event()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(offloop.to_loop(wait_forever))
    await await_until(started.is_set)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_until(cancelled.is_set, what="the isolated coroutine's cancellation")

    async def nested() -> tuple[str, str]:
        inner: tuple[str, Any] = await offloop.to_loop(where_am_i)
        return inner[0], tenant.get()

    assert await offloop.to_loop(nested) == ("offloop-shared-loop-to_loop", "t1")
    with pytest.raises(TypeError, match="coroutine object"):
        await offloop.to_loop(where_am_i())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "base", [asyncio.SelectorEventLoop, uvloop.Loop], ids=["asyncio", "uvloop"]
)
def test_close_waits_for_default_executor_jobs_and_leaves_no_executor_thread(base: Any) -> None:
    shutting_down = threading.Event()
    job_started = threading.Event()
    job_done = threading.Event()

    class RecordingLoop(base):  # type: ignore[misc]
        async def shutdown_default_executor(self, *args: Any, **kwargs: Any) -> None:
            shutting_down.set()
            await super().shutdown_default_executor(*args, **kwargs)

    def job() -> None:
        job_started.set()
        # Holds its executor thread until close() shuts the executor down: a
        # close that skipped that step would return with the job still running.
        assert shutting_down.wait(10), "close() never shut the default executor down"
        job_done.set()

    jobs: list[asyncio.Future[None]] = []

    async def start_job() -> None:
        # Left running on purpose: nothing awaits it, close() must still wait for it.
        jobs.append(asyncio.get_running_loop().run_in_executor(None, job))

    lt = LoopThread(name="executor", loop_factory=RecordingLoop)
    try:
        lt.call(start_job)
        assert job_started.wait(10)
        (executor_thread,) = [
            t for t in threading.enumerate() if t.name.startswith("offloop-loop-executor-executor-")
        ]
        lt.close()
        assert job_done.is_set()
        assert not executor_thread.is_alive()
        assert jobs[0].done()
        assert jobs[0].result() is None
        assert state(lt) == "closed"
    finally:
        shutting_down.set()  # lets the job end if the close did not wait for it
        lt.close()


def test_close_waits_for_the_executor_where_no_thread_may_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Python 3.12.0 and 3.12.1 refuse new threads in atexit handlers, where the
    # shared loop threads close, and shutdown_default_executor() needs one.
    release = threading.Event()
    job_started = threading.Event()

    class NoThreadAtExitLoop(asyncio.SelectorEventLoop):
        async def shutdown_default_executor(self, *args: Any, **kwargs: Any) -> None:
            release.set()  # the job ends only once the close got this far
            raise RuntimeError("can't create new thread at interpreter shutdown")

    def job() -> str:
        job_started.set()
        assert release.wait(10), "close() never got to the executor"
        return "done"

    jobs: list[asyncio.Future[str]] = []

    async def start_job() -> None:
        jobs.append(asyncio.get_running_loop().run_in_executor(None, job))

    lt = LoopThread(name="nothread", loop_factory=NoThreadAtExitLoop)
    try:
        lt.call(start_job)
        assert job_started.wait(10)
        (executor_thread,) = [
            t for t in threading.enumerate() if t.name.startswith("offloop-loop-nothread-executor-")
        ]
        lt.close(timeout=10)
        assert not executor_thread.is_alive()  # waited for, on the loop's own thread
        assert state(lt) == "closed"
        assert "did not stop" not in caplog.text
    finally:
        release.set()
        lt.close()


async def test_call_from_a_worker_whose_awaiter_is_cancelled_raises_caller_gone() -> None:
    started = threading.Event()
    remote_cancelled = threading.Event()
    outcomes: list[BaseException | str] = []

    async def wait_forever() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            remote_cancelled.set()
            raise
        return "never"

    async with LoopThread(name="worker-caller") as lt:

        def worker() -> None:
            try:
                outcomes.append(lt.call(wait_forever))
            except BaseException as exc:  # recorded for the assertions below
                outcomes.append(exc)

        task = asyncio.ensure_future(offloop.to_thread(worker))
        await await_until(started.is_set, what="the coroutine to start on the loop thread")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await await_until(lambda: bool(outcomes), what="the worker's call to return")
        (error,) = outcomes
        assert isinstance(error, offloop.CallerGoneError), outcomes
        assert str(error).startswith("LoopThread.call() of function")
        assert "wait_forever' was stopped, and the coroutine cancelled" in str(error)
        await await_until(remote_cancelled.is_set, what="the coroutine's cancellation")
        await await_until(lambda: " 0 tasks" in repr(lt), what="the task count to drop")
        assert await lt.run(asyncio.sleep, 0, "still works") == "still works"


def test_close_reports_a_task_whose_cleanup_raises_to_the_loops_exception_handler() -> None:
    contexts: list[dict[str, Any]] = []
    keep: list[asyncio.Task[None]] = []

    async def raises_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    async def leave_a_task() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: contexts.append(context))
        keep.append(loop.create_task(raises_when_cancelled(), name="raiser"))

    lt = LoopThread(name="reports")
    try:
        lt.call(leave_a_task)
    finally:
        lt.close()
    (context,) = contexts
    assert context["message"] == "unhandled exception in a task cancelled by LoopThread.close()"
    assert isinstance(context["exception"], ValueError)
    assert context["task"] is keep[0]


async def test_a_loop_factory_returning_a_running_or_closed_loop_is_refused_at_start() -> None:
    # asyncio.get_running_loop as the factory hands over the caller's own loop:
    # the thread could not run it, and shutting it down would cancel the
    # caller's tasks and close its loop under it.
    mine = asyncio.get_running_loop()
    lt = LoopThread(name="taken", loop_factory=asyncio.get_running_loop)
    with pytest.raises(ValueError, match=r"must return a new event loop.*is running"):
        lt.start()
    assert lt.state is offloop.LoopThreadState.CREATED
    assert lt.loop is None
    assert not mine.is_closed()
    assert asyncio.current_task() is not None
    assert not asyncio.current_task().cancelled()  # type: ignore[union-attr]
    await lt.aclose()

    closed = asyncio.new_event_loop()
    closed.close()
    lt = LoopThread(name="closed", loop_factory=lambda: closed)
    with pytest.raises(ValueError, match=r"must return a new event loop.*is closed"):
        await lt.run(where_am_i)
    await lt.aclose()

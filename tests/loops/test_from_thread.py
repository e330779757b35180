"""offloop.from_thread: async code called from sync code, on the right loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

import offloop
from offloop import CallerGoneError, WouldDeadlockError, from_thread
from offloop._core.token import StopToken, WorkerCall, thread_state
from offloop._loops.shared import SharedLoopThread, block_on
from tests.helpers import await_until, in_plain_thread, wait_until, where_am_i

T = TypeVar("T")

WAIT = 10.0  # bound on every wait: a hang fails the test instead of stalling it

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


async def fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


# -- plain threads: the shared background loop ---------------------------------


def test_plain_thread_runs_on_one_shared_loop() -> None:
    def twice() -> list[tuple[str, asyncio.AbstractEventLoop]]:
        return [from_thread(where_am_i), from_thread(where_am_i)]

    (name1, loop1), (name2, loop2) = in_plain_thread(twice)
    assert name1 == name2 == "offloop-shared-loop"
    assert loop1 is loop2  # no new event loop per call
    # The main thread (no loop running) is a plain thread too.
    name3, loop3 = from_thread(where_am_i)
    assert (name3, loop3) == (name1, loop1)


def test_result_exception_and_traceback_cross_back() -> None:
    assert from_thread(asyncio.sleep, 0, "slept") == "slept"
    with pytest.raises(ValueError, match="bad input") as info:
        from_thread(fail, "bad input")
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "fail" in frames
    # An error never breaks the next call.
    assert from_thread(functools.partial(asyncio.sleep, 0, 7)) == 7


def test_contextvars_are_copied_in_not_leaked_back() -> None:
    async def read_and_set() -> str:
        seen = request_id.get()
        request_id.set("changed inside")
        return seen

    def caller() -> tuple[str, str]:
        request_id.set("req-42")
        return from_thread(read_and_set), request_id.get()

    assert in_plain_thread(caller) == ("req-42", "req-42")


def test_bad_arguments_raise_clear_type_errors() -> None:
    coro = where_am_i()
    with pytest.raises(TypeError, match=r"coroutine object.*from_thread\(fn, \*args\)"):
        from_thread(coro)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs a coroutine function.*int"):
        from_thread(42)  # type: ignore[arg-type]

    def sync_fn() -> int:
        return 1

    with pytest.raises(TypeError, match="which is sync code"):
        from_thread(sync_fn)  # type: ignore[arg-type, unused-ignore]
    with pytest.raises(TypeError, match="positional argument"):
        from_thread(where_am_i, "unexpected")  # type: ignore[call-arg]
    assert from_thread(where_am_i)[0] == "offloop-shared-loop"


@pytest.mark.loops("asyncio")
async def test_on_a_running_loop_it_refuses_instead_of_deadlocking() -> None:
    with pytest.raises(WouldDeadlockError, match="would deadlock the loop") as info:
        from_thread(where_am_i)
    assert isinstance(info.value, RuntimeError)
    assert "await async_fn(...)" in str(info.value)


def test_shared_loop_retires_when_idle_and_restarts_on_next_use() -> None:
    holder = SharedLoopThread("offloop-shared-loop-retire-test", idle_timeout=0.05)
    name, loop = block_on(holder, None, "test", where_am_i, (), {})
    first = holder.current
    assert first is not None
    assert name == "offloop-shared-loop-retire-test"
    wait_until(lambda: first.state is offloop.LoopThreadState.CLOSED, what="idle retirement")
    assert loop.is_closed()
    _, loop2 = block_on(holder, None, "test", where_am_i, (), {})
    assert loop2 is not loop
    assert holder.current is not first
    holder.close(timeout=5)
    assert holder.current is None


def test_shared_loop_never_keeps_the_interpreter_alive(tmp_path: Any) -> None:
    script = tmp_path / "exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, threading
            import offloop

            async def answer():
                return 42

            async def forever():
                await asyncio.Event().wait()

            def stuck_call():
                try:
                    offloop.from_thread(forever)
                except offloop.PoolClosedError:
                    pass  # the shared loop closed at exit and cancelled it

            assert offloop.from_thread(answer) == 42
            # A daemon thread stuck waiting on the shared loop at exit.
            stuck = threading.Thread(target=stuck_call, daemon=True)
            stuck.start()
            print("done", flush=True)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert proc.stderr == ""


# -- offloop workers: back into the loop that sent the work -------------------


async def test_worker_calls_back_into_the_loop_that_sent_the_work() -> None:
    request_id.set("from-the-loop")

    async def on_caller_loop() -> tuple[asyncio.AbstractEventLoop, str]:
        return asyncio.get_running_loop(), request_id.get()

    def worker() -> tuple[asyncio.AbstractEventLoop, str]:
        return from_thread(on_caller_loop)

    loop, seen = await asyncio.wait_for(offloop.to_thread(worker), 10)
    assert loop is asyncio.get_running_loop()
    assert seen == "from-the-loop"


@pytest.mark.loops("asyncio", "uvloop")
async def test_cancelled_awaiter_cancels_the_coroutine_and_frees_the_worker() -> None:
    started = asyncio.Event()
    coroutine_cancelled = threading.Event()
    errors: queue.SimpleQueue[BaseException] = queue.SimpleQueue()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            coroutine_cancelled.set()
            raise

    def worker() -> None:
        try:
            from_thread(wait_forever)
        except BaseException as exc:
            errors.put(exc)

    task = asyncio.ensure_future(offloop.to_thread(worker))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_until(lambda: not errors.empty(), what="the worker's error")
    error = errors.get_nowait()
    assert isinstance(error, CallerGoneError)
    assert "the task awaiting this worker was cancelled" in str(error)
    assert "wait_forever" in str(error)
    await await_until(coroutine_cancelled.is_set, what="the coroutine's cancellation")
    # The pool and the loop still work.
    assert (await offloop.to_thread(from_thread, where_am_i))[1] is asyncio.get_running_loop()


def test_token_already_set_means_the_coroutine_never_starts() -> None:
    loop = asyncio.new_event_loop()
    ran = threading.Event()

    async def never() -> None:
        ran.set()

    token = StopToken()
    token.set("cancelled")

    def worker() -> None:
        thread_state.call = WorkerCall(worker, loop, token)
        try:
            from_thread(never)
        finally:
            thread_state.call = None

    try:
        with pytest.raises(CallerGoneError, match="'cancelled'"):
            in_plain_thread(worker)
        loop.run_until_complete(asyncio.sleep(0))  # run what was scheduled
        assert not ran.is_set()
    finally:
        loop.close()


def test_closed_loop_gives_the_worker_caller_gone() -> None:
    loop = asyncio.new_event_loop()
    waiting = threading.Event()

    async def anything() -> None:
        pass

    def worker() -> None:
        thread_state.call = WorkerCall(worker, loop, StopToken())
        waiting.set()
        try:
            from_thread(anything)
        finally:
            thread_state.call = None

    def close_loop_once_waiting() -> None:
        assert waiting.wait(10)
        loop.close()  # never ran: the scheduled call is dropped

    closer = threading.Thread(target=close_loop_once_waiting)
    closer.start()
    try:
        with pytest.raises(CallerGoneError, match="was closed while this thread waited"):
            in_plain_thread(worker)
    finally:
        closer.join(10)
    # Calling with the loop already closed fails at once.
    with pytest.raises(CallerGoneError, match="is closed"):
        in_plain_thread(worker)


# -- the deadlocks that plague asgiref (issues 249, 348, 492) -----------------


async def test_worker_from_thread_to_thread_from_thread_nesting() -> None:
    async def innermost() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def sync_inner() -> asyncio.AbstractEventLoop:
        return from_thread(innermost)

    async def middle() -> asyncio.AbstractEventLoop:
        return await offloop.to_thread(sync_inner)

    def sync_outer() -> asyncio.AbstractEventLoop:
        return from_thread(middle)

    assert await asyncio.wait_for(offloop.to_thread(sync_outer), 10) is asyncio.get_running_loop()


def test_plain_thread_nesting_stays_on_the_shared_loop() -> None:
    async def innermost() -> str:
        return threading.current_thread().name

    async def middle() -> str:
        return await offloop.to_thread(from_thread, innermost)

    assert in_plain_thread(lambda: from_thread(middle)) == "offloop-shared-loop"


@pytest.mark.loops("asyncio")
async def test_from_thread_inside_a_task_created_in_from_thread() -> None:
    # asgiref 249: to_thread inside a task created by a from_thread coroutine,
    # and asgiref 348: the same through wait_for / create_task.
    main_loop = asyncio.get_running_loop()

    async def ping() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def db_write() -> asyncio.AbstractEventLoop:
        return from_thread(ping)

    async def io_task() -> asyncio.AbstractEventLoop:
        return await offloop.to_thread(db_write)

    async def do_io_tasks() -> list[asyncio.AbstractEventLoop]:
        first = await asyncio.create_task(io_task())
        waited = await asyncio.wait_for(offloop.to_thread(db_write), 5)
        rest = await asyncio.gather(io_task(), io_task(), asyncio.shield(io_task()))
        return [first, waited, *rest]

    def view() -> list[asyncio.AbstractEventLoop]:
        return from_thread(do_io_tasks)

    loops = await asyncio.wait_for(offloop.to_thread(view), 10)
    assert loops == [main_loop] * 5


@pytest.mark.loops("asyncio", "uvloop")
async def test_many_concurrent_crossings_through_a_small_pool() -> None:
    async def echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    def worker(i: int) -> list[int]:
        return [from_thread(echo, i * 10 + j) for j in range(5)]

    async with offloop.ThreadPool(4, name="crossings") as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(worker, i) for i in range(40))), 15
        )
    assert results == [[i * 10 + j for j in range(5)] for i in range(40)]


def test_many_plain_threads_share_the_background_loop() -> None:
    start = threading.Barrier(12)
    results: queue.SimpleQueue[list[int]] = queue.SimpleQueue()

    async def echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    def caller(n: int) -> None:
        start.wait(10)
        results.put([from_thread(echo, n * 100 + j) for j in range(20)])

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
        assert not thread.is_alive(), "a from_thread caller is stuck"
    collected = sorted(results.get_nowait() for _ in threads)
    assert collected == [[n * 100 + j for j in range(20)] for n in range(12)]


# -- other offloop workers: thread services and iterate() sources --------------


async def loop_and_thread(tag: str) -> tuple[str, asyncio.AbstractEventLoop, str]:
    await asyncio.sleep(0)
    return tag, asyncio.get_running_loop(), threading.current_thread().name


async def test_thread_service_calls_back_into_the_supervisors_loop() -> None:
    sv = offloop.Supervisor(name="callbacks")
    seen: list[tuple[str, asyncio.AbstractEventLoop, str]] = []
    reported = threading.Event()

    @sv.service
    def poller(token: offloop.StopToken) -> None:
        seen.append(from_thread(loop_and_thread, "service"))
        reported.set()
        token.wait()

    async with sv:
        await await_until(reported.is_set, what="the thread service's from_thread call")
    ((tag, loop, thread_name),) = seen
    assert tag == "service"
    assert loop is asyncio.get_running_loop()  # the supervisor's loop, not the shared one
    assert thread_name == threading.current_thread().name


async def test_iterated_generator_calls_back_into_the_consumers_loop() -> None:
    def source() -> Iterator[tuple[str, asyncio.AbstractEventLoop, str]]:
        for i in range(3):
            yield from_thread(loop_and_thread, f"item {i}")

    items = [item async for item in offloop.iterate(source(), buffer=1)]
    assert [tag for tag, _, _ in items] == ["item 0", "item 1", "item 2"]
    assert all(loop is asyncio.get_running_loop() for _, loop, _ in items)
    assert {name for _, _, name in items} == {threading.current_thread().name}


async def anyio_scopes() -> tuple[int, bool]:
    # anyio's task groups and cancel scopes need a real current task from the
    # coroutine's first line on (a crossing takes that step at once).
    anyio = pytest.importorskip("anyio")
    done = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(asyncio.sleep, 0)
            done.append(1)
    with anyio.move_on_after(0.01) as scope:
        await anyio.sleep(10)
    return len(done), scope.cancelled_caught


@pytest.mark.loops("asyncio")
async def test_anyio_task_groups_and_timeouts_work_across_every_crossing() -> None:
    expected = (1, True)
    assert await asyncio.wait_for(offloop.to_loop(anyio_scopes), 10) == expected
    assert await asyncio.wait_for(offloop.to_thread(from_thread, anyio_scopes), 10) == expected
    assert in_plain_thread(lambda: from_thread(anyio_scopes)) == expected
    async with offloop.LoopThread(name="anyio") as lt:
        assert await asyncio.wait_for(lt.run(anyio_scopes), 10) == expected
        assert await asyncio.to_thread(lt.call, anyio_scopes) == expected


@pytest.mark.loops("asyncio")
async def test_from_thread_in_a_worker_of_a_closing_pool_says_the_pool_is_closing() -> None:
    pool = offloop.ThreadPool(1, name="closing-crossing")
    started = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    call = pool.run(from_thread, wait_forever)
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(pool.aclose(), 10)  # sets the running call's token
    # The awaiter is still there and gets the error as the call's outcome.
    with pytest.raises(CallerGoneError, match=r"'pool closing'.*its pool is closing"):
        await call

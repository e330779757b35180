"""offloop.to_thread, ThreadPool and StopToken: the foundation's behaviour."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import sys
import threading
import traceback
from typing import Any

import pytest

import offloop
from tests.helpers import WAIT, await_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"offloop-{name}-")]


async def test_to_thread_returns_result_with_args_and_kwargs() -> None:
    def combine(a: int, b: int, *, scale: int = 1) -> tuple[int, str]:
        return (a + b) * scale, threading.current_thread().name

    value, thread_name = await offloop.to_thread(combine, 2, 3, scale=10)
    assert value == 50
    assert thread_name.startswith("offloop-default-")
    assert thread_name != threading.current_thread().name


async def test_to_thread_works_with_create_task_gather_and_wait_for() -> None:
    task = asyncio.create_task(offloop.to_thread(pow, 2, 10))
    assert await task == 1024
    results = await asyncio.gather(*(offloop.to_thread(pow, i, 2) for i in range(50)))
    assert results == [i * i for i in range(50)]
    assert await asyncio.wait_for(offloop.to_thread(len, "abc"), WAIT) == 3


async def test_loop_keeps_running_while_worker_blocks() -> None:
    release = threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not release.is_set():
            ticks += 1
            await asyncio.sleep(0)
            if ticks >= 100:
                release.set()

    blocked = offloop.to_thread(release.wait, WAIT)
    await asyncio.wait_for(ticker(), WAIT)
    assert await blocked is True
    assert ticks >= 100


async def test_contextvars_are_copied_into_the_worker() -> None:
    request_id.set("req-42")

    def read_and_change() -> str:
        seen = request_id.get()
        request_id.set("changed-in-worker")
        return seen

    assert await offloop.to_thread(read_and_change) == "req-42"
    assert request_id.get() == "req-42"  # a copy: the worker's change stays there


async def test_exception_keeps_type_and_traceback_and_pool_keeps_working() -> None:
    class Boom(ValueError):
        pass

    def explode() -> None:
        raise Boom("kaput")

    async with offloop.ThreadPool(2, name="errors") as pool:
        with pytest.raises(Boom, match="kaput") as info:
            await pool.run(explode)
        frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
        assert "explode" in frames
        assert await pool.run(sum, [1, 2, 3]) == 6
        assert pool.statistics()["failed"] == 1
        assert pool.statistics()["completed"] == 1


async def test_coroutine_function_is_rejected_with_advice() -> None:
    async def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match=r"fetch., a coroutine function.*await"):
        offloop.to_thread(fetch)


async def test_coroutine_object_is_rejected_and_closed() -> None:
    async def fetch() -> int:
        return 1

    coro = fetch()
    with pytest.raises(TypeError, match=r"coroutine object.*'await' it"):
        offloop.to_thread(coro)  # type: ignore[arg-type]
    # Closed, so no "never awaited" warning follows the error.
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"


async def test_function_returning_a_coroutine_is_reported() -> None:
    async def inner() -> int:
        return 1

    def sneaky() -> Any:
        return inner()

    with pytest.raises(TypeError, match="returned a coroutine"):
        await offloop.to_thread(sneaky)


async def test_non_callable_is_rejected_naming_it() -> None:
    with pytest.raises(TypeError, match=r"needs a callable .*got int 42"):
        offloop.to_thread(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a callable"):
        offloop.ThreadPool(name="x").run("print")  # type: ignore[arg-type]


def test_to_thread_outside_a_loop_says_what_to_do() -> None:
    with pytest.raises(
        RuntimeError, match=r"^offloop\.to_thread\(\) was called with no event loop running"
    ):
        offloop.to_thread(print)
    with pytest.raises(
        RuntimeError, match=r"^ThreadPool 'named'\.run\(\) was called with no event loop"
    ):
        offloop.ThreadPool(name="named").run(print)


async def test_errors_from_to_thread_name_to_thread_not_the_default_pool() -> None:
    async def coroutine_function() -> None:
        pass

    with pytest.raises(
        TypeError, match=r"^offloop\.to_thread\(\) got function .*, a coroutine function"
    ):
        offloop.to_thread(coroutine_function)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_workers": 0}, ValueError, r"max_workers=...\) must be at least 1, got 0"),
        ({"max_workers": "4"}, TypeError, r"max_workers=...\) must be a positive int"),
        ({"max_workers": True}, TypeError, r"max_workers=...\) must be a positive int"),
        ({"on_cancel": "kill"}, ValueError, r"on_cancel=...\) must be 'abandon' or 'wait'"),
        ({"name": 3}, TypeError, r"name=...\) must be a str"),
    ],
)
def test_bad_pool_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        offloop.ThreadPool(**kwargs)


@pytest.mark.loops("asyncio")
async def test_user_kwargs_named_like_pool_options_reach_the_function() -> None:
    def echo(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    options = {"name": "n", "max_workers": 3, "on_cancel": "c", "timeout": 1, "pool": "p"}
    assert await offloop.to_thread(echo, **options) == options


async def test_threads_are_named_after_the_pool_and_bounded() -> None:
    limit = 3
    barrier = threading.Barrier(limit, timeout=WAIT)
    active = 0
    peak = 0
    lock = threading.Lock()

    def work() -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        barrier.wait()  # all `limit` calls must run at the same time
        with lock:
            active -= 1
        return threading.current_thread().name

    async with offloop.ThreadPool(limit, name="bounded") as pool:
        names = await asyncio.gather(*(pool.run(work) for _ in range(limit * 4)))
        assert peak == limit
        assert {n.rsplit("-", 1)[0] for n in names} == {"offloop-bounded"}
        assert len(set(names)) == limit
        assert pool.statistics()["threads"] == limit
    assert pool_threads("bounded") == []


async def test_closed_pool_leaves_no_thread_behind() -> None:
    pool = offloop.ThreadPool(4, name="leakcheck")
    await asyncio.gather(*(pool.run(threading.Event().wait, 0.01) for _ in range(8)))
    assert pool_threads("leakcheck")
    await pool.aclose()
    assert pool_threads("leakcheck") == []
    assert pool.statistics()["state"] == "closed"
    with pytest.raises(offloop.PoolClosedError, match="closed and takes no new calls"):
        pool.run(print)
    with pytest.raises(offloop.PoolClosedError, match="cannot be entered because it is closed"):
        async with pool:
            pass


def test_sync_close_from_plain_code_and_refused_on_a_loop() -> None:
    pool = offloop.ThreadPool(2, name="syncclose")

    async def use() -> None:
        assert await pool.run(abs, -3) == 3
        with pytest.raises(offloop.WouldDeadlockError, match=r"Use 'await pool\.aclose\(\)'"):
            pool.close()

    asyncio.run(use())
    pool.close()
    assert pool_threads("syncclose") == []


async def test_repr_and_statistics_show_running_queued_and_abandoned() -> None:
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(WAIT)

    async with offloop.ThreadPool(1, name="repr") as pool:
        assert repr(pool) == "<ThreadPool 'repr' open: 0 running, 0 queued, 0/1 threads>"
        first = pool.run(hold)
        second = pool.run(abs, -1)
        assert await asyncio.to_thread(started.wait, WAIT)
        assert repr(pool) == "<ThreadPool 'repr' open: 1 running, 1 queued, 1/1 threads>"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert repr(pool) == (
            "<ThreadPool 'repr' open: 1 running (1 abandoned), 1 queued, 1/1 threads>"
        )
        stats = pool.statistics()
        assert stats["abandoned"] == 1
        assert stats["running"] == 1
        assert stats["queued"] == 1
        # The abandoned call still holds the only thread: the bound is real.
        assert not second.done()
        release.set()
        assert await second == 1
        assert pool.statistics()["abandoned"] == 0
    assert repr(pool) == "<ThreadPool 'repr' closed: 0 running, 0 queued, 0/1 threads>"


def test_repr_does_not_wait_for_the_pools_lock() -> None:
    # Asked for where waiting would deadlock: a signal handler's log line, a
    # debugger, or a failure report, in the thread that holds the lock.
    pool = offloop.ThreadPool(1, name="held")
    seen: list[str] = []
    asker = threading.Thread(target=lambda: seen.append(repr(pool)))
    with pool._lock:
        asker.start()
        asker.join(WAIT)
        assert seen == ["<ThreadPool 'held' open: 0 running, 0 queued, 0/1 threads>"]
    asker.join(WAIT)
    pool.close()


async def test_cancel_abandons_at_once_and_sets_the_token() -> None:
    entered = threading.Event()
    token_seen = threading.Event()
    finished = threading.Event()

    def cooperative() -> str:
        token = offloop.current_token()
        entered.set()
        assert token.wait(WAIT), "token was never set"
        assert token.is_set()
        assert bool(token)
        assert token.reason == "cancelled"
        token_seen.set()
        finished.wait(WAIT)
        return "late"

    async with offloop.ThreadPool(1, name="abandon") as pool:
        task = asyncio.create_task(pool.run(cooperative))
        assert await asyncio.to_thread(entered.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        # The task is cancelled although the function has not returned yet.
        assert not finished.is_set()
        assert await asyncio.to_thread(token_seen.wait, WAIT)
        finished.set()
        assert await pool.run(str, 7) == "7"  # the pool keeps working


async def test_wait_for_timeout_abandons_the_call() -> None:
    release = threading.Event()
    async with offloop.ThreadPool(2, name="timeout") as pool:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.run(release.wait, WAIT), 0.05)
        assert pool.statistics()["abandoned"] == 1
        release.set()
        await await_until(lambda: pool.statistics()["abandoned"] == 0, WAIT)


async def test_on_cancel_wait_delivers_cancellation_after_the_function_returns() -> None:
    entered = threading.Event()
    may_finish = threading.Event()
    returned = threading.Event()

    def slow() -> None:
        entered.set()
        assert offloop.current_token().wait(WAIT)
        may_finish.wait(WAIT)
        returned.set()

    async with offloop.ThreadPool(1, name="patient", on_cancel="wait") as pool:
        task = asyncio.create_task(pool.run(slow))
        assert await asyncio.to_thread(entered.wait, WAIT)
        task.cancel()
        # The token is set at once, but the task waits for the function.
        await await_until(lambda: pool.statistics()["cancelled"] == 1, WAIT)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()
        may_finish.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert returned.is_set()
        assert await pool.run(int, "5") == 5


@pytest.mark.parametrize("how", ["task", "future", "before-first-step"])
async def test_on_cancel_wait_keeps_the_cancel_message(how: str) -> None:
    entered = threading.Event()

    def until_stopped() -> str:
        entered.set()
        assert offloop.current_token().wait(WAIT)
        return "result nobody wants"

    async with offloop.ThreadPool(1, name="patient", on_cancel="wait") as pool:
        if how == "future":
            future = pool.run(until_stopped)
            assert await asyncio.to_thread(entered.wait, WAIT)
            future.cancel("shutting down")
            with pytest.raises(asyncio.CancelledError) as info:
                await asyncio.wait_for(future, WAIT)
        else:
            task = asyncio.create_task(pool.run(until_stopped))
            if how == "task":
                assert await asyncio.to_thread(entered.wait, WAIT)
            else:
                # The call is queued at once and its function may start, but
                # the task's first step still lies ahead: cancel throws in.
                assert not task.done()
            task.cancel("shutting down")
            with pytest.raises(asyncio.CancelledError) as info:
                await asyncio.wait_for(task, WAIT)
        # It used to arrive as a bare CancelledError() once the function returned.
        if sys.version_info >= (3, 11) or how == "future":
            assert info.value.args == ("shutting down",)
        else:
            # Python 3.10's Task ends with a bare CancelledError of its own, the one
            # its coroutine raised as context (bpo-45390): the message is there.
            assert info.value.args == ()
            assert isinstance(info.value.__context__, asyncio.CancelledError)
            assert info.value.__context__.args == ("shutting down",)
        assert await pool.run(int, "5") == 5


async def test_cancelling_a_queued_call_never_runs_it() -> None:
    release = threading.Event()
    ran = threading.Event()
    async with offloop.ThreadPool(1, name="queued") as pool:
        blocker = pool.run(release.wait, WAIT)
        queued = pool.run(ran.set)
        queued.cancel()
        release.set()
        assert await blocker is True
        assert await pool.run(lambda: "after") == "after"
        assert queued.cancelled()
        assert not ran.is_set()
        assert pool.statistics()["cancelled"] == 1


async def test_current_token_outside_a_worker_is_a_fresh_unset_token() -> None:
    token = offloop.current_token()
    assert not token
    assert not token.is_set()
    assert token.wait(0) is False
    assert repr(token) == "<StopToken not set>"
    assert offloop.current_token() is not token


def test_stop_token_by_hand_wakes_waiters_and_runs_callbacks() -> None:
    token = offloop.StopToken()
    seen: list[str | None] = []
    token.add_callback(lambda t: seen.append(t.reason))
    waiter_result: list[bool] = []
    waiting = threading.Thread(target=lambda: waiter_result.append(token.wait(WAIT)))
    waiting.start()
    token.set("shutdown")
    token.set("ignored: first reason wins")
    waiting.join(WAIT)
    assert waiter_result == [True]
    assert seen == ["shutdown"]
    token.add_callback(lambda t: seen.append("late"))  # already set: runs at once
    assert seen == ["shutdown", "late"]
    assert repr(token) == "<StopToken set reason='shutdown'>"


@pytest.mark.loops("asyncio")
async def test_aclose_sets_tokens_of_running_calls_and_fails_queued_ones() -> None:
    entered = threading.Event()

    def until_stopped() -> str:
        entered.set()
        assert offloop.current_token().wait(WAIT)
        return offloop.current_token().reason or ""

    pool = offloop.ThreadPool(1, name="closing")
    running = pool.run(until_stopped)
    queued = pool.run(abs, -1)
    assert await asyncio.to_thread(entered.wait, WAIT)
    await asyncio.wait_for(pool.aclose(), WAIT)
    assert await running == "pool closing"
    with pytest.raises(offloop.PoolClosedError, match="closed before this call of"):
        await queued
    assert pool_threads("closing") == []


@pytest.mark.loops("asyncio")
@pytest.mark.allow_leaks  # the stuck thread is abandoned on purpose, then released
async def test_aclose_timeout_abandons_a_stuck_call_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    pool = offloop.ThreadPool(1, name="stuck")
    call = pool.run(release.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    with caplog.at_level("WARNING", logger="offloop"):
        await pool.aclose(timeout=0.05)
    assert "method 'Event.wait' in thread offloop-stuck-1" in caplog.text
    assert "abandoned" in caplog.text
    assert pool.statistics()["state"] == "closed"
    assert pool.statistics()["abandoned"] == 1
    # The awaiter is not left waiting for a thread the pool gave up on.
    with pytest.raises(offloop.PoolClosedError, match="still running after the close's timeout"):
        await asyncio.wait_for(call, WAIT)
    release.set()
    await await_until(lambda: not pool_threads("stuck"), WAIT)
    assert pool.statistics()["abandoned"] == 0

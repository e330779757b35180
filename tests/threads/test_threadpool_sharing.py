"""ThreadPool across loops, its growth, the default pool, errors, and asyncio helpers."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading

import pytest

import offloop
from offloop._threads.pool import DEFAULT_MAX_WORKERS
from offloop._threads.tothread import default_thread_pool
from tests.helpers import WAIT, await_until, wait_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"offloop-{name}-")]


def test_one_pool_shared_by_loops_in_several_threads() -> None:
    pool = offloop.ThreadPool(4, name="several")
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run_loop(n: int) -> None:
        async def body() -> list[int]:
            return list(await asyncio.gather(*(pool.run(pow, n, i) for i in range(200))))

        try:
            results[n] = asyncio.run(body())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run_loop, args=(n,)) for n in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert results == {n: [n**i for i in range(200)] for n in range(2, 6)}
    assert pool.statistics()["completed"] == 800
    pool.close()
    assert pool_threads("several") == []


@pytest.mark.parametrize("other_loop", ["stopped", "blocked"])
def test_a_loop_that_stopped_or_blocks_does_not_stop_growth_for_the_others(
    other_loop: str,
) -> None:
    # Loop A queues a call behind a busy thread (arming a growth check there)
    # and then stops, or blocks. Calls from loop B that wait for each other
    # need new threads: B must be able to grow the pool by itself.
    pool = offloop.ThreadPool(8, name="growth")
    gate = threading.Event()
    queued = threading.Event()
    loop_a = asyncio.new_event_loop()
    a_thread: threading.Thread | None = None

    async def queue_behind_a_busy_thread() -> None:
        pool.run(gate.wait, WAIT)
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
        pool.run(gate.wait, WAIT)  # queued: arms the growth check on loop A
        queued.set()
        if other_loop == "blocked":
            gate.wait(WAIT)  # blocks loop A itself until the end of the test

    try:
        if other_loop == "stopped":
            loop_a.run_until_complete(queue_behind_a_busy_thread())
        else:
            a_thread = threading.Thread(
                target=loop_a.run_until_complete, args=(queue_behind_a_busy_thread(),)
            )
            a_thread.start()
        assert queued.wait(WAIT)
        barrier = threading.Barrier(4, timeout=WAIT)

        async def meet() -> list[int]:
            return list(await asyncio.gather(*(pool.run(barrier.wait) for _ in range(4))))

        assert sorted(asyncio.run(meet())) == [0, 1, 2, 3]
    finally:
        gate.set()
        if a_thread is not None:
            a_thread.join(WAIT)
        pool.close(timeout=WAIT)
        loop_a.close()
    assert pool_threads("growth") == []


def test_stop_iteration_fails_its_call_without_losing_the_others() -> None:
    # asyncio futures refuse StopIteration; it must not break result delivery.
    async def main() -> None:
        async with offloop.ThreadPool(1, name="stopiter") as pool:
            calls = [pool.run(next, iter([])), *(pool.run(abs, -n) for n in range(5))]
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)
        error = outcomes[0]
        assert isinstance(error, RuntimeError)
        assert "raised StopIteration" in str(error)
        assert isinstance(error.__cause__, StopIteration)
        assert outcomes[1:] == [0, 1, 2, 3, 4]

    asyncio.run(main())


async def test_blocking_calls_grow_the_pool_up_to_the_bound() -> None:
    # Calls that wait for each other must all get a thread, or this deadlocks.
    width = 6
    barrier = threading.Barrier(width, timeout=WAIT)
    async with offloop.ThreadPool(width, name="grow") as pool:
        await asyncio.gather(*(pool.run(barrier.wait) for _ in range(width)))
        assert pool.statistics()["threads"] == width


async def test_short_calls_reuse_a_few_warm_threads() -> None:
    async with offloop.ThreadPool(name="warm") as pool:
        for _ in range(3):
            await asyncio.gather(*(pool.run(abs, -i) for i in range(300)))
        # Trivial calls never look blocked, so the pool does not balloon.
        assert pool.statistics()["threads"] < DEFAULT_MAX_WORKERS


def test_default_pool_is_bounded_and_named() -> None:
    pool = default_thread_pool()
    assert pool.name == "default"
    assert pool.max_workers == DEFAULT_MAX_WORKERS == 40


@pytest.mark.loops("asyncio")
async def test_a_second_aclose_waits_like_the_first() -> None:
    pool = offloop.ThreadPool(2, name="twice")
    await pool.run(abs, 1)
    await asyncio.gather(pool.aclose(), pool.aclose())
    await pool.aclose()
    assert pool_threads("twice") == []


def test_error_hierarchy_has_one_base_and_builtin_meanings() -> None:
    pairs = {
        offloop.PoolClosedError: RuntimeError,
        offloop.PoolConnectionError: ConnectionError,
        offloop.WouldDeadlockError: RuntimeError,
        offloop.CallerGoneError: RuntimeError,
        offloop.WorkerCrashed: RuntimeError,
        offloop.NotPicklableError: TypeError,
        offloop.ServiceFailed: RuntimeError,
        offloop.LoopBlockedError: AssertionError,
        offloop.MissingExtraError: ImportError,
        offloop.StatusPortError: OSError,
    }
    for cls, builtin in pairs.items():
        assert issubclass(cls, offloop.OffloopError)
        assert issubclass(cls, builtin)

    # Every exported error is in the table, and so every one carries a builtin meaning.
    def subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
        direct = set(cls.__subclasses__())
        return direct.union(*(subclasses(c) for c in direct))

    exported = {getattr(offloop, n) for n in offloop.__all__}
    assert {c for c in subclasses(offloop.OffloopError) if c in exported} == set(pairs)
    for cls in pairs:
        meanings = [b for b in cls.__mro__ if b.__module__ == "builtins"]
        assert meanings[0] is not Exception, f"{cls.__name__} carries no builtin meaning"


def test_token_is_visible_through_wait_in_other_thread_before_set() -> None:
    token = offloop.StopToken()
    started = threading.Event()
    outcome: list[bool] = []

    def waiter() -> None:
        started.set()
        outcome.append(token.wait(WAIT))

    t = threading.Thread(target=waiter)
    t.start()
    assert started.wait(WAIT)
    token.set()
    t.join(WAIT)
    wait_until(lambda: outcome == [True], WAIT)


async def test_asyncio_wait_takes_it_through_create_task_and_as_completed_takes_it_bare() -> None:
    # OffloadFuture is a coroutine too (for create_task), so asyncio.wait
    # refuses it bare, as docs/threads.md says, and takes it wrapped in a task.
    bare = offloop.to_thread(abs, -1)
    if sys.version_info >= (3, 11):
        with pytest.raises(TypeError, match="Passing coroutines is forbidden"):
            await asyncio.wait([bare])
        assert await bare == 1  # the refused call still ran and can be awaited
    else:
        # Python 3.10 only deprecates passing a coroutine, and takes it.
        with pytest.warns(DeprecationWarning, match="passing of coroutine objects"):
            taken, left = await asyncio.wait([bare], timeout=WAIT)
        assert not left
        assert [f.result() for f in taken] == [1]
    tasks = [asyncio.create_task(offloop.to_thread(abs, -n)) for n in range(3)]
    done, pending = await asyncio.wait(tasks, timeout=WAIT)
    assert not pending
    assert sorted(t.result() for t in done) == [0, 1, 2]
    firsts = [await f for f in asyncio.as_completed([offloop.to_thread(abs, -n) for n in range(3)])]
    assert sorted(firsts) == [0, 1, 2]

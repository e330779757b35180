"""``ThreadPool.map``: batched calls as an async iterator, with single calls' semantics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import offloop
from tests.helpers import WAIT, await_until

pytestmark = pytest.mark.loops("asyncio", "uvloop")


def square(x: int) -> int:
    return x * x


async def test_results_come_in_order_for_any_chunk_size() -> None:
    async with offloop.ThreadPool(4, name="map") as pool:
        for chunksize in (None, 1, 7, 1000):
            results = [r async for r in pool.map(square, range(500), chunksize=chunksize)]
            assert results == [x * x for x in range(500)]


async def test_unordered_results_are_all_there() -> None:
    async with offloop.ThreadPool(4, name="map-unordered") as pool:
        results = [r async for r in pool.map(square, range(300), ordered=False, chunksize=5)]
        assert sorted(results) == [x * x for x in range(300)]


async def test_an_empty_iterable_ends_at_once() -> None:
    async with offloop.ThreadPool(2, name="map-empty") as pool:
        assert [r async for r in pool.map(square, [])] == []


async def test_an_item_that_raises_ends_the_iteration_after_the_results_before_it() -> None:
    def fail_at_5(x: int) -> int:
        if x == 5:
            raise ValueError(f"bad item {x}")
        return x

    async with offloop.ThreadPool(2, name="map-error") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(fail_at_5, range(20), chunksize=3):
                seen.append(r)

        with pytest.raises(ValueError, match="bad item 5") as info:
            await consume()
        assert seen == [0, 1, 2, 3, 4]
        assert info.traceback[-1].name == "fail_at_5"  # the worker's traceback rides along


async def test_blocking_items_with_the_adaptive_chunks_run_side_by_side() -> None:
    barrier = threading.Barrier(4, timeout=WAIT)

    def meet(x: int) -> int:
        barrier.wait()  # all four must be running at once, or this times out
        return x

    async with offloop.ThreadPool(4, name="map-blocking") as pool:
        assert [r async for r in pool.map(meet, range(8))] == list(range(8))


async def test_closing_the_results_stops_the_calls_still_running() -> None:
    started = threading.Event()
    stopped: list[bool] = []

    def slow(x: int) -> int:
        if x == 0:
            started.set()
            stopped.append(offloop.current_token().wait(WAIT))
        return x

    async with offloop.ThreadPool(2, name="map-close") as pool:
        async with pool.map(slow, range(10), chunksize=5) as results:
            first = asyncio.ensure_future(results.__anext__())
            await asyncio.to_thread(started.wait, WAIT)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        await await_until(lambda: stopped == [True], WAIT, "the running chunk to see its token")
        # The chunk stopped between items: items 1-4 never ran.
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, "the pool to idle")


async def test_map_checks_its_arguments_before_running_anything() -> None:
    async def coro(x: int) -> int:
        return x

    async with offloop.ThreadPool(2, name="map-checks") as pool:
        with pytest.raises(TypeError, match=r"offloop\.to_loop"):
            pool.map(coro, [1])
        with pytest.raises(ValueError, match=r"ThreadPool.map\(chunksize=...\) must be at least 1"):
            pool.map(square, [1], chunksize=0)
        with pytest.raises(TypeError, match=r"ThreadPool.map\(ordered=...\) must be True or False"):
            pool.map(square, [1], ordered="yes")  # type: ignore[arg-type]
        assert pool.statistics()["completed"] == 0


async def test_the_chunks_grow_for_quick_items() -> None:
    async with offloop.ThreadPool(2, name="map-grow") as pool:
        results = [r async for r in pool.map(square, range(5000))]
        assert results == [x * x for x in range(5000)]
        # 5000 quick items in far fewer pool calls than items.
        assert pool.statistics()["completed"] < 500


async def test_a_pool_closed_during_a_map_fails_it_instead_of_dropping_items() -> None:
    started = threading.Event()

    def slow(x: int) -> int:
        if x == 0:
            started.set()
            offloop.current_token().wait(WAIT)  # set by the close
        return x

    pool = offloop.ThreadPool(2, name="map-closing")
    seen: list[int] = []

    async def consume() -> None:
        async for r in pool.map(slow, range(20), chunksize=10):
            seen.append(r)

    consuming = asyncio.ensure_future(consume())
    await asyncio.to_thread(started.wait, WAIT)
    closing = asyncio.ensure_future(pool.aclose())
    with pytest.raises(offloop.PoolClosedError, match="items not yet run were skipped"):
        await asyncio.wait_for(consuming, WAIT)
    assert seen == [0]  # item 0 ended when the close set its token; 1-9 never ran
    await asyncio.wait_for(closing, WAIT)


async def test_an_iterable_that_raises_ends_the_map_after_the_results_before_it() -> None:
    def items() -> Iterator[int]:
        yield from range(6)
        raise ValueError("bad input")

    async with offloop.ThreadPool(2, name="map-bad-input") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(square, items(), chunksize=2):
                seen.append(r)

        with pytest.raises(ValueError, match="bad input"):
            await consume()
        assert seen == [x * x for x in range(6)]
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, "nothing left running")


@pytest.mark.parametrize("chunksize", [4, None])
async def test_the_items_pulled_before_an_iterable_raises_are_all_run(
    chunksize: int | None,
) -> None:
    # The error comes in the middle of a chunk: the items already taken for
    # that chunk must still run and give their results before the error.
    def items() -> Iterator[int]:
        yield from range(7)
        raise ValueError("bad input")

    async with offloop.ThreadPool(2, name="map-bad-chunk") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(square, items(), chunksize=chunksize):
                seen.append(r)

        with pytest.raises(ValueError, match="bad input"):
            await consume()
        assert seen == [x * x for x in range(7)]


@pytest.mark.parametrize("error", [StopIteration, StopAsyncIteration])
async def test_an_item_raising_stop_iteration_fails_the_map_instead_of_ending_it(
    error: type[Exception],
) -> None:
    # Raised from __anext__, either would end `async for` as if every item
    # were done (or become a bare "coroutine raised StopIteration").
    def halting(x: int) -> int:
        if x == 3:
            raise error("halt")
        return x

    async with offloop.ThreadPool(2, name="map-halting") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(halting, range(6), chunksize=2):
                seen.append(r)

        with pytest.raises(RuntimeError, match=f"halting' raised {error.__name__}") as info:
            await consume()
        assert seen == [0, 1, 2]
        assert type(info.value.__cause__) is error


async def test_an_iterable_raising_stop_async_iteration_fails_the_map() -> None:
    class Halting:
        def __init__(self) -> None:
            self.n = 0

        def __iter__(self) -> Halting:
            return self

        def __next__(self) -> int:
            self.n += 1
            if self.n > 2:
                raise StopAsyncIteration("halt")
            return self.n

    async with offloop.ThreadPool(2, name="map-halting-source") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(square, Halting()):
                seen.append(r)

        with pytest.raises(RuntimeError, match=r"iterable .* raised StopAsyncIteration"):
            await consume()
        assert seen == [1, 4]


@pytest.mark.parametrize("ordered", [True, False])
async def test_closing_the_results_from_another_task_ends_its_iteration(ordered: bool) -> None:
    gate, started = threading.Event(), threading.Event()

    def held(x: int) -> int:
        started.set()
        gate.wait(WAIT)
        return x

    async with offloop.ThreadPool(2, name="map-closed-aside") as pool:
        results = pool.map(held, range(10), ordered=ordered)

        async def consume() -> list[int]:
            return [r async for r in results]

        consuming = asyncio.ensure_future(consume())
        try:
            await asyncio.to_thread(started.wait, WAIT)
            await results.aclose()
            assert await asyncio.wait_for(consuming, WAIT) == []
        finally:
            gate.set()


async def test_a_function_returning_a_coroutine_fails_the_map_as_it_fails_a_call() -> None:
    async def fetch(x: int) -> int:
        return x

    def forgot_await(x: int) -> Any:
        return fetch(x) if x == 2 else x

    async with offloop.ThreadPool(2, name="map-coroutine") as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for r in pool.map(forgot_await, range(5), chunksize=1):
                seen.append(r)

        with pytest.raises(TypeError, match="returned a coroutine instead of a result"):
            await consume()
        assert seen == [0, 1]

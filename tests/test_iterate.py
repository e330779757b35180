"""offloop.threaded and offloop.iterate."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator

import pytest

import offloop

from .helpers import await_until

WAIT = 10.0


async def test_threaded_keeps_the_signature_and_runs_in_a_worker() -> None:
    @offloop.threaded
    def scale(value: int, *, factor: int = 2) -> tuple[int, str]:
        """Multiply in a thread."""
        return value * factor, threading.current_thread().name

    assert scale.__name__ == "scale"
    assert scale.__doc__ == "Multiply in a thread."
    assert str(inspect.signature(scale)) == (
        "(value: 'int', *, factor: 'int' = 2) -> 'tuple[int, str]'"
    )
    result, thread = await scale(21, factor=2)
    assert result == 42
    assert thread.startswith("offloop-default-")
    value, _ = await asyncio.create_task(scale(1))
    assert value == 2


async def test_threaded_with_a_pool_uses_that_pool() -> None:
    async with offloop.ThreadPool(1, name="deco") as pool:

        @offloop.threaded(pool=pool)
        def where() -> str:
            return threading.current_thread().name

        assert await where() == "offloop-deco-1"


def test_threaded_rejects_coroutine_functions_and_bad_pools() -> None:
    with pytest.raises(TypeError, match="coroutine function"):

        @offloop.threaded
        async def nope() -> None: ...

    with pytest.raises(TypeError, match=r"threaded\(pool=...\) needs a ThreadPool"):
        offloop.threaded(pool="default")  # type: ignore[call-overload]


async def test_iterate_yields_every_item_in_order() -> None:
    assert [x async for x in offloop.iterate(range(100), buffer=4)] == list(range(100))
    nothing: list[int] = []
    assert [x async for x in offloop.iterate(nothing)] == []


async def test_iterate_pulls_in_a_worker_thread() -> None:
    def where() -> Iterator[str]:
        for _ in range(3):
            yield threading.current_thread().name

    names = [n async for n in offloop.iterate(where())]
    assert all(n.startswith("offloop-default-") for n in names)


async def test_iterate_never_runs_more_than_buffer_items_ahead() -> None:
    produced = 0
    consumed = 0
    violations: list[tuple[int, int]] = []

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(60):
            # The semaphore is released just before the consumer counts an
            # item, so one extra item may be in flight at that instant.
            if produced > consumed + 3 + 1:
                violations.append((produced, consumed))
            produced += 1
            yield i

    async for _ in offloop.iterate(source(), buffer=3):
        consumed += 1
        await asyncio.sleep(0)
    assert consumed == 60
    assert violations == []


async def test_iterate_stops_producing_when_the_buffer_is_full() -> None:
    produced = threading.Semaphore(0)
    count = 0

    def source() -> Iterator[int]:
        nonlocal count
        for i in range(1000):
            count += 1
            produced.release()
            yield i

    it = offloop.iterate(source(), buffer=2)
    async with it:
        assert await it.__anext__() == 0
        # The first item plus two buffered ones: then the producer must wait.
        for _ in range(3):
            assert await asyncio.to_thread(produced.acquire, True, WAIT)
        assert not await asyncio.to_thread(produced.acquire, True, 0.2)
        assert count == 3


async def test_break_closes_the_generator_in_the_worker_and_frees_it() -> None:
    closed_in: list[str] = []
    done = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(10_000)
        finally:
            closed_in.append(threading.current_thread().name)
            done.set()

    async with offloop.ThreadPool(1, name="brk") as pool:
        async for x in offloop.iterate(source(), buffer=2, pool=pool):
            if x == 5:
                break
        assert await asyncio.to_thread(done.wait, WAIT)
        assert closed_in == ["offloop-brk-1"]
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT)
        assert await pool.run(abs, -2) == 2  # the worker is free again


async def test_cancelling_the_consumer_closes_the_generator() -> None:
    entered = asyncio.Event()
    done = threading.Event()

    def slow_source() -> Iterator[int]:
        try:
            yield 1
            while not offloop.current_token().wait(0.01):
                pass
            yield 2
        finally:
            done.set()

    async def consume() -> None:
        async for _ in offloop.iterate(slow_source()):
            entered.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(entered.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(done.wait, WAIT)


async def test_aclose_waits_until_the_generator_finally_ran() -> None:
    finalized = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            finalized.set()

    it = offloop.iterate(source())
    assert await it.__anext__() == 0
    await asyncio.wait_for(it.aclose(), WAIT)
    assert finalized.is_set()
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()
    assert "finished" in repr(it)


async def test_exceptions_from_the_source_propagate() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise KeyError("missing")

    got: list[int] = []

    async def consume() -> None:
        async for x in offloop.iterate(source()):
            got.append(x)

    with pytest.raises(KeyError, match="missing"):
        await consume()
    assert got == [1]


async def test_iterate_input_errors() -> None:
    with pytest.raises(ValueError, match=r"buffer=...\) must be at least 1"):
        offloop.iterate(range(3), buffer=0)
    with pytest.raises(TypeError, match="needs an iterable, got int 5"):
        offloop.iterate(5)  # type: ignore[arg-type]

    async def agen() -> object:
        yield 1

    with pytest.raises(TypeError, match=r"async iterable .*'async for' on it directly"):
        offloop.iterate(agen())  # type: ignore[arg-type]

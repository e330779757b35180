"""offloop.threaded and offloop.iterate."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest

import offloop
from tests.helpers import WAIT, await_until


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
    with pytest.raises(TypeError, match=r"decorates a function, but got int 5\. Put @offloop"):
        offloop.threaded(5)  # type: ignore[call-overload]


def test_a_threaded_function_called_outside_a_loop_says_how_to_call_it() -> None:
    @offloop.threaded
    def read_config(path: str) -> str:
        return path

    with pytest.raises(RuntimeError, match=r"'await read_config\(\.\.\.\)'.*__wrapped__"):
        read_config("app.toml")
    assert read_config.__wrapped__("app.toml") == "app.toml"  # type: ignore[attr-defined]


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


def _until_stopped() -> Iterator[int]:
    # Yields once, then waits (bounded) until its stop token is set.
    yield 1
    offloop.current_token().wait(WAIT)


async def test_a_pool_closing_under_the_iterator_raises_instead_of_a_quiet_end() -> None:
    def endless() -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    pool = offloop.ThreadPool(1, name="closing-under")
    it = offloop.iterate(endless(), buffer=1, pool=pool)
    assert await it.__anext__() == 0
    closing = asyncio.ensure_future(pool.aclose())
    got: list[int] = []

    async def drain() -> None:
        async for x in it:  # what was buffered, then the error, never a quiet end
            got.append(x)
            assert len(got) < 10, "the producer kept going after its pool closed"

    with pytest.raises(offloop.PoolClosedError, match="stopped before the source was exhausted"):
        await asyncio.wait_for(drain(), WAIT)
    await asyncio.wait_for(closing, WAIT)


async def test_aclose_ends_the_iteration_of_a_task_waiting_for_an_item() -> None:
    pool = offloop.ThreadPool(1, name="busy-producer")
    release = threading.Event()
    busy = pool.run(release.wait, WAIT)  # the producer queues behind it
    it = offloop.iterate(range(5), pool=pool)

    async def consume() -> list[int]:
        return [x async for x in it]

    consumer = asyncio.create_task(consume())
    await await_until(lambda: it._shared.waiter is not None, WAIT)
    closing = asyncio.ensure_future(it.aclose())
    try:
        assert await asyncio.wait_for(consumer, WAIT) == []  # woken, and finished cleanly
    finally:
        release.set()
    await asyncio.wait_for(closing, WAIT)
    assert await busy is True
    await asyncio.wait_for(pool.aclose(), WAIT)


async def test_two_tasks_awaiting_one_iterator_is_an_error_not_a_hang() -> None:
    it = offloop.iterate(_until_stopped())
    assert await it.__anext__() == 1
    first = asyncio.create_task(it.__anext__())
    await await_until(lambda: it._shared.waiter is not None, WAIT)
    with pytest.raises(RuntimeError, match="already awaited by another task"):
        await it.__anext__()
    await asyncio.wait_for(it.aclose(), WAIT)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(first, WAIT)


@pytest.mark.parametrize("how", ["break", "aclose"])
async def test_the_source_cleanup_can_call_back_into_the_loop(how: str) -> None:
    loop = asyncio.get_running_loop()

    async def release(n: int) -> tuple[int, bool]:
        await asyncio.sleep(0)
        return n, asyncio.get_running_loop() is loop

    released: list[object] = []

    def rows() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            released.append(offloop.from_thread(release, 7))

    it = offloop.iterate(rows())
    async with it:
        async for n in it:
            if n == 2:
                if how == "aclose":
                    await asyncio.wait_for(it.aclose(), WAIT)
                break
    assert released == [(7, True)]


async def test_a_stuck_source_is_named_in_the_pool_s_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()

    def tail_log() -> Iterator[str]:
        release.wait(WAIT)
        yield "line"

    pool = offloop.ThreadPool(1, name="stuck-source")
    it = offloop.iterate(tail_log(), pool=pool)
    first = asyncio.ensure_future(it.__anext__())
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    try:
        await asyncio.wait_for(pool.aclose(timeout=0.01), WAIT)
        assert (
            ".tail_log (iterated by offloop.iterate())' in thread offloop-stuck-source"
            in caplog.text
        )
        # The pool gave up on the thread, which is still stuck: the iterator
        # says so instead of waiting for it.
        with pytest.raises(
            offloop.PoolClosedError, match=r"before the source was exhausted|abandoned"
        ):
            await asyncio.wait_for(first, WAIT)
    finally:
        release.set()
    await asyncio.wait_for(it.aclose(), WAIT)


def test_a_threaded_function_counts_as_a_coroutine_function() -> None:
    # Frameworks (Starlette, FastAPI, bot libraries) decide with these checks
    # whether to await an endpoint or run it in their own thread pool.
    @offloop.threaded
    def work() -> int:
        return 1

    assert asyncio.iscoroutinefunction(work)
    if sys.version_info >= (3, 12):
        assert inspect.iscoroutinefunction(work)
    # The undecorated function is untouched.
    assert not asyncio.iscoroutinefunction(work.__wrapped__)  # type: ignore[attr-defined]


def test_the_coroutine_marker_offloop_relies_on_exists() -> None:
    # The contract behind mark_coroutine_function: the public marker from 3.12
    # on, asyncio's private one (what asgiref sets) before.
    if sys.version_info >= (3, 12):
        assert callable(inspect.markcoroutinefunction)
    else:
        import asyncio.coroutines

        from offloop._core.validate import _IS_COROUTINE

        assert _IS_COROUTINE is asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


async def test_a_threaded_starlette_endpoint_is_awaited_not_run_in_starlettes_pool() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    @offloop.threaded
    def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(threading.current_thread().name)

    app = Starlette(routes=[Route("/", endpoint)])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), WAIT)
    assert sent[0]["status"] == 200
    # Awaited by Starlette, so the body ran in offloop's pool; run in
    # Starlette's pool it would have found no running loop and failed.
    assert sent[1]["body"].decode().startswith("offloop-default-")


class _Methods:
    base = 10

    def __init__(self) -> None:
        self.base = 100

    @offloop.threaded
    @staticmethod
    def static_above(x: int) -> int:
        return x + 1

    @staticmethod
    @offloop.threaded
    def static_below(x: int) -> int:
        return x + 2

    @offloop.threaded
    @classmethod
    def class_above(cls, x: int) -> int:
        return cls.base + x

    @classmethod
    @offloop.threaded
    def class_below(cls, x: int) -> int:
        return cls.base + x

    @offloop.threaded
    def method(self, x: int) -> int:
        return self.base + x


async def test_threaded_works_with_staticmethod_and_classmethod_in_either_order() -> None:
    obj = _Methods()
    for owner in (_Methods, obj):
        assert await owner.static_above(1) == 2
        assert await owner.static_below(1) == 3
        assert await owner.class_above(1) == 11
        assert await owner.class_below(1) == 11
    assert await obj.method(1) == 101
    assert asyncio.iscoroutinefunction(_Methods.static_above)
    assert asyncio.iscoroutinefunction(obj.class_above)


async def test_a_source_raising_stop_async_iteration_fails_the_iteration() -> None:
    def halting() -> Iterator[int]:
        yield 1
        yield 2
        raise StopAsyncIteration("halt")

    seen: list[int] = []

    async def consume() -> None:
        async for item in offloop.iterate(halting()):
            seen.append(item)

    with pytest.raises(RuntimeError, match="raised StopAsyncIteration") as info:
        await consume()
    assert seen == [1, 2]
    assert type(info.value.__cause__) is StopAsyncIteration


async def test_a_sequence_without_iter_is_iterated_as_for_would() -> None:
    # for and iter() take an object with only __getitem__ (the sequence
    # protocol); so does iterate(), and refuses an object with neither.
    class Squares:
        def __getitem__(self, index: int) -> int:
            if index >= 4:
                raise IndexError(index)
            return index * index

    squares: Any = Squares()  # not an Iterable to the type checker, as for iter()'s stub
    items = [item async for item in offloop.iterate(squares)]
    assert items == [0, 1, 4, 9] == list(squares)
    with pytest.raises(TypeError, match="needs an iterable, got object"):
        offloop.iterate(object())  # type: ignore[arg-type]

"""offloop.iterate(): iterators kept after their event loop ended."""

from __future__ import annotations

import asyncio
import itertools
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import offloop
from tests.conftest import run_on
from tests.helpers import QUICK_WAIT, WAIT, await_until, wait_until


class _Endless:
    """A generator source that records where its ``finally`` ran, with an event to wait on."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.closed_in: list[str] = []

    def __iter__(self) -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            self.closed_in.append(threading.current_thread().name)
            self.closed.set()


def _run_and_close_without_shutdown(coro: Coroutine[Any, Any, None]) -> None:
    # The older pattern: run_until_complete, then close(), with no
    # shutdown_asyncgens() (nor task cancellation) in between.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


LOOP_ENDS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio.run": asyncio.run,
    "uvloop": lambda coro: run_on("uvloop", coro),
    "closed without shutdown": _run_and_close_without_shutdown,
}


@pytest.mark.parametrize("loop_end", LOOP_ENDS)
def test_iterators_kept_after_their_loop_ended_close_their_sources_and_free_their_threads(
    loop_end: str,
) -> None:
    # Kept referenced (a global, an attribute), so no __del__ stops them: the
    # end of their loop does, and each source's finally runs in its worker.
    # Two on one loop, and one that its consumer closed: it stays closed.
    sources = [_Endless(), _Endless()]
    done = _Endless()
    kept: list[offloop.ThreadedIterator[int]] = []
    pool = offloop.ThreadPool(3, name="kept")
    try:

        async def main() -> None:
            async with offloop.iterate(done, pool=pool) as closed:
                assert await closed.__anext__() == 0
            for source in sources:
                it = offloop.iterate(source, buffer=2, pool=pool)
                kept.append(it)
                assert await it.__anext__() == 0
            for it in kept:
                # The producer fills the buffer (items 1 and 2) and waits for room.
                await await_until(lambda: "2 buffered" in repr(it), what="a full buffer")  # noqa: B023

        LOOP_ENDS[loop_end](main())
        if loop_end != "closed without shutdown":
            # The loop's shutdown waited for the close: a program that exits
            # now leaves no call running behind (the exit would log it as stuck).
            assert all(source.closed.is_set() for source in sources)
            assert pool.statistics()["running"] == 0
        for source in sources:
            assert source.closed.wait(QUICK_WAIT), "a producer still holds its thread"
        closed_in = [name for source in sources for name in source.closed_in]
        assert len(closed_in) == 2
        assert all(name.startswith("offloop-kept-") for name in closed_in)
        assert len(done.closed_in) == 1
        wait_until(lambda: pool.statistics()["running"] == 0, QUICK_WAIT, "threads given back")
        assert all("finished" in repr(it) for it in kept)

        async def take_again() -> None:
            await kept[0].__anext__()

        # Not a silent end on another loop: the items left were never taken.
        with pytest.raises(RuntimeError, match="closed when the event loop it ran on ended"):
            asyncio.run(take_again())
    finally:
        pool.close()


class _WaitsForRequests:
    """A generator source that yields once, then waits for a request that never comes.

    It polls its stop token while it waits, as the docs advise, so its producer
    sits in ``next()``, not on a full buffer: only a stop can end it. Its own
    bound (WAIT) keeps a failing test from leaving it behind for good.
    """

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.closed = threading.Event()
        self.closed_in: list[str] = []

    def __iter__(self) -> Iterator[str]:
        try:
            yield "first"
            self.waiting.set()
            offloop.current_token().wait(WAIT)
            yield "never taken"
        finally:
            self.closed_in.append(threading.current_thread().name)
            self.closed.set()


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _check_stopped_by_the_close(
    loop: asyncio.AbstractEventLoop,
    source: _WaitsForRequests,
    kept: offloop.ThreadedIterator[str],
    pool: offloop.ThreadPool,
    name: str,
) -> None:
    # The close stops the producer itself: nothing else would (no shutdown of
    # the loop's async generators is left to do it, and a producer waiting in
    # next() never looks whether its loop was closed).
    loop.close()
    assert source.closed.wait(QUICK_WAIT), "the producer was not stopped by the loop's close"
    assert len(source.closed_in) == 1
    assert source.closed_in[0].startswith(f"offloop-{name}-")  # the finally ran in the worker
    wait_until(lambda: pool.statistics()["running"] == 0, QUICK_WAIT, "the thread given back")
    assert "finished" in repr(kept)
    pool.close()
    prefix = f"offloop-{name}-"
    wait_until(
        lambda: not any(t.name.startswith(prefix) for t in threading.enumerate()),
        QUICK_WAIT,
        "the pool's thread to end",
    )


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_kept_iterator_waiting_in_its_source_is_stopped_by_a_close_without_shutdown(
    kind: str,
) -> None:
    # run_until_complete() then close(): no shutdown_asyncgens(), and the
    # producer waits in the source's next() rather than for room in the buffer.
    source = _WaitsForRequests()
    kept: list[offloop.ThreadedIterator[str]] = []
    name = f"close-{kind}"
    pool = offloop.ThreadPool(1, name=name)
    loop = _new_loop(kind)
    try:

        async def main() -> None:
            it = offloop.iterate(source, pool=pool)
            kept.append(it)
            assert await it.__anext__() == "first"
            await await_until(source.waiting.is_set, WAIT, "the source waiting for a request")

        loop.run_until_complete(main())
        _check_stopped_by_the_close(loop, source, kept[0], pool, name)
    finally:
        loop.close()
        pool.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_an_iterator_on_a_loop_run_again_after_shutdown_asyncgens_is_stopped_by_its_close(
    kind: str,
) -> None:
    # The loop's shutdown_asyncgens() closed its iterate watch; the loop then
    # runs again and keeps a new iterator, which the second shutdown_asyncgens()
    # leaves running: the close must stop it. Without asyncio's ResourceWarning
    # for an async generator first iterated after shutdown_asyncgens().
    source = _WaitsForRequests()
    kept: list[offloop.ThreadedIterator[str]] = []
    name = f"rerun-{kind}"
    pool = offloop.ThreadPool(1, name=name)
    loop = _new_loop(kind)

    async def before() -> None:
        async with offloop.iterate(range(3), pool=pool) as it:
            assert await it.__anext__() == 0

    async def after() -> None:
        it = offloop.iterate(source, pool=pool)
        kept.append(it)
        assert await it.__anext__() == "first"
        await await_until(source.waiting.is_set, WAIT, "the source waiting for a request")

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.run_until_complete(before())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(after())
            loop.run_until_complete(loop.shutdown_asyncgens())
            _check_stopped_by_the_close(loop, source, kept[0], pool, name)
        assert [str(w.message) for w in caught if "shutdown_asyncgens" in str(w.message)] == []
    finally:
        loop.close()
        pool.close()

"""offloop.iterate(): iterators kept after their event loop ended."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import offloop
from tests.conftest import run_on
from tests.helpers import QUICK_WAIT, await_until, wait_until


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

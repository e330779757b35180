"""``ThreadPool.map``: many calls of one function, batched, as an async iterator.

Each pool call carries a chunk of items, so a call's fixed cost (the queue,
the wake-ups, the future) is paid once per chunk instead of once per item.
With ``chunksize=None`` the chunk size adapts: it starts at one item, so
blocking items still run side by side in as many threads as the pool has,
and doubles while chunks finish quickly, so that small items cost little
more than the function itself.

Results come back in the iterable's order (``ordered=True``) or as chunks
finish. Errors, cancellation and tokens behave as for single calls: an item
that raises ends the iteration with its exception (after the results before
it, in order), and the calls still running get their StopToken set; a chunk
stops between items once its token is set (the consumer closed the iterator
or was cancelled), so nothing keeps running for nobody.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import CoroutineType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from .._core.errors import CallerGoneError, PoolClosedError
from .._core.offload import mark_retrieved
from .._core.token import thread_state
from .._core.validate import describe

if TYPE_CHECKING:
    from .._core.offload import OffloadFuture

__all__ = ["MapResults", "crossable"]

T = TypeVar("T")
R = TypeVar("R")

#: With ``chunksize=None``: the largest chunk, and the time a chunk may take
#: before it stops growing (long enough to make a call's fixed cost small,
#: short enough that a pool still spreads the items over its threads).
MAX_CHUNK: Final = 1024
FAST_CHUNK: Final = 0.0005

Outcome = tuple[list[Any], BaseException | None, float]


class Runs(Protocol):
    """What :class:`MapResults` needs of its pool (a ThreadPool)."""

    @property
    def max_workers(self) -> int: ...

    def run(self, fn: Callable[..., Outcome], /, *args: Any) -> OffloadFuture[Outcome]: ...


def _run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> Outcome:
    # In a worker thread: the chunk's results, the error that ended it (if
    # any) and how long it took. Stops between items once the call's token is
    # set: its consumer is gone.
    call = thread_state.call
    token = call.token if call is not None else None
    results: list[Any] = []
    start = time.monotonic()
    try:
        for item in chunk:
            if token is not None and token.is_set():
                return results, _stopped(fn, token.reason), time.monotonic() - start
            result = fn(item)
            if type(result) is CoroutineType:  # refused, as a single call refuses it
                result.close()
                raise TypeError(
                    f"{describe(fn)} returned a coroutine instead of a result, so it is "
                    f"async code: 'await' it directly, or gather the coroutines."
                )
            results.append(result)
    except BaseException as exc:  # delivered in its place, like a single call's
        return results, exc, time.monotonic() - start
    return results, None, time.monotonic() - start


def _stopped(fn: Callable[[Any], Any], reason: str | None) -> BaseException:
    # A chunk cut short must not pass for a whole one: the items it skipped
    # would silently be missing from the results.
    if reason == "pool closing":
        return PoolClosedError(
            f"The pool closed while map() of {describe(fn)} was running; the items not yet "
            f"run were skipped. Close the pool after the map() is done."
        )
    return CallerGoneError(f"map() of {describe(fn)} was stopped ({reason!r}).")


def crossable(error: BaseException, who: str) -> BaseException:
    """What ``__anext__`` raises for ``error``, raised by ``who`` (a function, a source).

    Raised as it is, StopAsyncIteration would end the consumer's ``async for``
    as if every item were done, and StopIteration would become a bare
    "coroutine raised StopIteration". So, as in an async generator (PEP 479),
    either becomes a RuntimeError caused by it.
    """
    if not isinstance(error, (StopIteration, StopAsyncIteration)):
        return error
    wrapped = RuntimeError(
        f"{who} raised {type(error).__name__}, which would end the 'async for' as if every "
        f"item were done; catch it there, or raise another exception."
    )
    wrapped.__cause__ = error
    return wrapped


class MapResults(AsyncIterator[R], Generic[R]):
    """The results of :meth:`ThreadPool.map`: ``async for result in pool.map(fn, items)``.

    Also an async context manager: leaving ``async with`` (or calling
    :meth:`aclose`) stops the calls still running (their StopToken is set)
    and submits no more. Breaking out of ``async for`` without it leaves the
    chunks in flight to finish by themselves.
    """

    def __init__(
        self,
        pool: Runs,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None,
        ordered: bool,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._items: Iterator[Any] = iter(iterable)
        self._fixed = chunksize
        self._size = chunksize or 1
        self._ordered = ordered
        # Enough chunks in flight to keep every thread of the pool busy.
        self._window = 2 * pool.max_workers
        self._inflight: deque[OffloadFuture[Outcome]] = deque()
        self._ready: deque[Any] = deque()
        self._error: BaseException | None = None
        self._source_error: BaseException | None = None
        self._exhausted = False
        self._closed = False

    def __aiter__(self) -> MapResults[R]:
        return self

    async def __anext__(self) -> R:
        while not self._ready:
            error = self._error
            if error is not None:
                self._error = None
                self._stop()
                try:
                    raise crossable(error, describe(self._fn))
                finally:
                    del error
            if self._closed:
                raise StopAsyncIteration
            try:
                self._fill()
            except BaseException as exc:  # from the iterable: raised after the results before it
                self._exhausted = True
                self._source_error = exc
            if not self._inflight:
                source_error = self._source_error
                if source_error is not None:
                    self._source_error = None
                    self._stop()
                    try:
                        raise crossable(
                            source_error, f"the iterable given to map() of {describe(self._fn)}"
                        )
                    finally:
                        del source_error
                self._closed = True
                raise StopAsyncIteration
            try:
                future = await self._next_done()
            except BaseException:  # cancelled (or interrupted) while waiting
                self._stop()
                raise
            try:
                results, error, took = future.result()
            except BaseException:  # the pool closed under it
                self._stop()
                raise
            self._ready.extend(results)
            self._error = error
            if self._fixed is None and error is None:
                self._adapt(took, len(results))
        return self._ready.popleft()  # type: ignore[no-any-return]

    async def _next_done(self) -> OffloadFuture[Outcome]:
        # asyncio.wait() refuses an OffloadFuture (it is also a coroutine),
        # hence a waiter of our own for the first chunk that finishes.
        if self._ordered:
            future = self._inflight[0]
            if not future.done():
                await self._first_of((future,))
                if not self._inflight or self._inflight[0] is not future:
                    raise StopAsyncIteration  # closed by another task meanwhile
            self._inflight.popleft()
            return future
        done = next((f for f in self._inflight if f.done()), None)
        if done is None:
            await self._first_of(self._inflight)
            done = next((f for f in self._inflight if f.done()), None)
            if done is None:  # closed by another task meanwhile
                raise StopAsyncIteration
        self._inflight.remove(done)
        return done

    @staticmethod
    async def _first_of(futures: Iterable[OffloadFuture[Outcome]]) -> None:
        waiter = asyncio.get_running_loop().create_future()

        def wake(_: object) -> None:
            if not waiter.done():
                waiter.set_result(None)

        watched = list(futures)
        for future in watched:
            future.add_done_callback(wake)
        try:
            await waiter
        finally:
            for future in watched:
                future.remove_done_callback(wake)

    def _fill(self) -> None:
        while not self._exhausted and len(self._inflight) < self._window:
            chunk: list[Any] = []
            try:
                chunk.extend(itertools.islice(self._items, self._size))
            except BaseException:
                # The iterable raised part-way through a chunk: the items it
                # gave before that still run, and their results come before
                # the error (__anext__ raises it once they are in).
                if chunk:
                    self._inflight.append(self._pool.run(_run_chunk, self._fn, chunk))
                raise
            if not chunk:
                self._exhausted = True
                return
            self._inflight.append(self._pool.run(_run_chunk, self._fn, chunk))

    def _adapt(self, took: float, count: int) -> None:
        if count >= self._size and took < FAST_CHUNK:
            self._size = min(self._size * 2, MAX_CHUNK)
        elif took > 8 * FAST_CHUNK and self._size > 1:
            self._size //= 2

    def _stop(self) -> None:
        self._closed = True
        self._exhausted = True
        self._ready.clear()
        for future in self._inflight:
            future.cancel()  # sets its token: the chunk stops between items
            # A chunk that ends with an error anyway (the pool closing) has
            # nobody to read it: retrieve it, so it is not logged as lost.
            future.add_done_callback(mark_retrieved)
        self._inflight.clear()

    async def aclose(self) -> None:
        """Stop: set the token of the calls still running and submit no more."""
        self._stop()

    async def __aenter__(self) -> MapResults[R]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

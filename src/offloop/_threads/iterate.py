"""``threaded`` and ``iterate``: sync functions and iterators, made awaitable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, TypeVar, final, overload

from .._core.errors import PoolClosedError
from .._core.loopclose import LoopCloseHook
from .._core.offload import OffloadFuture
from .._core.token import StopToken, current_token, thread_state
from .._core.validate import (
    check_positive_int,
    check_sync_callable,
    describe,
    mark_coroutine_function,
)
from .batch import crossable
from .pool import ThreadPool
from .room import Room
from .tothread import default_thread_pool

__all__ = ["ThreadedIterator", "iterate", "threaded"]

logger: Final = logging.getLogger("offloop")

_get_running_loop: Final = asyncio._get_running_loop

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: Items a producer thread may run ahead of the consumer by default.
DEFAULT_BUFFER: Final = 16

#: How often (seconds) a producer waiting for room in a full buffer checks
#: whether its loop was closed without telling it: a fallback for a loop whose
#: close() keeps its pending callbacks (asyncio's and uvloop's discard them,
#: which stops the producer at once: _LoopWatch). Only a waiting producer
#: checks: an item that finds room never waits for it.
LOOP_CHECK: Final = 0.5

#: Seconds the loop's shutdown waits for the producers it stopped to close
#: their sources (a generator's ``finally``) and give their threads back.
SHUTDOWN_WAIT: Final = 1.0


@overload
def threaded(fn: Callable[P, R], /) -> Callable[P, OffloadFuture[R]]: ...


@overload
def threaded(
    *, pool: ThreadPool | None = None
) -> Callable[[Callable[P, R]], Callable[P, OffloadFuture[R]]]: ...


def threaded(
    fn: Callable[P, R] | None = None, /, *, pool: ThreadPool | None = None
) -> Callable[P, OffloadFuture[R]] | Callable[[Callable[P, R]], Callable[P, OffloadFuture[R]]]:
    """Decorate a blocking function so that calling it returns an awaitable.

    ::

        @offloop.threaded
        def read_config(path: str) -> dict[str, str]: ...

        config = await read_config("app.toml")   # runs in a worker thread

    ``@offloop.threaded(pool=my_pool)`` sends the calls to ``my_pool`` instead
    of the default pool. The signature is kept for type checkers; the result is
    an :class:`OffloadFuture`, exactly what :func:`to_thread` returns.

    It may sit above or below ``@staticmethod`` and ``@classmethod``.
    The decorated function counts as a coroutine function
    (``asyncio.iscoroutinefunction``, and ``inspect.iscoroutinefunction`` on
    Python 3.12+), so frameworks that check, like Starlette and FastAPI,
    await it instead of running it in a thread pool of their own.

    Raises:
        TypeError: the decorated object is not callable, or is a coroutine or generator function.
    """
    if pool is not None and not isinstance(pool, ThreadPool):
        raise TypeError(f"offloop.threaded(pool=...) needs a ThreadPool, got {describe(pool)}.")

    def decorate(func: Callable[P, R]) -> Callable[P, OffloadFuture[R]]:
        # Above @staticmethod or @classmethod: decorate the function inside and
        # wrap the result the same way, so the descriptor still binds (no
        # instance passed to a static method, the class passed to a class one).
        method: Any = func
        if isinstance(method, staticmethod | classmethod):
            kind: Any = type(method)
            inner: Any = method.__func__
            return kind(decorate(inner))  # type: ignore[no-any-return]
        if not callable(func):
            raise TypeError(
                f"offloop.threaded decorates a function, but got {describe(func)}. Put "
                f"@offloop.threaded (or @offloop.threaded(pool=...)) above a 'def'; for a "
                f"single call use 'await offloop.to_thread(fn, *args)'."
            )
        check_sync_callable(func, "offloop.threaded", "offloop.to_loop()")

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
            if _get_running_loop() is None:
                name = getattr(func, "__name__", "fn")
                raise RuntimeError(
                    f"{describe(func)} is decorated with @offloop.threaded, so calling it "
                    f"returns an awaitable that runs it in a worker thread, and it was called "
                    f"with no event loop running in this thread. Call it from a coroutine "
                    f"('await {name}(...)'); in sync code call the undecorated function, "
                    f"{name}.__wrapped__(...)."
                )
            return (pool or default_thread_pool()).run(func, *args, **kwargs)

        # Calling it returns an awaitable: frameworks that check must await it.
        return mark_coroutine_function(wrapper)

    if fn is None:
        return decorate
    return decorate(fn)


#: The stop token's reason when the consumer closed the iterator.
_CLOSED: Final = "iterator closed"

# What the producer thread hands to the loop.
_ITEM: Final = 0
_END: Final = 1
_ERROR: Final = 2


class _Shared(Generic[T]):
    """State shared by the consumer and the producer thread.

    The producer holds only this, never the public iterator, so dropping the
    iterator (``break`` out of ``async for``) lets its ``__del__`` stop the
    producer even though the producer is still running.
    """

    def __init__(self, iterable: Iterable[T], buffer: int) -> None:
        self.iterable = iterable
        self.space = Room(buffer)
        self.stop = False
        self.items: deque[tuple[int, Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.finished = False
        # Finished because its loop ended, with the source not exhausted.
        self.loop_ended = False
        # The producer's call has ended (producer_done ran), and who waits for that.
        self.ended = False
        self.on_end: asyncio.Future[None] | None = None
        # Its loop's watch, held so that the watch lives while this iterator does.
        self.watch: _LoopWatch | None = None
        self.token: StopToken | None = None
        # Set by aclose(), which then raises a failure of the source's close();
        # without it (the iterator was dropped), producer_done() logs it.
        self.close_awaited = False

    def request_stop(self) -> None:
        if not self.stop:
            self.stop = True
            self.space.give()  # wake the producer if it waits for room
            token = self.token
            if token is not None:
                token.set(_CLOSED)  # and a source that polls its token

    def end_with_loop(self) -> None:
        """The consumer's loop has ended: nobody can take an item any more."""
        if not self.finished:
            self.loop_ended = self.finished = True
        self.request_stop()

    def producer(self) -> Callable[[], None]:
        """The function the worker runs, named after the source for logs and messages."""

        def produce() -> None:
            self.produce()

        source = self.iterable
        name = getattr(source, "__qualname__", None) or type(source).__name__
        produce.__qualname__ = produce.__name__ = f"{name} (iterated by offloop.iterate())"
        return produce

    def produce(self) -> None:
        loop = self.loop
        assert loop is not None
        post = loop.call_soon_threadsafe
        token = self.token = current_token()
        token.add_callback(lambda _: self.request_stop())
        iterator = None
        space = self.space
        try:
            iterator = iter(self.iterable)
            while True:
                while not space.take(LOOP_CHECK):
                    if loop.is_closed():
                        # Its loop was closed with the iterator still referenced
                        # and nothing told this producer (see LOOP_CHECK):
                        # nobody can take an item.
                        self.end_with_loop()
                        break
                if self.stop:
                    if not self.finished:  # not the consumer's doing: its pool is closing
                        post(
                            self.deliver,
                            _ERROR,
                            _stopped_early(f"its stop token was set: {token.reason!r}"),
                        )
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    post(self.deliver, _END, None)
                    return
                post(self.deliver, _ITEM, item)
                del item
        except BaseException as exc:  # handed to the consumer, like an item
            with contextlib.suppress(RuntimeError):  # loop closed: nobody to tell
                post(self.deliver, _ERROR, exc)
        finally:
            # Runs the generator's own ``finally`` here, in the thread that ran it.
            close = getattr(iterator, "close", None)
            if close is not None:
                if token.reason == _CLOSED:
                    # The consumer closed the iterator and waits for this
                    # cleanup, which may need the loop (from_thread): give it a
                    # token that only the pool closing or the wait's
                    # cancellation sets, not the close that asked for it.
                    call = thread_state.call
                    if isinstance(call, OffloadFuture):
                        call._token = StopToken()
                close()

    def deliver(self, kind: int, value: Any) -> None:
        self.items.append((kind, value))
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def producer_done(self, fut: OffloadFuture[None]) -> None:
        self.ended = True
        if self.on_end is not None and not self.on_end.done():
            self.on_end.set_result(None)
        # The producer reports the end itself; this covers what it could not:
        # the pool closing before it started, or its call being cancelled.
        if fut.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = fut.exception()
        if exc is not None and not self.finished:
            if isinstance(exc, PoolClosedError | asyncio.CancelledError):
                exc = _stopped_early(type(exc).__name__)
            self.deliver(_ERROR, exc)
        elif not self.finished:
            self.deliver(_END, None)
        elif (
            exc is not None
            and not self.close_awaited
            and not isinstance(exc, PoolClosedError | asyncio.CancelledError)
        ):
            logger.error(
                "offloop.iterate(): closing the source %r raised", self.iterable, exc_info=exc
            )


class _LoopWatch:
    """The iterators producing for one loop, stopped by that loop's end.

    Its async generator never resumes: started once on the loop, the loop
    knows it (PEP 525's first-iteration hook), and the loop's shutdown of its
    async generators (``loop.shutdown_asyncgens()``, which ``asyncio.run``,
    ``asyncio.Runner`` and uvloop's run before closing the loop) closes it.
    Its ``finally`` then stops every producer still running for the loop, and
    waits a little for them: an iterator kept referenced (a global) after its
    loop ended would otherwise hold its producer, and its thread, until it is
    collected. One per loop, not per iterator: an async generator of its own
    would cost each iterator several microseconds on the loop.

    Not every loop ends with that shutdown: ``run_until_complete()`` then
    ``close()`` skips it, and a loop that ran it may run on and get more
    iterators (a closed watch does nothing for them, and a new async
    generator would get asyncio's ResourceWarning). So the watch also has a
    :class:`~offloop._core.loopclose.LoopCloseHook`: the loop's ``close()``
    stops the producers the shutdown did not, whatever they wait for.

    Each iterator's shared state holds its watch strongly and the watch holds
    them weakly: the watch lives as long as one of its iterators does.
    """

    __slots__ = ("at_close", "gen", "live", "loop_ref")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the per-thread cache keeps the last watch after the loop closed.
        self.loop_ref = weakref.ref(loop)
        self.live: weakref.WeakSet[_Shared[Any]] = weakref.WeakSet()
        # Weak, as the loop's close() must drop the last reference to the
        # callback; held only to cancel it if this watch goes first.
        self.at_close = LoopCloseHook(loop, functools.partial(_end_with_loop, self.live))
        self.gen = _stop_at_shutdown(self.live)
        # Up to its yield, here on the loop's thread, so that the loop's
        # first-iteration hook records it for shutdown_asyncgens(). Without
        # the loop's finalizer hook: the generator would keep it, a bound
        # method of the loop, and so the loop alive as long as this watch
        # (the per-thread cache keeps it after the loop closed). __del__
        # closes the generator itself, so it needs no finalizer.
        firstiter, finalizer = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(firstiter, None)
        try:
            with contextlib.suppress(StopIteration):
                self.gen.asend(None).send(None)
        finally:
            sys.set_asyncgen_hooks(firstiter, finalizer)

    def __del__(self) -> None:
        # No iterator uses it any more (each holds it), so nothing is left to
        # stop: closed here, synchronously, rather than by the loop's finalizer
        # hook, which would run it as a task on the loop (or fail, once closed).
        # Not contextlib.suppress: this may run while the interpreter tears
        # modules down, when the module global may be gone already.
        try:  # noqa: SIM105
            self.gen.aclose().send(None)
        except (StopIteration, RuntimeError):
            pass
        # The loop may run on (this thread moved to another loop): no
        # producer is left for its close to stop.
        self.at_close.cancel()


def _end_with_loop(live: weakref.WeakSet[_Shared[Any]]) -> None:
    # The loop's close() ran (_core/loopclose.py): stop the producers still
    # running for it, as the shutdown of its async generators would have,
    # without waiting for them (close() cannot).
    for shared in list(live):
        if not shared.finished:  # closed by its consumer or the shutdown already
            shared.end_with_loop()


async def _stop_at_shutdown(live: weakref.WeakSet[_Shared[Any]]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        waits = []
        for shared in list(live):
            if shared.finished:
                continue  # closed by its consumer already
            shared.end_with_loop()
            if not shared.ended:
                shared.on_end = asyncio.get_running_loop().create_future()
                waits.append(shared.on_end)
        if waits:
            # The shutdown waits for the sources' close, as aclose() does, but
            # bounded: a source stuck in next() must not hold up the program's
            # exit. Without the wait, a program that exits just after
            # asyncio.run() would find the producers not yet ended.
            await asyncio.wait(waits, timeout=SHUTDOWN_WAIT)


class _Watches(threading.local):
    # Per thread, as offload.channel_for does: a thread runs one loop at a
    # time, and a thread-local read is cheaper than a lookup keyed by the loop.
    watch: _LoopWatch | None = None


_watches: Final = _Watches()


def _watch_for(loop: asyncio.AbstractEventLoop) -> _LoopWatch:
    watch = _watches.watch
    if watch is None or watch.loop_ref() is not loop:
        watch = _watches.watch = _LoopWatch(loop)
    return watch


def _stopped_early(why: str) -> PoolClosedError:
    return PoolClosedError(
        f"The thread producing items for offloop.iterate() stopped before the source was "
        f"exhausted ({why}); create a new iterator, on an open pool."
    )


@final
class ThreadedIterator(AsyncIterator[T]):
    """The async iterator returned by :func:`iterate`.

    Use it with ``async for``; ``aclose()`` (or ``async with``) stops the
    producer thread and waits until the source's ``finally`` has run.
    """

    def __init__(self, iterable: Iterable[T], buffer: int, pool: ThreadPool | None) -> None:
        self._shared: _Shared[T] = _Shared(iterable, buffer)
        self._pool = pool
        self._producer: OffloadFuture[None] | None = None

    def __aiter__(self) -> ThreadedIterator[T]:
        return self

    async def __anext__(self) -> T:
        shared = self._shared
        if shared.finished:
            if shared.loop_ended:
                raise RuntimeError(
                    f"{self!r} was closed when the event loop it ran on ended, before its "
                    f"source was exhausted (the source was closed, its thread freed). An "
                    f"iterator belongs to the loop of its first item: create a new "
                    f"offloop.iterate() on this loop."
                )
            raise StopAsyncIteration
        if self._producer is None:
            shared.loop = asyncio.get_running_loop()
            self._producer = (self._pool or default_thread_pool()).run(shared.producer())
            self._producer.add_done_callback(shared.producer_done)
            watch = shared.watch = _watch_for(shared.loop)
            watch.live.add(shared)
        while not shared.items:
            if self._shared.finished:
                raise StopAsyncIteration
            if shared.waiter is not None:
                raise RuntimeError(
                    f"{self!r} is already awaited by another task: two tasks cannot take "
                    f"items from one iterator at once. Give each task its own "
                    f"offloop.iterate(), or hand items out through an asyncio.Queue."
                )
            waiter = shared.waiter = shared.loop.create_future()  # type: ignore[union-attr]
            try:
                await waiter
            except asyncio.CancelledError:
                shared.request_stop()
                self._shared.finished = True
                raise
            finally:
                shared.waiter = None
        kind, value = shared.items.popleft()
        if kind == _ITEM:
            shared.space.give()
            return value  # type: ignore[no-any-return]
        self._shared.finished = True
        shared.request_stop()
        if kind == _END:
            raise StopAsyncIteration
        raise crossable(value, f"offloop.iterate()'s source {describe(shared.iterable)}")

    async def aclose(self) -> None:
        """Stop the producer and wait until the source's ``finally`` has run.

        An exception raised while closing the source (in a generator's
        ``finally``) is raised here, as ``generator.close()`` would raise it.
        """
        shared = self._shared
        shared.finished = True
        shared.request_stop()
        waiter = shared.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # a task waiting for the next item ends its iteration
        producer = self._producer
        if producer is None or shared.close_awaited:
            return
        shared.close_awaited = True
        if not producer.done():
            await asyncio.shield(producer)
        elif not producer.cancelled():
            error = producer.exception()
            # A pool that closed under the producer gave up on it: the source's
            # finally did not raise, and __anext__ has already said so.
            if error is not None and not isinstance(error, PoolClosedError):
                raise error

    async def __aenter__(self) -> ThreadedIterator[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # ``break`` out of ``async for`` drops the iterator: stop the producer
        # (it closes the source in its own thread, no loop needed).
        shared = getattr(self, "_shared", None)
        if shared is not None:
            shared.finished = True  # nobody reads items any more
            shared.request_stop()

    def __repr__(self) -> str:
        state = (
            "finished" if self._shared.finished else "running" if self._producer else "not started"
        )
        return f"<ThreadedIterator {state}, {len(self._shared.items)} buffered>"


def iterate(
    iterable: Iterable[T], *, buffer: int = DEFAULT_BUFFER, pool: ThreadPool | None = None
) -> ThreadedIterator[T]:
    """Iterate a blocking iterable or generator from async code.

    A worker thread pulls items and runs at most ``buffer`` items ahead of the
    consumer (backpressure)::

        async for line in offloop.iterate(open("big.log")):
            await handle(line)

    Breaking out of the loop, cancelling the consuming task or calling
    ``aclose()`` stops the producer, closes a generator source (its
    ``finally`` runs, in the worker) and frees the worker. Exceptions raised
    by the source propagate to the consumer. An iterator still referenced
    when its event loop ends is closed the same way: by the loop's shutdown
    of its async generators (``asyncio.run``, ``asyncio.Runner``, uvloop),
    which waits up to a second for the source's ``finally``; or, for a loop
    closed without that shutdown (or run again after it), by the loop's
    ``close()``, which does not wait. Taking an item from it after that
    raises ``RuntimeError``.

    Raises:
        TypeError: ``iterable`` is not iterable, or ``buffer`` is not an int.
        ValueError: ``buffer`` is less than 1.
    """
    check_positive_int(buffer, "offloop.iterate(buffer=...)", allow_none=False)
    source: object = iterable  # checked at run time whatever the annotation says
    # What iter() takes: __iter__, or the sequence protocol's __getitem__
    # (which a dict's is not). Not iter() itself: it may block (the worker calls it).
    sequence = hasattr(type(source), "__getitem__") and not isinstance(source, dict)
    if not (isinstance(source, Iterable) or sequence):
        if hasattr(source, "__aiter__"):
            raise TypeError(
                f"offloop.iterate() takes a sync iterable, but got the async iterable "
                f"{describe(iterable)}: use 'async for' on it directly."
            )
        raise TypeError(f"offloop.iterate() needs an iterable, got {describe(iterable)}.")
    if pool is not None and not isinstance(pool, ThreadPool):
        raise TypeError(f"offloop.iterate(pool=...) needs a ThreadPool, got {describe(pool)}.")
    return ThreadedIterator(iterable, buffer, pool)

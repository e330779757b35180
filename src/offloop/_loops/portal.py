"""``Portal``: every crossing from sync code into one event loop, and ``from_thread_sync``.

A Portal names a target (a :class:`LoopThread`, a bare event loop, or, by
default, wherever ``from_thread`` would run from the calling thread) and an
optional ``timeout``; its methods are the crossings: a coroutine or a sync
function, blocking or as a ``concurrent.futures.Future``, a long-lived task,
an async context manager, an async iterator. Blocking sync-function calls
reuse ``crossing.Reply`` (a pre-acquired lock the loop releases), the same
path as ``from_thread``; the task-shaped crossings use ``tasks.TaskHandle``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, ParamSpec, TypeVar, final

from .._core.token import StopToken, thread_state
from .._core.validate import (
    check_async_callable,
    check_sync_callable,
    describe,
)
from .context import BoundContext
from .crossing import (
    TOKEN_SET,
    CallHost,
    Reply,
    refuse_on_running_loop,
    refuse_own_idle_loop,
    refuse_when_stopped,
    start_sync,
    wait_reply,
)
from .loopthread import LoopThread
from .shared import SharedLoopThread
from .stream import END, Stream, close, next_item
from .target import from_thread_target, schedule
from .tasks import TaskHandle, check_timeout

__all__ = ["Portal", "from_thread_sync"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_INSTEAD: Final = "In async code await it directly, or use portal.submit() and don't wait."


@final
class Portal:
    """Crossings from sync code into one event loop, each with offloop's guarantees.

    ``target`` is a :class:`LoopThread`, a running event loop (e.g. the
    host's, from ``asyncio.get_running_loop()``), or ``None``: the loop
    :func:`from_thread` would use from the calling thread, decided at each
    call (in a worker of an offloop pool, the loop that sent it the work;
    elsewhere the loop chosen with :func:`set_from_thread_loop`, by default
    the shared ``offloop-shared-loop`` thread)::

        portal = offloop.Portal(timeout=5)
        portal.call_sync(event.set)              # a sync function on the loop's thread
        value = portal.call(fetch, url)          # a coroutine, TimeoutError after 5 s
        future = portal.submit(fetch, url)       # a concurrent.futures.Future, no blocking
        handle = portal.start_task(serve, port)  # a long-lived task; handle.ready()
        with portal.context(aiohttp.ClientSession) as session: ...
        for item in portal.iterate(stream, topic): ...

    Every crossing copies the caller's context variables, brings exceptions
    back with their traceback, and cancels the remote work when the caller
    stops waiting (timeout, a worker's stop token). A blocking crossing on a
    thread whose event loop is running raises :class:`WouldDeadlockError`.

    Args:
        target: where the crossings run (see above).
        timeout: seconds each blocking crossing may take; past it, the remote
            work is cancelled and ``TimeoutError`` raised. ``None``: no limit.

    Raises:
        TypeError, ValueError: ``target`` or ``timeout`` is not valid.
    """

    __slots__ = ("_target", "_timeout")

    def __init__(
        self,
        target: LoopThread | asyncio.AbstractEventLoop | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        if target is not None and not isinstance(target, (LoopThread, asyncio.AbstractEventLoop)):
            raise TypeError(
                f"Portal(target=...) must be a LoopThread, an event loop or None, got "
                f"{describe(target)}."
            )
        self._target = target
        self._timeout = check_timeout(timeout, "Portal(timeout=...)")

    @property
    def timeout(self) -> float | None:
        """Seconds each blocking crossing may take (``None``: no limit)."""
        return self._timeout

    def __repr__(self) -> str:
        target = "from_thread's loop" if self._target is None else repr(self._target)
        return f"<Portal to {target}, timeout={self._timeout}>"

    # -- blocking crossings --------------------------------------------------

    def call(self, async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the coroutine ``async_fn(*args, **kwargs)`` on the target loop; block for it.

        Like :func:`from_thread` (or :meth:`LoopThread.call`) with this
        portal's target and timeout.

        Raises:
            TimeoutError: it took longer than the portal's timeout (it was cancelled).
            WouldDeadlockError: called on a thread whose event loop is running,
                or for this thread's own loop while it is not running.
            CallerGoneError: this worker's stop token was set, or the coroutine
                was cancelled on its loop by something else.
            PoolClosedError: the target is closed.
            TypeError: ``async_fn`` is not a coroutine function.
        """
        where = "Portal.call()"
        refuse_on_running_loop(where, _INSTEAD)
        check_async_callable(async_fn, where)
        return self._call(where, async_fn, async_fn, *args, **kwargs)

    def _call(
        self,
        where: str,
        named: Callable[..., Any],
        async_fn: Callable[P, Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        # ``named`` is the function errors name: the user's, not a helper of ours.
        host, loop, token = self._resolve()
        refuse_when_stopped(token, where, named)
        ctx = contextvars.copy_context()
        if host is not None:
            reply = host._send_sync(async_fn, args, kwargs, ctx)
        else:
            refuse_own_idle_loop(loop, where)
            call = thread_state.call
            reply = Reply(loop, None, worker=call is not None and call.loop is loop)
            schedule(loop, start_sync, reply, async_fn, args, kwargs, ctx=ctx)
        return wait_reply(reply, token, where, named, self._timeout)  # type: ignore[no-any-return]

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the sync function ``fn(*args, **kwargs)`` on the target loop's thread; block for it.

        For what must happen on the loop's thread: set an ``asyncio.Event``,
        put into an ``asyncio.Queue``, change state that the loop's tasks own.
        ``fn`` runs between two steps of the loop, so it must be quick: a
        blocking ``fn`` stalls the loop (use ``to_thread`` for those).

        Raises:
            TimeoutError: the loop did not get to it within the portal's
                timeout; it will not run.
            WouldDeadlockError: called on a thread whose event loop is running,
                or for this thread's own loop while it is not running.
            CallerGoneError: this worker's stop token was set before ``fn`` ran.
            PoolClosedError: the target is closed.
            TypeError: ``fn`` is a coroutine function or not callable.
        """
        where = "Portal.call_sync()"
        refuse_on_running_loop(where, "Call the function directly: you are on a loop's thread.")
        _check_sync(fn, where, "portal.call()")
        return _call_sync(self._resolve(), fn, args, kwargs, where, self._timeout)

    # -- crossings that return at once --------------------------------------

    def start_task(
        self, async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandle[R]:
        """Start ``async_fn(*args, **kwargs)`` as a task on the target loop; return its handle.

        Returns at once. The task runs until it ends, is cancelled
        (``handle.cancel()``) or its loop closes. Inside it,
        :func:`task_ready` tells ``handle.ready()`` that it is ready, with a
        value (a port, a client). Started from a worker of an offloop pool,
        it is cancelled when the worker's stop token is set.

        Raises:
            PoolClosedError: the target is closed.
            CallerGoneError: this worker's stop token is set already.
            TypeError: ``async_fn`` is not a coroutine function.
        """
        return self._start_task("Portal.start_task()", async_fn, args, kwargs)

    def _start_task(
        self,
        where: str,
        async_fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskHandle[R]:
        check_async_callable(async_fn, where)
        host, loop, token = self._resolve()
        refuse_when_stopped(token, where, async_fn)
        ctx = contextvars.copy_context()
        handle = TaskHandle(loop, host, async_fn, token)
        try:
            if host is not None:
                host._submit(handle._start, args, kwargs, ctx)
            else:
                schedule(loop, handle._start, args, kwargs, ctx=ctx)
        except BaseException:
            # Refused (the target closed): nothing will settle the handle, so
            # the worker's token must not keep it until the token is set.
            if token is not None:
                token.remove_callback(handle._on_token)
            raise
        return handle

    def submit(
        self, async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> cf.Future[R]:
        """Start ``async_fn(*args, **kwargs)`` on the target loop; return its future at once.

        The future is a ``concurrent.futures.Future``.

        The non-blocking form of :meth:`call`, usable anywhere, also on the
        target loop's own thread. Cancelling the future cancels the task;
        the task cancelled on its loop cancels the future.

        Raises:
            PoolClosedError: the target is closed.
            TypeError: ``async_fn`` is not a coroutine function.
        """
        return self._start_task("Portal.submit()", async_fn, args, kwargs).future

    def context(
        self,
        factory: Callable[P, AbstractAsyncContextManager[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> BoundContext[T]:
        """An async context manager, made and entered on the target loop, used from sync code.

        ``factory(*args, **kwargs)`` (``aiohttp.ClientSession``, an
        ``@asynccontextmanager`` function) is called on the loop when the
        context is entered::

            with portal.context(aiohttp.ClientSession) as session:
                portal.call(fetch, session, url)

        or, for an object that lives as long as the loop::

            session = portal.context(aiohttp.ClientSession).enter()

        Its ``__aexit__`` runs on the loop when the ``with`` block ends (or
        ``.exit()`` is called), and at the latest when the loop thread closes
        (for the shared loop: at interpreter exit).
        """
        check_sync_callable(factory, "Portal.context()", "Portal.context(factory)")
        return BoundContext(self.start_task, self._timeout, factory, args, kwargs)

    def iterate(
        self, fn: Callable[P, AsyncIterator[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Generator[T, None, None]:
        """Consume the async iterator ``fn(*args, **kwargs)`` from sync code.

        The mirror of :func:`offloop.iterate`: ``fn`` (an async generator
        function) is called on the target loop and each item is fetched with
        one blocking crossing (under the portal's timeout each)::

            for price in offloop.Portal().iterate(ticker, "EUR"):
                if price > limit:
                    break                  # the async generator is closed here

        The generator runs in one task on its loop, as under ``async for``:
        what it binds to its task or context across a ``yield`` (an
        ``asyncio.timeout``, a context variable it sets) holds for the next
        item. The task is named ``offloop-iterate-<fn's name>``.

        Closing, and errors of the generator's cleanup (its ``finally``):

        - Leaving the ``for`` loop early (``break``, an exception, ``close()``)
          closes the generator on its loop (``aclose()``) and waits for that,
          under the portal's timeout (past it the cleanup is cancelled and
          ``TimeoutError`` raised). An error of the cleanup is raised by the
          close; for a generator dropped mid-way Python reports it as ignored,
          so wrap the loop in ``contextlib.closing`` to receive it.
        - A stop while an item is fetched (the timeout, Ctrl-C, this worker's
          stop token) cancels the generator where it waits, as a cancelled
          ``async for`` does, and raises that stop (``TimeoutError``,
          ``KeyboardInterrupt``, :class:`CallerGoneError`). Except after the
          token, the stop first waits for the cleanup, up to the portal's
          timeout again (no timeout: until it ends); an error of the cleanup
          is then raised in its place, the stop as its ``__context__``, as
          under ``async for``. A cleanup that takes longer goes on on its loop.
        - A set stop token refuses the next item, but not the close: closing
          is cleanup, not the worker's work, so it is posted without waiting,
          as it is for a generator dropped on an event loop's thread.
        - An error of a cleanup nobody waits for any more (posted without
          waiting, or outlasting the wait) is logged on the ``offloop``
          logger, naming ``fn``.

        The loop's own close also closes a generator abandoned mid-way.

        Raises:
            TypeError: ``fn`` is not callable, or did not return an async iterator.
            WouldDeadlockError: iterated on a thread whose event loop is running.
            TimeoutError: an item, or the close, took longer than the portal's timeout.
            CallerGoneError: this worker's stop token was set, or the generator's
                task was cancelled on its loop.
            PoolClosedError: the target is closed.
        """
        if not callable(fn):
            raise TypeError(
                f"Portal.iterate() takes an async generator function (or a function returning "
                f"an async iterator), got {describe(fn)}."
            )
        return self._iterate(fn, args, kwargs)

    # -- internals ----------------------------------------------------------

    def _iterate(
        self, fn: Callable[..., AsyncIterator[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Generator[T, None, None]:
        # Checked here, at the first item: the generator may be made on a loop's
        # thread and consumed in a worker.
        refuse_on_running_loop(
            "Portal.iterate()",
            "In async code iterate it directly: 'async for item in fn(...)'.",
            why="Each item blocks until the async iterator yields it, which would deadlock "
            "the loop that has to run it (or stall every other task on it).",
        )
        # Resolved once: every item of one iteration comes from the loop its
        # generator lives on.
        host, loop, token = self._resolve()
        timeout = self._timeout
        stream = Stream(fn, args, kwargs, host, loop)
        ended = stopped = False
        try:
            while True:
                try:
                    item = next_item(stream, token, timeout)
                except BaseException:
                    stopped = True
                    raise
                if item is END:
                    ended = True  # the task closed the iterator and ends
                    return
                yield item
        finally:
            if not ended:
                close(stream, token, timeout, stopped=stopped)

    def _resolve(self) -> tuple[LoopThread | None, asyncio.AbstractEventLoop, StopToken | None]:
        # (host, loop, token): host is the LoopThread to submit through, if any.
        call = thread_state.call
        token = call.token if call is not None else None
        target: LoopThread | asyncio.AbstractEventLoop | SharedLoopThread | None = self._target
        if target is None:
            if call is not None and call.loop is not None:
                return None, call.loop, token
            target = from_thread_target()
        if isinstance(target, SharedLoopThread):
            target = target.get()
        if isinstance(target, LoopThread):
            if target._loop is None:
                target.start()
            return target, target._loop, token  # type: ignore[return-value]
        return None, target, token


def _check_sync(fn: Any, where: str, instead: str) -> None:
    # The shared check's message speaks of workers; here fn runs on a loop.
    try:
        check_sync_callable(fn, where, instead)
    except TypeError:
        if not callable(fn):
            raise
        raise TypeError(
            f"{where} runs a sync function on the loop's thread, but {describe(fn)} is a "
            f"coroutine or generator function: calling it there would only create the "
            f"coroutine or generator, not run it. For a coroutine function use {instead}."
        ) from None


def _call_sync(
    target: tuple[LoopThread | None, asyncio.AbstractEventLoop, StopToken | None],
    fn: Callable[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    where: str,
    timeout: float | None,
) -> R:
    host, loop, token = target
    refuse_when_stopped(token, where, fn)
    ctx = contextvars.copy_context()
    reply = _SyncReply(loop, host)
    if host is not None:
        host._submit(_start_call, reply, fn, args, kwargs, ctx)
    else:
        refuse_own_idle_loop(loop, where)
        schedule(loop, _start_call, reply, fn, args, kwargs, ctx=ctx)
    return wait_reply(reply, token, where, fn, timeout)  # type: ignore[no-any-return]


class _SyncReply(Reply):
    """A sync function's crossing: a stop is decided at once, not on the loop.

    The function runs whole in one callback, so there is no half-done work to
    cancel: whichever posts first, the function's outcome or the stop, wins.
    A busy loop then cannot keep a stopped caller waiting.
    """

    __slots__ = ()

    def on_token(self, token: StopToken) -> None:
        self.post(TOKEN_SET)


def _start_call(
    reply: Reply, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    # On the target loop, in the caller's copied context. A sync function runs
    # whole between two loop steps: a stop either comes first (the claim is
    # taken, it never runs) or finds its result posted.
    host: CallHost | None = reply.host
    if host is not None:
        host._call_finished()
    if reply.claim.locked():
        return
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        # The caller has it, SystemExit and KeyboardInterrupt included: they
        # are the caller's to handle, not a reason to stop this loop.
        reply.post((False, exc))
        del exc
    else:
        reply.post((True, value))


def from_thread_sync(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the sync function ``fn(*args, **kwargs)`` on the loop :func:`from_thread` uses; block.

    The sync twin of :func:`from_thread` (anyio's ``from_thread.run_sync``):
    in a worker of an offloop pool it runs on the loop that sent the work,
    elsewhere on the loop chosen with :func:`set_from_thread_loop` (by
    default the shared ``offloop-shared-loop`` thread). For what must happen
    on the loop's thread: ``event.set()``, ``queue.put_nowait(item)``,
    ``future.set_result(value)``. ``fn`` must be quick: it runs between two
    steps of the loop. Context variables are copied; its exception is raised
    here with its traceback.

    Raises:
        WouldDeadlockError: called on a thread whose event loop is running.
        CallerGoneError: this worker's stop token was set before ``fn`` ran.
        TypeError: ``fn`` is a coroutine function or not callable.
    """
    where = "offloop.from_thread_sync()"
    refuse_on_running_loop(where, "Call the function directly: you are on a loop's thread.")
    _check_sync(fn, where, "offloop.from_thread()")
    call = thread_state.call
    if call is not None and call.loop is not None:
        return _call_sync((None, call.loop, call.token), fn, args, kwargs, where, None)
    return _call_sync(_PLAIN._resolve(), fn, args, kwargs, where, None)


# Resolves, per call, the loop from_thread uses from a plain thread.
_PLAIN: Final = Portal()

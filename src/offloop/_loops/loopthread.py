"""Event loops in threads of their own: ``LoopThread``.

The crossings into them (how a coroutine is sent there and its outcome
brought back) live in ``crossing.py`` and ``remote.py``; the shared loop threads behind
``from_thread`` and ``to_loop`` in ``shared.py``.

The loop thread must not keep its LoopThread alive, or one dropped unclosed
would run, with its loop and executor, until the interpreter exits. So the
thread (``serve.serve``) holds it only weakly while the loop runs; a call in
flight holds it (its ``Reply`` or ``Remote``), so such calls finish first.
Collected unclosed, it runs ``serve.dropped`` (``weakref.finalize``) on
whichever thread dropped it, maybe the loop thread or one holding its lock:
that takes no lock, asks the loop to stop and warns (``ResourceWarning``);
the thread then shuts the loop down as ``close()`` does. Every other way the
loop stops (closing, retiring, a coroutine's SystemExit) detaches the
finalizer first, while the LoopThread is certainly alive.

The loop's default executor (``asyncio.to_thread``, ``run_in_executor(None,
...)``) is an offloop thread pool's Executor view, not a
``ThreadPoolExecutor``: interpreter exit joins the threads of every
``ThreadPoolExecutor``, so one stuck job there would keep the process alive,
while the pool's threads are daemons. This layer may not import the thread
pools, so offloop's package hands the maker in (:func:`use_default_executor`).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from time import monotonic
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar, final

from .._core.errors import PoolClosedError, WouldDeadlockError
from .._core.poolbase import complete_waiter
from .._core.poolexecutor import PoolExecutorView
from .._core.token import thread_state
from .._core.validate import (
    check_async_callable,
    check_close_timeout,
    check_thread_name,
    describe,
)
from .crossing import (
    Reply,
    refuse_on_running_loop,
    refuse_when_stopped,
    start_sync,
    wait_reply,
)
from .hotloop import new_loop
from .remote import Remote, start_async
from .serve import Serving, dropped, serve, stop_serving

__all__ = ["LoopThread", "LoopThreadState", "use_default_executor"]

P = ParamSpec("P")
R = TypeVar("R")

logger: Final = logging.getLogger("offloop")

_numbers: Final = iter(range(1, 1 << 62))

#: Makes a loop's default executor, given the name of the pool it runs in.
_executor_factory: Callable[[str], PoolExecutorView] | None = None


def use_default_executor(factory: Callable[[str], PoolExecutorView]) -> None:
    """Have loop threads started from now on use ``factory(pool_name)`` as their default executor.

    Called once by offloop's package as it is imported, before any loop thread
    can start (see the module docstring).
    """
    global _executor_factory
    _executor_factory = factory


class LoopThreadState(enum.Enum):
    """Lifecycle of a :class:`LoopThread`: CREATED -> RUNNING -> CLOSING -> CLOSED."""

    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


_CREATED: Final = LoopThreadState.CREATED
_RUNNING: Final = LoopThreadState.RUNNING
_CLOSING: Final = LoopThreadState.CLOSING
_CLOSED: Final = LoopThreadState.CLOSED


@final
class LoopThread:
    """A dedicated event loop running in a thread of its own.

    Coroutines sent there run beside the caller's loop instead of on it, so a
    coroutine that blocks (``time.sleep``, a sync driver, a framework that
    calls blocking code inside ``async def``) stalls only this thread::

        with offloop.LoopThread(name="legacy") as lt:
            lt.call(fetch, url)                 # from sync code: blocks for the result

        async with offloop.LoopThread() as lt:
            await lt.run(fetch, url)            # from another loop: awaits the result

    The thread starts on first use (or with :meth:`start`), is named
    ``offloop-loop-<name>``, and runs until :meth:`close` / :meth:`aclose`,
    which cancel what still runs there, shut down async generators, close the
    loop and join the thread. Context variables are copied into every call.
    A started LoopThread that is garbage collected unclosed warns
    (``ResourceWarning``) and stops its loop and thread the same way; a call
    in flight keeps it alive until that call is over.

    Args:
        name: used in the thread name and ``repr`` (default: a number).
        loop_factory: a zero-argument callable returning a new event loop,
            e.g. ``uvloop.new_event_loop``. The default is asyncio's loop (or
            the installed policy's), which after a wake-up from another
            thread polls for 50 us before it sleeps, so sequential calls from
            one thread rarely wait for a wake-up.

    Raises:
        TypeError: ``name`` is not a str or ``loop_factory`` is not callable.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        check_thread_name(name, "LoopThread")
        if loop_factory is not None and not callable(loop_factory):
            raise TypeError(
                f"LoopThread(loop_factory=...) must be a callable returning a new event loop "
                f"(e.g. uvloop.new_event_loop), got {describe(loop_factory)}."
            )
        self._name = name or str(next(_numbers))
        self._thread_name = f"offloop-loop-{self._name}"
        self._loop_factory = loop_factory
        self._state = _CREATED
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: PoolExecutorView | None = None
        self._thread: threading.Thread | None = None
        self._active = 0  # calls submitted and not finished; guarded by _lock
        self._last_used = monotonic()
        self._closed_waiters: list[asyncio.Future[None]] = []
        # Only shared loop threads retire by themselves after idling this long.
        self._idle_timeout: float | None = None
        self._retired = False
        # The task whose SystemExit or KeyboardInterrupt stopped the loop.
        self._exit_task: asyncio.Task[Any] | None = None
        # Stops the loop if this is collected while it runs (see serve.dropped).
        self._finalizer: weakref.finalize[..., LoopThread] | None = None
        # Whether the thread still runs the loop's run_forever() (see serve.stop_serving).
        self._serving = Serving()

    # -- public API ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The loop thread's name, as used in its thread's name."""
        return self._name

    @property
    def state(self) -> LoopThreadState:
        """Where the loop thread is in its lifecycle."""
        return self._state

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop (``None`` before the thread starts).

        Keep the LoopThread referenced while using its loop directly (e.g. with
        ``asyncio.run_coroutine_threadsafe``): one collected unclosed stops
        its loop and cancels what runs there.
        """
        return self._loop

    def start(self) -> LoopThread:
        """Create the loop and start its thread; returns ``self``. Starting twice is a no-op.

        Raises:
            PoolClosedError: the loop thread is closing or closed.
            TypeError: ``loop_factory`` returned something else than an event loop.
            ValueError: ``loop_factory`` returned a loop that is running or closed.
            Exception: whatever ``loop_factory`` raised.
        """
        with self._lock:
            if self._state is _RUNNING:
                return self
            if self._state is not _CREATED:
                raise PoolClosedError(
                    f"{self._describe()} cannot start because it is {self._state.value}; a "
                    f"LoopThread runs once, so create a new one."
                )
            factory = self._loop_factory or new_loop
            loop = factory()
            if not isinstance(loop, asyncio.AbstractEventLoop):
                raise TypeError(
                    f"LoopThread(loop_factory=...) must return an event loop, but "
                    f"{describe(factory)} returned {describe(loop)}."
                )
            if loop.is_running() or loop.is_closed():
                # Its thread could not run it, and its shutdown would cancel
                # the tasks of whoever runs it (asyncio.get_running_loop as the factory).
                raise ValueError(
                    f"LoopThread(loop_factory=...) must return a new event loop, but "
                    f"{describe(factory)} returned {loop!r}, which "
                    f"{'is running' if loop.is_running() else 'is closed'}. Pass a function "
                    f"that makes one, e.g. asyncio.new_event_loop or uvloop.new_event_loop."
                )
            # Its own default executor (see the module docstring), its pool
            # named after the thread, so that its threads are named
            # offloop-loop-<name>-executor-<n> and leak reports can tell whose they are.
            make_executor = _executor_factory
            assert make_executor is not None, "offloop's package sets it as it is imported"
            executor = make_executor(f"{self._thread_name.removeprefix('offloop-')}-executor")
            loop.set_default_executor(executor)
            # The thread gets no strong reference to self: see the module docstring.
            serving = self._serving
            thread = threading.Thread(
                target=serve,
                args=(weakref.ref(self), loop, executor, serving),
                name=self._thread_name,
                daemon=True,
            )
            self._loop = loop
            self._executor = executor
            self._thread = thread
            self._state = _RUNNING
            try:
                thread.start()
            except BaseException:
                self._state = _CLOSED
                loop.close()
                executor.shutdown(wait=False)
                raise
            _started.add(self)
            finalizer = weakref.finalize(
                self, dropped, loop, serving, self._name, self._thread_name, os.getpid()
            )
            # One still open at exit is a daemon thread that simply ends there.
            finalizer.atexit = False
            self._finalizer = finalizer
            if self._idle_timeout is not None:
                loop.call_soon_threadsafe(self._check_idle)
        return self

    def call(self, async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``async_fn(*args, **kwargs)`` on this loop from sync code; block for the result.

        Starts the thread if needed. Returns the coroutine's result or raises
        its exception. Called from an offloop worker thread whose awaiting task
        is cancelled, it cancels the coroutine and raises :class:`CallerGoneError`.

        Raises:
            WouldDeadlockError: called on a thread that runs an event loop
                (there, ``await lt.run(...)`` instead).
            PoolClosedError: the loop thread is closing or closed, or closed
                while the coroutine ran (the coroutine was cancelled).
            CallerGoneError: the coroutine was cancelled on the loop by
                something else than this caller (its ``__cause__`` is the
                ``CancelledError``), or this worker's stop token was set.
            TypeError: ``async_fn`` is not a coroutine function.
        """
        refuse_on_running_loop(
            f"{self._describe()}.call()", "In async code use 'await lt.run(async_fn, ...)'."
        )
        check_async_callable(async_fn, "LoopThread.call()")
        call = thread_state.call
        token = call.token if call is not None else None
        refuse_when_stopped(token, "LoopThread.call()", async_fn)
        reply = self._send_sync(async_fn, args, kwargs, contextvars.copy_context())
        return wait_reply(reply, token, "LoopThread.call()", async_fn)  # type: ignore[no-any-return]

    async def run(
        self, async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run ``async_fn(*args, **kwargs)`` on this loop and await the result from another loop.

        Cancelling the awaiting task cancels the remote task (and returns at
        once, even if the remote coroutine is blocked); the remote task's own
        exception or cancellation reaches the awaiter. Starts the thread if needed.

        Raises:
            PoolClosedError: the loop thread is closing or closed, or closed
                while the coroutine ran.
            TypeError: ``async_fn`` is not a coroutine function.
        """
        check_async_callable(async_fn, "LoopThread.run()")
        caller = asyncio.get_running_loop()
        if caller is self._loop:
            # Already on this loop: no crossing, but a task of its own, so the
            # coroutine runs in a copy of the context like every other crossing.
            return await asyncio.ensure_future(async_fn(*args, **kwargs))
        return await self._send(caller, async_fn, args, kwargs).receive()  # type: ignore[no-any-return]

    def close(self, *, timeout: float | None = None) -> None:
        """Stop the loop from sync code and join its thread.

        Tasks still running there are cancelled (their callers get
        :class:`PoolClosedError`), async generators are shut down and the loop
        is closed. A coroutine blocked in sync code ends only when it next
        awaits: with ``timeout``, give up after that many seconds and log the
        stuck thread (a daemon, so it never keeps the process alive). Closing
        twice is allowed.

        Raises:
            WouldDeadlockError: called on the loop thread itself, or on another
                running event loop's thread (there, ``await lt.aclose()`` instead).
        """
        timeout = check_close_timeout(timeout, "LoopThread.close")
        if self._thread is not None and self._thread is threading.current_thread():
            raise WouldDeadlockError(
                f"{self._describe()}.close() was called on the loop thread itself (from a "
                f"coroutine or callback running there). It waits for that thread to end, "
                f"which cannot happen while it waits. Close the loop thread from another "
                f"thread, or with 'await lt.aclose()' from another event loop."
            )
        refuse_on_running_loop(
            f"{self._describe()}.close()",
            "In async code use 'await lt.aclose()'.",
            why="It blocks until the loop thread has stopped, which would stall this loop.",
        )
        thread = self._begin_close()
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            self._report_stuck(timeout)

    async def aclose(self, *, timeout: float | None = None) -> None:
        """Like :meth:`close`, awaited from another event loop.

        Raises:
            WouldDeadlockError: awaited on this loop thread's own loop.
        """
        timeout = check_close_timeout(timeout, "LoopThread.aclose")
        caller = asyncio.get_running_loop()
        if caller is self._loop:
            raise WouldDeadlockError(
                f"{self._describe()}.aclose() was awaited on its own loop, which cannot wait "
                f"for itself to stop. Close it from another thread or loop."
            )
        waiter: asyncio.Future[None] = caller.create_future()
        with self._lock:
            # The thread takes the waiters under this lock as it ends, so one
            # registered while the state is not CLOSED is always woken.
            if self._state is not _CLOSED:
                self._closed_waiters.append(waiter)
        thread = self._begin_close()
        if thread is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except asyncio.TimeoutError:
                self._report_stuck(timeout)
                return
        with self._lock:
            if waiter in self._closed_waiters:  # closed before it ever started
                self._closed_waiters.remove(waiter)
        if self._thread is not None:
            self._thread.join()  # it has signalled its end: this takes microseconds

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> LoopThread:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return self._describe()

    # -- internals ----------------------------------------------------------

    def _describe(self) -> str:
        tasks = self._active
        loop = type(self._loop).__name__ if self._loop is not None else "no loop"
        return (
            f"<LoopThread {self._name!r} {self._state.value}: {tasks} "
            f"task{'' if tasks == 1 else 's'}, {loop}>"
        )

    def _cancel_error(self, coro: Coroutine[Any, Any, Any]) -> PoolClosedError | None:
        # A cancellation while closing is the close's doing: say so.
        if self._state is _RUNNING:
            return None
        return PoolClosedError(
            f"{self._describe()} was closed while {describe(coro)} ran there, so it was "
            f"cancelled. Close the loop thread only after its calls are done."
        )

    def _start_refused(self, async_fn: Callable[..., Any]) -> PoolClosedError | None:
        # On the loop thread, as a submitted call is about to start.
        if self._state is _RUNNING:
            return None
        return PoolClosedError(
            f"{self._describe()} began closing (close() was called, or a coroutine's "
            f"SystemExit or KeyboardInterrupt stopped its loop) before {describe(async_fn)} "
            f"started there, so it never ran. Send calls to a LoopThread that is running."
        )

    def _submit(self, start: Callable[..., None], *args: Any) -> None:
        # args ends with the context the start function runs in.
        with self._lock:
            state = self._state
            if state is _RUNNING:
                # A KeyboardInterrupt before or after the loop has the start:
                # the caller has it, so the call is withdrawn and uncounted, and
                # _begin (under this lock, so it sees that) never starts it.
                withdrawn = [False]
                self._active += 1
                try:
                    self._loop.call_soon_threadsafe(  # type: ignore[union-attr]
                        self._begin, withdrawn, start, args[:-1], context=args[-1]
                    )
                except BaseException:
                    withdrawn[0] = True
                    self._active -= 1
                    raise
                return
        raise PoolClosedError(
            f"{self._describe()} is {state.value} and takes no new calls; create a new "
            f"LoopThread (or use offloop.to_loop())."
        )

    def _begin(self, withdrawn: list[bool], start: Callable[..., None], args: Any) -> None:
        # On the loop thread: start a submitted call, unless _submit withdrew it.
        with self._lock:
            if withdrawn[0]:
                return
        start(*args)

    def _send_sync(
        self,
        async_fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: contextvars.Context,
    ) -> Reply:
        # Schedules a sync caller's call; raises PoolClosedError before anything ran.
        if self._state is _CREATED:
            self.start()
        reply = Reply(self._loop, self)  # type: ignore[arg-type]
        self._submit(start_sync, reply, async_fn, args, kwargs, ctx)
        return reply

    def _send(
        self,
        caller: asyncio.AbstractEventLoop,
        async_fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Remote:
        # Schedules the call; raises PoolClosedError before anything ran.
        if self._state is _CREATED:
            self.start()
        remote = Remote(caller, self._loop, self)  # type: ignore[arg-type]
        self._submit(start_async, remote, async_fn, args, kwargs, contextvars.copy_context())
        return remote

    def _call_finished(self) -> None:
        # On the loop thread, once per submitted call.
        with self._lock:
            self._active -= 1
            self._last_used = monotonic()

    def _exiting(self, task: asyncio.Task[Any] | None) -> None:
        # On the loop thread, just before the exception stops the loop.
        self._exit_task = task
        self._detach()

    def _detach(self) -> None:
        # The loop is stopping for a reason of its own: dropping self now is no leak.
        if self._finalizer is not None:
            self._finalizer.detach()

    def _begin_close(self) -> threading.Thread | None:
        with self._lock:
            state = self._state
            if state is _CREATED:
                self._state = _CLOSED
                return None
            if state is _CLOSED:
                return None
            thread = self._thread
            if state is _RUNNING:
                self._state = _CLOSING
                self._detach()
                loop = self._loop
                assert loop is not None
                # Not loop.stop(): see serve.stop_serving.
                loop.call_soon_threadsafe(stop_serving, loop, self._serving)
        current = threading.current_thread()
        if thread is current:
            raise WouldDeadlockError(
                f"{self._describe()} was closed from its own thread, which cannot wait for "
                f"itself to stop. Close it from another thread."
            )
        # Closing shuts the loop's default executor down, which waits for this call.
        executor = self._executor
        if executor is not None and executor._own_call():
            raise WouldDeadlockError(
                f"{self._describe()} was closed from a thread of its own loop's default "
                f"executor (run_in_executor(None, ...)), which the close waits for. It is "
                f"closing now; close it from another thread to wait for the end."
            )
        return thread

    def _check_idle(self) -> None:
        # Shared loop threads only: retire after idling, started again on next use.
        loop = self._loop
        timeout = self._idle_timeout
        assert loop is not None
        assert timeout is not None
        with self._lock:
            if self._state is not _RUNNING:
                return
            if self._active == 0 and monotonic() - self._last_used >= timeout:
                self._state = _CLOSING
                self._retired = True
                self._detach()
                loop.stop()
                return
        loop.call_later(timeout / 4, self._check_idle)

    def _loop_stopped(self, exited: bool) -> None:
        # On the loop thread, once its loop stopped for any reason but a drop.
        self._detach()
        if exited:
            # A coroutine's SystemExit or KeyboardInterrupt, delivered to its
            # call: its task must not be logged as never retrieved.
            task, self._exit_task = self._exit_task, None
            if task is not None and task.done() and not task.cancelled():
                task.exception()
        # Also when a coroutine's SystemExit or KeyboardInterrupt ended the
        # loop: the calls still there must get their answer.
        with self._lock:
            if self._state is _RUNNING:
                self._state = _CLOSING

    def _loop_closed(self) -> None:
        # On the loop thread, as it ends.
        with self._lock:
            self._state = _CLOSED
            waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            complete_waiter(waiter)

    def _report_stuck(self, timeout: float | None) -> None:
        logger.warning(
            "offloop: %r did not stop within %s s: a coroutine there is blocked in sync code "
            "and cannot be cancelled until it awaits, or a job of its default executor "
            "(asyncio.to_thread, run_in_executor) has not returned. Its daemon thread %s was "
            "abandoned.",
            self,
            timeout,
            self._thread_name,
        )


# Started LoopThreads, closed in a child made by os.fork() (see _closed_in_child).
_started: Final[weakref.WeakSet[LoopThread]] = weakref.WeakSet()


def _closed_in_child() -> None:
    # Only the forking thread is copied into the child: a call sent to a copy
    # of a started LoopThread would wait forever for a loop nobody runs (and
    # wake the parent's loop through the self-pipe they share). Closed here,
    # the copies refuse calls with PoolClosedError instead.
    for lt in list(_started):
        lt._lock = threading.Lock()  # a parent's thread may have held it at the fork
        lt._state = _CLOSED
        lt._closed_waiters = []


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_closed_in_child)

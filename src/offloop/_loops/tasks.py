"""Long-lived tasks started from sync code on another thread's loop: ``TaskHandle``.

A :class:`TaskHandle` is both sides of one task: the loop side (``_start``
creates the task in the caller's copied context, ``_run`` settles two
``concurrent.futures.Future`` objects, readiness and outcome) and the sync
side (``ready()``, ``result()``, ``cancel()``), which any thread may use.
Portal's ``submit`` and ``context`` are built on it. The futures are left
PENDING until the task settles them (as ``run_coroutine_threadsafe`` does),
so ``future.cancel()`` works from any thread at any time; a cancelled future
cancels the task on its loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Generic, TypeVar, final

from .._core.errors import CallerGoneError
from .._core.token import StopToken, thread_state
from .._core.validate import check_seconds, describe
from .crossing import POLL_INTERVAL, CallHost, _coroutine, refuse_on_running_loop

__all__ = ["TaskHandle", "check_timeout", "task_ready"]

R = TypeVar("R")

# The handle of the task running in this context, for task_ready(). Set inside
# the task (so its context, a copy of the caller's, carries it); tasks it
# creates inherit it, so a helper task may signal readiness for it.
_current: Final[contextvars.ContextVar[TaskHandle[Any] | None]] = contextvars.ContextVar(
    "offloop_task_handle", default=None
)


# Every task started here until it ends. A loop holds its tasks only weakly:
# a task waiting on a future that only it references (BoundContext's exit
# request, once the caller kept the entered value and dropped the rest) would
# be garbage collected mid-wait ("Task was destroyed but it is pending").
# set.add and set.discard are atomic, so loops in several threads may share it.
_live: Final[set[asyncio.Task[None]]] = set()


def task_ready(value: Any = None) -> None:
    """Tell the thread that started this task (``Portal.start_task``) that it is ready.

    ``handle.ready()`` in the starting thread returns ``value``. Call it once
    the task can serve (its server listens, its connection is open); later
    calls are ignored.

    Raises:
        RuntimeError: not called inside a task started with ``Portal.start_task``.
    """
    handle = _current.get()
    if handle is None:
        raise RuntimeError(
            "offloop.task_ready() was called outside a task started with "
            "offloop.Portal().start_task(), so nobody waits for it. Call it from the "
            "coroutine function passed to start_task()."
        )
    _settle(handle._ready, True, value)


def check_timeout(timeout: object, name: str) -> float | None:
    """A crossing's ``timeout``: ``None`` (no limit) or seconds, at least 0."""
    return None if timeout is None else check_seconds(timeout, name, positive=False)


def _settle(future: cf.Future[Any], ok: bool, value: Any) -> None:
    # Loop side. A future cancelled from another thread meanwhile stays cancelled.
    if future.done() or not future.set_running_or_notify_cancel():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


@final
class TaskHandle(Generic[R]):
    """A task started on an event loop from sync code (``Portal.start_task``).

    The task runs until it returns, is cancelled, or its loop closes (closing
    a :class:`LoopThread` cancels it and waits for it). Any thread may wait
    for it or cancel it. A worker of an offloop pool that starts a task ties
    it to its call: when the worker's stop token is set (its awaiter was
    cancelled, its pool or service is stopping), the task is cancelled.
    """

    __slots__ = ("_fn", "_future", "_host", "_loop", "_ready", "_started", "_task", "_token")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: CallHost | None,
        async_fn: Callable[..., Awaitable[R]],
        token: StopToken | None,
    ) -> None:
        self._loop = loop
        self._host = host
        self._fn = async_fn
        self._token = token
        self._future: cf.Future[R] = cf.Future()
        self._ready: cf.Future[Any] = cf.Future()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._future.add_done_callback(self._on_done)
        if token is not None:
            token.add_callback(self._on_token)

    # -- the sync side ------------------------------------------------------

    @property
    def future(self) -> cf.Future[R]:
        """The task's outcome, a ``concurrent.futures.Future``; cancelling it cancels the task."""
        return self._future

    def done(self) -> bool:
        """Whether the task has ended (returned, raised or was cancelled)."""
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel the task on its loop, from any thread; ``False`` if it had already ended.

        Returns at once: the task's cleanup (``finally``, ``async with``
        exits) runs on its loop after this returns.
        """
        if self._future.done():
            return False
        return self._future.cancel()

    def ready(self, *, timeout: float | None = None) -> Any:
        """Block until the task calls :func:`task_ready` and return the value it passed.

        A task that ends before calling it: its exception is raised here, and
        a task that returned gives ``None``.

        Raises:
            TimeoutError: not ready within ``timeout`` seconds; the task is cancelled.
            concurrent.futures.CancelledError: the task was cancelled.
            CallerGoneError: this worker's stop token was set; the task is cancelled.
            WouldDeadlockError: called on a thread whose event loop is running.
        """
        timeout = check_timeout(timeout, "TaskHandle.ready(timeout=...)")
        return self._wait(self._ready, timeout, "TaskHandle.ready()")

    def result(self, *, timeout: float | None = None) -> R:
        """Block until the task ends; return its result or raise its exception.

        Raises:
            TimeoutError: it did not end within ``timeout`` seconds; the task is cancelled.
            concurrent.futures.CancelledError: the task was cancelled.
            PoolClosedError: its LoopThread closed while it ran.
            CallerGoneError: this worker's stop token was set; the task is cancelled.
            WouldDeadlockError: called on a thread whose event loop is running.
        """
        timeout = check_timeout(timeout, "TaskHandle.result(timeout=...)")
        return self._wait(self._future, timeout, "TaskHandle.result()")  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        if not self._future.done():
            state = "ready" if self._ready.done() else "starting"
        elif self._future.cancelled():
            state = "cancelled"
        else:
            state = "failed" if self._future.exception() is not None else "done"
        return f"<TaskHandle {describe(self._fn)} {state} on {self._loop!r}>"

    def _wait(self, future: cf.Future[Any], timeout: float | None, where: str) -> Any:
        refuse_on_running_loop(
            where,
            "In async code await the work directly (or asyncio.wrap_future(handle.future)).",
            why="It blocks until the task gets there, which would stall this loop.",
        )
        call = thread_state.call
        token = call.token if call is not None else None
        if token is not None:
            token.add_callback(self._on_token)
        try:
            waited = 0.0
            while not future.done():
                # In slices: a bare loop closed under the wait never settles the task.
                step = POLL_INTERVAL if timeout is None else min(POLL_INTERVAL, timeout - waited)
                if step <= 0:
                    break
                # Not cf.wait(): it misses a cancel() until the canceller notifies.
                with contextlib.suppress(cf.TimeoutError, cf.CancelledError):
                    future.exception(step)
                waited += step
                if self._loop.is_closed() and not future.done():
                    self._future.cancel()
            if not future.done():
                self.cancel()
                raise TimeoutError(
                    f"{where} of {describe(self._fn)} gave up after {timeout} s and cancelled "
                    f"the task. Give it a longer timeout, or none."
                )
            try:
                return future.result()
            except cf.CancelledError:
                if token is not None and token.is_set():
                    raise CallerGoneError(
                        f"{where} of {describe(self._fn)} was stopped, and the task cancelled, "
                        f"because this worker's stop token was set ({token.reason!r}). Return "
                        f"from the worker function."
                    ) from None
                raise
        finally:
            if token is not None:
                token.remove_callback(self._on_token)

    def _on_token(self, token: StopToken) -> None:
        self._future.cancel()

    def _on_done(self, future: cf.Future[R]) -> None:
        # Any thread. A cancelled future cancels the task (or keeps it from starting).
        if self._token is not None:
            self._token.remove_callback(self._on_token)
        if future.cancelled():
            # Tell cf.wait() and as_completed() waiters: cancel() alone does not.
            future.set_running_or_notify_cancel()
            self._ready.cancel()
            # A closed loop took the task with it.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._cancel_task)

    # -- the loop side ------------------------------------------------------

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # On the loop, in the caller's copied context. Counted by the host
        # until the task ends: _call_finished exactly once on every path.
        host = self._host
        if self._future.cancelled():
            if host is not None:
                host._call_finished()
            return
        try:
            refused = host._start_refused(self._fn) if host is not None else None
            if refused is not None:
                raise refused
            coro = _coroutine(self._fn, args, kwargs)
        except BaseException as exc:
            self._finish(False, exc)
            return
        try:
            self._task = task = self._loop.create_task(self._run(coro))
        except BaseException as exc:  # a task factory that raised
            coro.close()
            self._finish(False, exc)
            return
        _live.add(task)
        task.add_done_callback(lambda t: self._task_done(t, coro))

    def _task_done(self, task: asyncio.Task[None], coro: Coroutine[Any, Any, R]) -> None:
        _live.discard(task)
        # A task cancelled before its first step (its loop stopping in the turn
        # that made it, then shut down) never runs _run's body, the one place
        # that settles the outcome and the host's count: do both here, or the
        # future stays pending for good.
        if self._started or not task.cancelled():
            return
        coro.close()  # never awaited: no warning about it
        closing = self._host._cancel_error(coro) if self._host is not None else None
        self._finish(False, closing or asyncio.CancelledError())

    async def _run(self, coro: Coroutine[Any, Any, R]) -> None:
        self._started = True
        _current.set(self)
        try:
            value = await coro
        except asyncio.CancelledError as exc:
            closing = self._host._cancel_error(coro) if self._host is not None else None
            self._finish(False, closing or exc)
        except BaseException as exc:
            self._finish(False, exc)
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                # It stops the loop, as from any crossing; its caller has it
                # (the future), so the host marks the task's exception
                # retrieved: no "Task exception was never retrieved" log.
                if self._host is not None:
                    self._host._exiting(asyncio.current_task())
                raise
        else:
            self._finish(True, value)

    def _finish(self, ok: bool, value: Any) -> None:
        if self._host is not None:
            self._host._call_finished()
        if isinstance(value, asyncio.CancelledError):
            self._future.cancel()
            return
        # A task that ended before it said it was ready: its waiter gets its
        # exception, or None for a task that returned.
        _settle(self._ready, ok, value if not ok else None)
        _settle(self._future, ok, value)

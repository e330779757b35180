"""The shared loop threads behind ``from_thread`` and ``to_loop``, and ``block_on``.

Each :class:`SharedLoopThread` holds one process-wide :class:`LoopThread`,
started on first use, retired when idle and closed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, ParamSpec, TypeVar, final

from .._core.errors import CallerGoneError, PoolClosedError
from .._core.token import StopToken, thread_state
from .._core.validate import check_async_callable, describe
from .crossing import Reply, refuse_own_idle_loop, refuse_when_stopped, start_sync, wait_reply
from .loopthread import _RUNNING, LoopThread

__all__ = ["EXIT_TIMEOUT", "SHARED_IDLE_TIMEOUT", "SharedLoopThread", "block_on", "to_loop"]

P = ParamSpec("P")
R = TypeVar("R")


def block_on(
    target: SharedLoopThread | LoopThread | asyncio.AbstractEventLoop,
    token: StopToken | None,
    where: str,
    async_fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    """Run ``async_fn(*args, **kwargs)`` on ``target``'s loop; block for the outcome.

    With a ``token`` (the calling worker's), setting it stops the wait with
    :class:`CallerGoneError` and cancels the coroutine, unless the coroutine
    completed first; already set, the coroutine is not run at all.
    """
    refuse_when_stopped(token, where, async_fn)
    ctx = contextvars.copy_context()
    if isinstance(target, asyncio.AbstractEventLoop):
        refuse_own_idle_loop(target, where)
        call = thread_state.call
        reply = Reply(target, None, worker=call is not None and call.loop is target)
        try:
            target.call_soon_threadsafe(start_sync, reply, async_fn, args, kwargs, context=ctx)
        except RuntimeError:
            raise CallerGoneError(
                f"{where} cannot run {describe(async_fn)}: the event loop that sent this work "
                f"to the thread ({target!r}) is closed, so nobody is left to run the coroutine "
                f"or use its result. Return from the worker function."
            ) from None
    elif isinstance(target, LoopThread):
        reply = target._send_sync(async_fn, args, kwargs, ctx)
    else:
        while True:
            lt = target.get()
            try:
                reply = lt._send_sync(async_fn, args, kwargs, ctx)
            except PoolClosedError:
                if lt._retired:
                    continue  # it retired after idling; nothing was sent: take the next one
                raise
            break
    return wait_reply(reply, token, where, async_fn)  # type: ignore[no-any-return]


# -- shared loop threads -----------------------------------------------------


@final
class SharedLoopThread:
    """A process-wide loop thread, started on first use, maybe retired when idle.

    It counts the calls in flight (the loop thread's ``_active``); once none
    has run for ``idle_timeout`` seconds the thread stops by itself, and the
    next call starts a new one. Without one (``None``) it runs until closed.
    At interpreter exit it is closed with a bounded wait. Its thread is a
    daemon, so it never keeps the process alive.
    """

    def __init__(self, thread_name: str, idle_timeout: float | None) -> None:
        self.thread_name = thread_name
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._current: LoopThread | None = None
        _shared.append(self)
        if hasattr(os, "register_at_fork"):  # POSIX
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The loop thread is the parent's: the child starts its own on first use.
        self._lock = threading.Lock()
        self._current = None

    def get(self) -> LoopThread:
        """The running shared loop thread, started if needed."""
        lt = self._current
        if lt is not None and lt._state is _RUNNING:
            return lt
        with self._lock:
            lt = self._current
            if lt is None or lt._state is not _RUNNING:
                lt = LoopThread(name=self.thread_name)
                lt._thread_name = self.thread_name
                lt._idle_timeout = self.idle_timeout
                lt.start()
                self._current = lt
        return lt

    @property
    def current(self) -> LoopThread | None:
        """The loop thread now in use, if any."""
        return self._current

    def close(self, timeout: float | None = None) -> None:
        """Close the current loop thread (the next :meth:`get` starts a new one)."""
        with self._lock:
            lt, self._current = self._current, None
        if lt is not None:
            lt.close(timeout=timeout)


_shared: Final[list[SharedLoopThread]] = []

#: Seconds the ``to_loop`` loop thread stays up with no call before its thread
#: exits (``from_thread``'s never retires: objects made there are bound to it).
SHARED_IDLE_TIMEOUT: Final = 30.0

#: Seconds interpreter exit waits for a shared loop thread to stop.
EXIT_TIMEOUT: Final = 2.0

_isolated: Final = SharedLoopThread("offloop-shared-loop-to_loop", SHARED_IDLE_TIMEOUT)


@atexit.register
def _close_shared_at_exit() -> None:
    for holder in _shared:
        try:
            holder.close(timeout=EXIT_TIMEOUT)
        except Exception as exc:  # never fail interpreter exit over a loop thread
            print(f"offloop: closing {holder.thread_name} at exit failed: {exc!r}", file=sys.stderr)


async def to_loop(async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the coroutine ``async_fn(*args, **kwargs)`` on an isolated loop thread; await it.

    For a coroutine that blocks (calls ``time.sleep``, a sync client, or a
    framework doing sync I/O inside ``async def``): it stalls the isolated
    loop, not yours. All ``to_loop`` calls share one background loop thread
    (``offloop-shared-loop-to_loop``), so a coroutine that blocks there also
    delays the other ``to_loop`` calls; give a long-running or often-blocking
    coroutine its own :class:`LoopThread`. For plain sync functions prefer
    :func:`to_thread`: it runs many of them at once in a thread pool.

    Cancelling the awaiting task cancels the coroutine; its exception or
    cancellation reaches the awaiter. Context variables are copied.

    Raises:
        TypeError: ``async_fn`` is not a coroutine function.
    """
    check_async_callable(async_fn, "offloop.to_loop()")
    caller = asyncio.get_running_loop()
    while True:
        lt = _isolated.get()
        if caller is lt._loop:
            # Nested to_loop: already isolated; a task copies the context, as crossings do.
            return await asyncio.ensure_future(async_fn(*args, **kwargs))
        try:
            remote = lt._send(caller, async_fn, args, kwargs)
        except PoolClosedError:
            if lt._retired:
                continue  # it retired after idling; nothing was sent, so take the next one
            raise
        return await remote.receive()  # type: ignore[no-any-return]

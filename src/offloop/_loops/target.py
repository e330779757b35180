"""Which loop ``from_thread`` uses from a thread that no offloop pool started.

By default one shared loop thread (``offloop-shared-loop``) that lives as long
as the process: objects made there through ``from_thread`` (an
``aiohttp.ClientSession``, a connection pool) are bound to its loop, so it
never retires when idle, however long nothing is sent. It is a daemon thread,
closed at interpreter exit (``shared._close_shared_at_exit``), which cancels
what still runs there and so exits the async context managers entered
through a :class:`~offloop.Portal`. :func:`set_from_thread_loop` puts the
host's loop or a :class:`LoopThread` of the user's in its place.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Final

from .._core.errors import CallerGoneError, PoolClosedError
from .._core.token import thread_state
from .._core.validate import describe
from .loopthread import LoopThread
from .shared import SharedLoopThread

__all__ = [
    "SHARED_THREAD_NAME",
    "Target",
    "from_thread_target",
    "schedule",
    "set_from_thread_loop",
]

Target = LoopThread | asyncio.AbstractEventLoop | SharedLoopThread

#: The thread name the test suite's leak check knows as long-lived by design.
SHARED_THREAD_NAME: Final = "offloop-shared-loop"

# No idle timeout: a loop that retired would break every object bound to it.
shared: Final = SharedLoopThread(SHARED_THREAD_NAME, None)

_lock: Final = threading.Lock()
_chosen: LoopThread | asyncio.AbstractEventLoop | None = None


def from_thread_target() -> Target:
    """The loop ``from_thread`` uses from a plain thread now."""
    chosen = _chosen
    if chosen is None:
        return shared
    if isinstance(chosen, asyncio.AbstractEventLoop) and chosen.is_closed():
        raise PoolClosedError(
            f"The event loop chosen with offloop.set_from_thread_loop() ({chosen!r}) is "
            f"closed, so nothing can run there. Call offloop.set_from_thread_loop(None) "
            f"(or choose another loop) before closing it."
        )
    return chosen


def set_from_thread_loop(target: LoopThread | asyncio.AbstractEventLoop | None) -> None:
    """Choose the loop that ``from_thread`` (and a default :class:`Portal`) uses from plain threads.

    Plain threads are those no offloop pool started: the main thread of a
    sync program, a thread of your own, a thread of a WSGI server outside a
    :class:`WSGIService`. Workers of offloop's pools keep calling back into
    the loop that sent them their work. Pass the host's loop (e.g.
    ``asyncio.get_running_loop()`` in a framework's start-up hook) so sync
    code shares its connections, or a :class:`LoopThread` of your own; pass
    ``None`` to go back to the shared ``offloop-shared-loop`` thread.

    The loop must stay open while it is chosen: calls sent to a closed one
    raise :class:`PoolClosedError`. Choose ``None`` again before closing it.

    Raises:
        TypeError: ``target`` is not a LoopThread, an event loop or None.
        PoolClosedError: ``target`` is closed already.
    """
    global _chosen
    if target is not None and not isinstance(target, (LoopThread, asyncio.AbstractEventLoop)):
        raise TypeError(
            f"offloop.set_from_thread_loop() takes a LoopThread, an event loop or None, got "
            f"{describe(target)}. Pass asyncio.get_running_loop() from the host's start-up "
            f"code, or an offloop.LoopThread."
        )
    closed = (
        target.is_closed()
        if isinstance(target, asyncio.AbstractEventLoop)
        else target is not None and target.state.value in ("closing", "closed")
    )
    if closed:
        raise PoolClosedError(
            f"offloop.set_from_thread_loop() got {target!r}, which is closed and would run "
            f"nothing. Pass a running loop or LoopThread, or None for the shared loop thread."
        )
    with _lock:
        _chosen = target


def schedule(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any, ctx: Any
) -> None:
    """``loop.call_soon_threadsafe(fn, *args, context=ctx)``; a closed loop raises by name."""
    try:
        loop.call_soon_threadsafe(fn, *args, context=ctx)
    except RuntimeError:
        call = thread_state.call
        if call is not None and call.loop is loop:  # as from_thread says it
            raise CallerGoneError(
                f"The event loop that sent this work to the thread ({loop!r}) is closed, so "
                f"nobody is left to run this or use its result. Return from the worker function."
            ) from None
        raise PoolClosedError(
            f"The event loop {loop!r} is closed, so nothing sent there can run. Send the work "
            f"to a loop that is running."
        ) from None

"""``from_thread``: call async code from sync code, on the right loop.

In an offloop worker the coroutine runs on the loop that sent the work (the
worker is calling back into its caller). Elsewhere it runs on the loop chosen
with ``set_from_thread_loop``, by default one shared background loop thread
that lives as long as the process (``target.py``), so a sync program that
calls ``from_thread`` in a loop does not pay for a new event loop per call the
way ``asgiref.async_to_sync`` and ``asyncer.syncify`` do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, ParamSpec, TypeVar

from .._core.token import thread_state
from .._core.validate import check_async_callable
from .crossing import refuse_on_running_loop
from .shared import block_on
from .target import SHARED_THREAD_NAME, from_thread_target

__all__ = ["SHARED_THREAD_NAME", "from_thread"]

P = ParamSpec("P")
R = TypeVar("R")

_WHERE: Final = "offloop.from_thread()"
_INSTEAD: Final = (
    "In async code 'await async_fn(...)' directly, or 'await offloop.to_loop(async_fn, ...)' "
    "to run it on an isolated loop."
)


def from_thread(async_fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the coroutine ``async_fn(*args, **kwargs)`` from sync code; block for its result.

    These two lines do the same, the first in async code, the second in a
    thread::

        result = await async_fn(*args, **kwargs)
        result = offloop.from_thread(async_fn, *args, **kwargs)

    - In a worker thread started by offloop (``to_thread``, ``ThreadPool.run``,
      ``iterate``, a thread service) the coroutine runs on the event loop that
      sent the work, so it may use that loop's connections, locks and tasks.
      If the task awaiting the worker is cancelled (the call's
      :class:`StopToken` is set), the coroutine is cancelled and the worker
      gets :class:`CallerGoneError` instead of waiting forever, unless the
      coroutine completed first (then its result is returned); the same
      happens if that loop is closed. Called with the token already set, it
      raises :class:`CallerGoneError` without running the coroutine.
    - In any other thread it runs on the loop chosen with
      :func:`set_from_thread_loop`, by default a shared background loop thread
      (``offloop-shared-loop``), started on first use, kept as long as the
      process lives (objects made there stay usable after any idle time) and
      closed at interpreter exit; it never keeps the process alive.

    The caller's context variables are copied into the coroutine. Its result
    is returned and its exception raised, with the traceback.

    Raises:
        WouldDeadlockError: called on a thread whose event loop is running
            (from inside async code): blocking there would deadlock the loop;
            or the chosen loop is this thread's own and not running, so only
            this thread, blocked here, could run it.
        CallerGoneError: the worker's stop token was set (its awaiting task was
            cancelled, or its pool is closing), or its loop closed; or the
            coroutine was cancelled on its loop, not by this caller.
        TypeError: ``async_fn`` is not a coroutine function.
    """
    refuse_on_running_loop(_WHERE, _INSTEAD)
    check_async_callable(async_fn, _WHERE)
    call = thread_state.call
    if call is None:
        return block_on(from_thread_target(), None, _WHERE, async_fn, args, kwargs)
    loop = call.loop
    target = from_thread_target() if loop is None else loop
    return block_on(target, call.token, _WHERE, async_fn, args, kwargs)

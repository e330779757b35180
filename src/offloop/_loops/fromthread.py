"""``from_thread``: call async code from sync code, on the right loop.

In an offloop worker the coroutine runs on the loop that sent the work (the
worker is calling back into its caller). Elsewhere it runs on one shared
background loop thread, started on first use and retired after idling, so a
sync program that calls ``from_thread`` in a loop does not pay for a new event
loop per call the way ``asgiref.async_to_sync`` and ``asyncer.syncify`` do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, ParamSpec, TypeVar

from .._core.token import thread_state
from .._core.validate import check_async_callable
from .crossing import refuse_on_running_loop
from .shared import SHARED_IDLE_TIMEOUT, SharedLoopThread, block_on

__all__ = ["from_thread"]

P = ParamSpec("P")
R = TypeVar("R")

#: The thread name the test suite's leak check knows as long-lived by design.
SHARED_THREAD_NAME: Final = "offloop-shared-loop"

_shared: Final = SharedLoopThread(SHARED_THREAD_NAME, SHARED_IDLE_TIMEOUT)

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
    - In any other thread it runs on a shared background loop thread
      (``offloop-shared-loop``), started on first use and stopped after 30 s
      without calls and at interpreter exit; it never keeps the process alive.

    The caller's context variables are copied into the coroutine. Its result
    is returned and its exception raised, with the traceback.

    Raises:
        WouldDeadlockError: called on a thread whose event loop is running
            (from inside async code): blocking there would deadlock the loop.
        CallerGoneError: the worker's stop token was set (its awaiting task was
            cancelled, or its pool is closing), or its loop closed; or the
            coroutine was cancelled on its loop, not by this caller.
        TypeError: ``async_fn`` is not a coroutine function.
    """
    refuse_on_running_loop(_WHERE, _INSTEAD)
    check_async_callable(async_fn, _WHERE)
    call = thread_state.call
    if call is None:
        return block_on(_shared, None, _WHERE, async_fn, args, kwargs)
    loop = call.loop
    return block_on(_shared if loop is None else loop, call.token, _WHERE, async_fn, args, kwargs)

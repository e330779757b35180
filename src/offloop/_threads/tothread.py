"""The default thread pool behind :func:`offloop.to_thread`, and its process hooks.

It is created on first use (and again after someone closed it); after
``os.fork()`` every pool starts over in the child, and at interpreter exit
calls still stuck in worker threads are named in a warning.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

from .._core.offload import OffloadFuture
from .._core.poolbase import DefaultPool, PoolState
from .._core.registry import pools_of
from .pool import ThreadPool

__all__ = ["default_thread_pool", "service_pool", "to_thread"]

P = ParamSpec("P")
R = TypeVar("R")


def _make_default() -> ThreadPool:
    pool = ThreadPool(name="default")
    pool._run_name = "offloop.to_thread()"
    return pool


#: How long interpreter exit waits, in all, for calls whose StopToken is set to
#: return before naming them as abandoned.
EXIT_GRACE: Final = 0.1
#: How often it looks: a call ends with no signal the exit hook could wait on.
_EXIT_POLL: Final = 0.002

_default: Final = DefaultPool(_make_default)
_OPEN: Final = PoolState.OPEN


def default_thread_pool() -> ThreadPool:
    """The process-wide pool behind :func:`to_thread` (created on first use).

    Read its :meth:`~ThreadPool.statistics`, or size it::

        offloop.default_thread_pool().max_workers = 8

    It is created anew (with the default size) if someone closes it.
    """
    return _default.get()


def _make_services() -> ThreadPool:
    return ThreadPool(name="services")


_services: Final = DefaultPool(_make_services)


def service_pool() -> ThreadPool:
    """The private pool offloop's own services start and stop their servers in.

    Not the default pool: user calls stuck there (all 40 threads blocked) must
    not queue a service's stop until the supervisor's grace runs out.
    """
    return _services.get()


def to_thread(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
    """Run the blocking ``fn(*args, **kwargs)`` in offloop's default thread pool.

    These two lines do the same, but the second does not stall the loop::

        result = fn(*args, **kwargs)
        result = await offloop.to_thread(fn, *args, **kwargs)

    The call starts at once; the returned :class:`OffloadFuture` works with
    plain ``await``, ``asyncio.create_task``, ``asyncio.gather`` and
    ``asyncio.wait_for``. A timeout or cancellation returns control at once; the
    function keeps its thread until it returns, with its
    :func:`~offloop.current_token` set so it can stop early.

    Raises:
        TypeError: ``fn`` is not callable, or is a coroutine or generator function.
        RuntimeError: no event loop is running in this thread.
    """
    pool = _default.pool
    if pool is None or pool._state is not _OPEN:
        pool = _default.get()
    return pool.run(fn, *args, **kwargs)


def _forget_threads_after_fork() -> None:
    for pool in pools_of(ThreadPool):
        pool._forget_threads()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_threads_after_fork)


@atexit.register
def _warn_stuck_at_exit() -> None:
    # Worker threads are daemons, so a stuck call cannot hang interpreter exit
    # (asyncio.to_thread's executor can); say what was left behind instead.
    pools = pools_of(ThreadPool)
    # A call told to stop just before exit (a timeout, the loop's last
    # cancellation) is usually returning as exit begins: a short moment spares
    # a false warning. Calls not told to stop cannot end because of exit, and
    # none running costs nothing.
    deadline = time.monotonic() + EXIT_GRACE
    while any(pool._told_to_stop() for pool in pools) and time.monotonic() < deadline:
        time.sleep(_EXIT_POLL)
    for pool in pools:
        pool._report_stuck("at interpreter exit")

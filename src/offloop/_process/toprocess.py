"""The default process pool behind :func:`offloop.to_process`.

It is created on first use (and again after someone closed it, or in a
forked child); at interpreter exit every process pool's workers are stopped
(see ``pool.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

from .._core.offload import OffloadFuture
from .._core.poolbase import DefaultPool
from .pool import ProcessPool

__all__ = ["default_process_pool", "to_process"]

P = ParamSpec("P")
R = TypeVar("R")


def _make_default() -> ProcessPool:
    pool = ProcessPool(name="default")
    pool._run_name = "offloop.to_process()"
    return pool


_default: Final = DefaultPool(_make_default, new_after_fork=True)


def default_process_pool() -> ProcessPool:
    """The process-wide pool behind :func:`to_process`, one process per CPU it may use.

    Read its :meth:`~ProcessPool.statistics`, or size it::

        offloop.default_process_pool().max_workers = 2
    """
    return _default.get()


def to_process(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
    """Run the CPU-bound ``fn(*args, **kwargs)`` in offloop's default process pool.

    These two lines compute the same, but the second keeps the event loop
    (and its GIL) free while it runs::

        result = fn(*args, **kwargs)
        result = await offloop.to_process(fn, *args, **kwargs)

    The pool has one worker process per CPU this process may run on, started
    on first use and stopped at interpreter exit. See :class:`ProcessPool`
    for pickling, crashes and cancellation.

    Raises:
        TypeError: ``fn`` is not callable, or is a coroutine or generator function.
        NotPicklableError: the function, an argument or the result cannot be pickled.
        WorkerCrashed: the worker process died while running the call.
        RuntimeError: no event loop is running in this thread.
    """
    return default_process_pool().run(fn, *args, **kwargs)

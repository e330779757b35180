"""The default executor of offloop's own loops: an executor view over a pool of its own.

(``ThreadPool.executor()`` gives the same view, ``_core/poolexecutor.py``,
over a user's pool.) :class:`PoolExecutor` is the default executor of the event loops offloop owns
(``sv.run()``, ``offloop run``, every ``LoopThread``'s). asyncio's default executor is a
``ThreadPoolExecutor``, whose threads the interpreter joins at exit: a service
that awaited ``asyncio.to_thread()`` or ``loop.run_in_executor(None, ...)`` on
a call that never returns kept the process alive after ``sv.run()`` had
returned, however short the grace. This one sends those calls to a fresh
offloop pool instead: daemon threads, and a call still running when the loop
closes is abandoned and logged with its function.

A loop thread's executor (:func:`loop_thread_executor`) is not bounded on
close: ``LoopThread.close()`` waits for its jobs as ``asyncio.run`` does (its
own ``timeout`` bounds that), while interpreter exit still never waits for them.
"""

from __future__ import annotations

from typing import Final

from .._core.poolexecutor import PoolExecutorView
from .pool import ThreadPool

__all__ = ["CLOSE_WAIT", "PoolExecutor", "loop_thread_executor"]

#: How long closing the default executor waits for calls still running before abandoning them.
CLOSE_WAIT: Final = 0.1


class PoolExecutor(PoolExecutorView):
    """The default executor of offloop's own loops: a view owning a fresh pool named ``name``.

    ``close_timeout``: how long its shutdown waits for calls still running
    before abandoning them (``None``: as long as they take).
    """

    def __init__(self, name: str, *, close_timeout: float | None = CLOSE_WAIT) -> None:
        super().__init__(ThreadPool(name=name), owns_pool=True, close_timeout=close_timeout)


def loop_thread_executor(name: str) -> PoolExecutor:
    """A LoopThread's default executor, over a pool named ``name``; its close waits for its jobs."""
    return PoolExecutor(name, close_timeout=None)

"""The default executor of the event loops offloop owns (``sv.run()``, ``offloop run``).

asyncio's default executor is a ``ThreadPoolExecutor``, whose threads the
interpreter joins at exit: a service that awaited ``asyncio.to_thread()`` or
``loop.run_in_executor(None, ...)`` on a call that never returns kept the
process alive after ``sv.run()`` had returned, however short the grace. This
executor sends those calls to an offloop :class:`~offloop.ThreadPool`
instead: daemon threads, and a call still running when the loop closes is
abandoned and logged with its function.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any

from .pool import ThreadPool

__all__ = ["PoolExecutor"]

#: How long closing the executor waits for calls still running before abandoning them.
CLOSE_WAIT = 0.1


class PoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """An executor over a fresh :class:`ThreadPool` named ``name``.

    A ``ThreadPoolExecutor`` only because ``loop.set_default_executor()``
    takes nothing else (Python >= 3.11): ``submit()`` and ``shutdown()`` are
    its own, so the base class never starts a thread. ``submit()`` is called
    by ``loop.run_in_executor()`` on the loop's thread, where the pool needs
    a running loop.
    """

    def __init__(self, name: str) -> None:
        super().__init__(max_workers=1, thread_name_prefix=f"offloop-{name}")
        self._pool = ThreadPool(name=name)
        self._lock = threading.Lock()
        self._shut = False
        self._running: set[concurrent.futures.Future[Any]] = set()

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in the pool; the result comes through the loop.

        Raises:
            RuntimeError: the executor is shut down, or no event loop runs in this thread.
        """
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
        # asyncio.to_thread() sends partial(context.run, fn, *args): the pool
        # copies the same context itself, and then logs and names fn, not the partial.
        if (
            isinstance(fn, functools.partial)
            and getattr(fn.func, "__name__", None) == "run"
            and isinstance(getattr(fn.func, "__self__", None), contextvars.Context)
            and fn.args
        ):
            wrapped: functools.partial[Any] = fn
            fn, args = wrapped.args[0], (*wrapped.args[1:], *args)
            kwargs = {**wrapped.keywords, **kwargs}
        call = self._pool.run(fn, *args, **kwargs)
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        result.set_running_or_notify_cancel()
        with self._lock:
            self._running.add(result)

        def settle(done: Any) -> None:  # on the loop's thread
            with self._lock:
                self._running.discard(result)
            if done.cancelled():
                result.set_exception(concurrent.futures.CancelledError())
            elif (error := done.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(done.result())

        call.add_done_callback(settle)
        return result

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``wait``, wait for the running ones first.

        Then close the pool: calls still running are abandoned (their threads
        are daemon threads) and logged.
        """
        with self._lock:
            self._shut = True
            running = list(self._running)
        if wait and running:
            concurrent.futures.wait(running)
        self._pool.close(timeout=CLOSE_WAIT)

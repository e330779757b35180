"""A ``concurrent.futures.Executor`` over an offloop pool (thread or process pool).

Code that takes an executor (``loop.set_default_executor``, libraries with an
``executor=`` argument, ``asyncio.to_thread`` and ``run_in_executor(None, ...)``
once it is the loop's default) sends its calls through the pool, so they
honour its ``max_workers``, its stop tokens and its bounded close.

A pool's ``run()`` needs a running event loop in the calling thread: that is
where results are delivered. ``submit()`` on a loop's thread (what
``run_in_executor`` does) uses that loop; from any other thread it uses the
view's own small loop thread, started on the first such call and stopped by
``shutdown()``. The future ``submit()`` returns stays PENDING until the call
ends (as ``run_coroutine_threadsafe``'s does), so cancelling it works from
any thread while the call runs: it cancels the pool's call (sets its stop
token; a queued call never runs). The worker that ends a call completes the
future itself (see ``OffloadFuture._sink``), as a ``ThreadPoolExecutor``'s
worker does: one wake-up of the awaiting loop, and a loop thread that blocks
on the future still gets its outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import contextvars
import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from .errors import WouldDeadlockError
from .offload import DeferredCancel, OffloadFuture, deliverable, loop_local
from .token import thread_state
from .validate import check_sync_callable

__all__ = ["ExecutorPool", "PoolExecutorView", "shut_views_of"]

_get_running_loop: Final = asyncio._get_running_loop

logger: Final = logging.getLogger("offloop")

P = ParamSpec("P")
R = TypeVar("R")


class ExecutorPool(Protocol):
    """What the view needs of a pool (``ThreadPool``, ``ProcessPool``)."""

    @property
    def name(self) -> str: ...

    @property
    def max_workers(self) -> int: ...

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> OffloadFuture[Any]: ...

    def close(self, *, timeout: float | None = None) -> None: ...


class PoolExecutorView(cf.ThreadPoolExecutor):
    """An executor whose calls run in an offloop pool; see the module docstring.

    A ``ThreadPoolExecutor`` only because ``loop.set_default_executor()``
    takes nothing else (Python >= 3.11): ``submit()`` and ``shutdown()`` are
    its own, so the base class never starts a thread. ``map()`` is
    ``Executor.map`` over ``submit()``.

    Args:
        pool: the pool the calls run in.
        owns_pool: ``shutdown()`` closes the pool too (after waiting for the
            view's calls), with ``close_timeout``.
        close_timeout: how long ``shutdown(wait=True)`` waits for the view's
            calls before it stops waiting (their stop tokens are set; the
            pool's threads are daemons). ``None``: as long as they take.
    """

    def __init__(
        self,
        pool: ExecutorPool,
        *,
        owns_pool: bool = False,
        close_timeout: float | None = None,
    ) -> None:
        super().__init__(max_workers=1, thread_name_prefix=f"offloop-{pool.name}-executor")
        self._pool = pool
        self._owns_pool = owns_pool
        self._close_timeout = close_timeout
        self._lock = threading.Lock()
        self._shut = False
        # The view's calls not settled yet, in the order they were submitted
        # (a dict as an ordered set: shutdown() cancels the newest first).
        self._outstanding: dict[cf.Future[Any], None] = {}
        self._driver: _Driver | None = None
        with _views_lock:
            _views.setdefault(pool, weakref.WeakSet()).add(self)

    @property
    def pool(self) -> ExecutorPool:
        """The pool the calls run in."""
        return self._pool

    # Not public, but read by code that sizes its own work to an executor:
    # dask.compute(scheduler=executor) and dask's pool= setting keep that many
    # tasks in flight. So it is the pool's size now, also after
    # pool.max_workers was set, not the size when the view was made.
    @property
    def _max_workers(self) -> int:
        return self._pool.max_workers

    @_max_workers.setter
    def _max_workers(self, value: int) -> None:
        if "_pool" not in self.__dict__:
            return  # ThreadPoolExecutor.__init__'s; the base class never starts a thread here
        raise AttributeError(
            f"{self!r}._max_workers follows its pool's max_workers and cannot be set on the "
            f"view; set pool.max_workers = {value!r} instead."
        )

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[R]:
        """Run ``fn(*args, **kwargs)`` in the pool; return a ``concurrent.futures.Future``.

        Cancelling the future cancels the call: a queued call never runs, a
        running one gets its stop token set (``offloop.current_token()``).

        Raises:
            RuntimeError: the executor is shut down.
            TypeError: ``fn`` is not callable, or is a coroutine or generator function.
        """
        # asyncio.to_thread() sends partial(context.run, fn, *args): a thread
        # pool copies the same context itself (and then logs and names fn, not
        # the partial); a process pool could not pickle a Context.
        target: Callable[..., Any] = fn
        call_args: tuple[Any, ...] = args
        call_kwargs: dict[str, Any] = kwargs
        if (
            type(target) is functools.partial
            and getattr(target.func, "__name__", None) == "run"
            and isinstance(getattr(target.func, "__self__", None), contextvars.Context)
            and target.args
        ):
            wrapped: functools.partial[Any] = target
            target, call_args = wrapped.args[0], (*wrapped.args[1:], *args)
            call_kwargs = {**wrapped.keywords, **kwargs}
        # Here, not only in the pool's run(): raised to the caller as documented,
        # before a plain thread's submit starts the view's loop thread.
        check_sync_callable(target, f"{self._pool.name!r} executor's submit()", "offloop.to_loop()")
        future: cf.Future[R] = cf.Future()
        with self._lock:
            shut = self._shut
            if not shut:
                self._outstanding[future] = None
        if shut:
            raise RuntimeError(
                f"{self!r} is shut down and takes no new calls (cannot schedule new futures "
                f"after shutdown). Make a new one with pool.executor()."
            )
        loop = _get_running_loop()
        try:
            if loop is not None:
                self._start(future, target, call_args, call_kwargs)
            else:
                self._driving().call_soon_threadsafe(
                    self._start, future, target, call_args, call_kwargs
                )
        except BaseException:
            self._forget(future)
            raise
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``wait``, wait for the view's calls (up to ``close_timeout``).

        ``cancel_futures`` cancels every call not finished yet (a queued one
        never runs, a running one gets its stop token set) instead of waiting
        for it. A view that owns its pool closes it afterwards. Calling it
        again is allowed.

        Raises:
            WouldDeadlockError: ``wait`` (without ``cancel_futures``) in one of
                the view's own calls: it would wait for itself (checked before
                anything is shut down).
        """
        if wait and not cancel_futures and self._own_call():
            raise WouldDeadlockError(
                f"{self!r}.shutdown(wait=True) was called from one of the view's own calls. "
                f"It waits until every call of the view has ended, this one included, so it "
                f"would wait forever. Call shutdown(wait=False) here, or shut the view down "
                f"from outside its calls."
            )
        with self._lock:
            self._shut = True
            outstanding = list(self._outstanding)
        if cancel_futures:
            # Newest first: the pool starts calls in the order they came, so
            # the queued ones are cancelled before any running one is told to
            # stop. The other way round, a running call that stops at once
            # frees its thread for the next queued call, which could start
            # (and finish) before its own cancel came.
            for future in reversed(outstanding):
                future.cancel()
        if wait and outstanding:
            cf.wait(outstanding, timeout=self._close_timeout)
        self._stop_driver_if_idle()
        if self._owns_pool:
            self._pool.close(timeout=self._close_timeout)

    def _pool_closing(self) -> None:
        # Its pool closes: no new calls, and the loop thread ends once idle.
        with self._lock:
            self._shut = True
        self._stop_driver_if_idle()

    def __repr__(self) -> str:
        with self._lock:
            calls = len(self._outstanding)
            state = "shut down" if self._shut else "open"
        return f"<PoolExecutorView over {self._pool!r} {state}: {calls} calls>"

    # -- internals ----------------------------------------------------------

    def _start(
        self,
        future: cf.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # On a loop's thread, in the submitter's context (the pool copies it).
        if future.cancelled():
            self._forget(future)
            future.set_running_or_notify_cancel()  # see cancel_call
            return

        local = loop_local
        # The pool's run() gives it to the call it creates. A partial of a
        # method, so that shutdown() can tell a call of this view (_own_call).
        local.sink = functools.partial(self._deliver, future)
        try:
            call = self._pool.run(fn, *args, **kwargs)
        except BaseException as exc:
            self._forget(future)
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            local.sink = None
        loop = call.get_loop()

        def cancel_call(done: cf.Future[Any]) -> None:  # any thread, once, as it is done
            if done.cancelled():
                # Tell cf.wait() and as_completed() waiters: cancel() alone does not.
                done.set_running_or_notify_cancel()
                if _get_running_loop() is loop:  # asyncio cancelled its awaiter: no hop
                    call.cancel()
                else:
                    # The pool's cancel policy holds at once (it is applied
                    # under the pool's lock, from any thread): left to the
                    # loop's call.cancel() below, a queued call could start
                    # meanwhile, on a thread freed while the loop is busy.
                    call._owner._cancel(call)
                    with contextlib.suppress(RuntimeError):  # a closed loop cancelled it already
                        loop.call_soon_threadsafe(call.cancel)
                # Settled: a queued call is never delivered, and a running one
                # reaches deliver() only when its function returns. After the
                # cancel is scheduled, which a driver loop then runs before it stops.
                self._forget(done)

        future.add_done_callback(cancel_call)

    def _deliver(self, future: cf.Future[Any], call: OffloadFuture[Any]) -> None:
        # In the thread that ends the call. The future is thread-safe:
        # completing it here wakes its awaiter (run_in_executor's wrap_future)
        # with one hop to the loop, as a ThreadPoolExecutor's worker does, and
        # reaches a loop thread that blocks on it. It stays PENDING until now,
        # so it ends exactly once: a set_*() that loses to a cancel() raises
        # InvalidStateError.
        self._forget(future)
        error = call._error
        try:
            with contextlib.suppress(cf.InvalidStateError):
                if error is None:
                    future.set_result(call._value)
                elif type(error) is DeferredCancel:
                    future.cancel()  # cancelled already: only the view cancels the call
                else:
                    future.set_exception(deliverable(call, error))
        except BaseException:
            # set_*() runs the future's done callbacks here, and logs only an
            # Exception they raise. Anything else (a callback that re-raises
            # a call's KeyboardInterrupt through result()) would end the
            # pool's thread, which the pool would still count as running.
            logger.exception(
                "offloop: a done callback of a %r executor future raised; it was ignored",
                self._pool.name,
            )

    def _own_call(self) -> bool:
        # Whether this thread runs one of this view's calls (a pool worker's
        # current call, whose sink is this view's _deliver).
        sink = getattr(thread_state.call, "_sink", None)
        return isinstance(sink, functools.partial) and getattr(sink.func, "__self__", None) is self

    def _forget(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._outstanding.pop(future, None)
            idle = self._shut and not self._outstanding
        if idle:
            self._stop_driver_if_idle()

    def _driving(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._driver is None:
                self._driver = _Driver(f"offloop-{self._pool.name}-executor")
            return self._driver.loop

    def _stop_driver_if_idle(self) -> None:
        # Once shut down and every call is settled, nothing more needs the loop.
        with self._lock:
            if not (self._shut and not self._outstanding):
                return
            driver, self._driver = self._driver, None
        if driver is not None:
            driver.stop()


#: The views of each pool, so that closing a pool ends their loop threads
#: (a view the user never shut down must not outlive its pool's close).
_views: Final[weakref.WeakKeyDictionary[object, weakref.WeakSet[PoolExecutorView]]] = (
    weakref.WeakKeyDictionary()
)
_views_lock: Final = threading.Lock()


def shut_views_of(pool: object) -> None:
    """Shut down (without waiting) every Executor view of ``pool``: called as it closes.

    A view's loop thread for plain-thread submits then ends once the calls it
    drives are settled, which the closing pool sees to.
    """
    with _views_lock:
        views = list(_views.pop(pool, ()))
    for view in views:
        view._pool_closing()


class _Driver:
    """A bare event loop in a daemon thread, for submits from threads without a loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # closed already
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()

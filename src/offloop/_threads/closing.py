"""A ThreadPool's close: refusing new calls, telling its threads to go, waiting, stuck calls.

One of the layers of :class:`~offloop.ThreadPool`, which inherits it: above
``lifecycle.py`` (the threads' start and end, which a close waits for) and
below ``growth.py``. ``pool.py`` describes the state and its invariants.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, cast

from .._core.errors import PoolClosedError, WouldDeadlockError
from .._core.offload import ABANDONED, CANCELLING, QUEUED, RUNNING, OffloadFuture
from .._core.poolbase import PoolState, complete_waiter, refuse_blocking_close
from .._core.poolexecutor import shut_views_of
from .._core.validate import check_close_timeout, describe
from .lifecycle import ThreadPoolLifecycle, logger

__all__ = ["ThreadPoolClosing"]


class ThreadPoolClosing(ThreadPoolLifecycle):
    """The pool's close (``aclose``, ``close``) and the calls still running at it."""

    #: While closing: whether every thread has been told to go (_begin_close).
    _told_all = False

    async def aclose(self, *, timeout: float | None = None) -> None:
        """Close the pool and wait for its threads to exit.

        New calls are refused with :class:`PoolClosedError`. Calls still queued
        are not started: their awaiters get ``PoolClosedError``. Running calls
        get their :class:`StopToken` set and are waited for, up to ``timeout``
        seconds (``None``: as long as they take). Threads still busy after the
        timeout are abandoned (they are daemon threads, so they never keep the
        process alive) and logged with the function they run; the awaiters of
        their calls get :class:`PoolClosedError` at once, and what the
        functions return later reaches nobody.

        Closing twice is allowed; the second call waits like the first.

        Raises:
            TypeError, ValueError: ``timeout`` is not None or a number of
                seconds at least 0 (checked before anything closes).
        """
        timeout = check_close_timeout(timeout, "ThreadPool.aclose")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._begin_close(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            self._report_stuck(f"after waiting {timeout} s in aclose()")
            self._abandon_running(timeout)
            return
        self._join_threads()

    def close(self, *, timeout: float | None = None) -> None:
        """Close the pool from sync code (not from a running loop's thread).

        Same semantics as :meth:`aclose`, blocking the calling thread.

        Raises:
            WouldDeadlockError: called on a running event loop's thread, or
                from one of this pool's own worker threads (it would wait for
                itself to exit).
            TypeError, ValueError: ``timeout`` is not None or a number of
                seconds at least 0 (checked before anything closes).
        """
        timeout = check_close_timeout(timeout, "ThreadPool.close")
        refuse_blocking_close(self)
        self._refuse_own_thread("close()")
        done = threading.Event()
        self._begin_close(done)
        if not done.wait(timeout):
            self._report_stuck(f"after waiting {timeout} s in close()")
            self._abandon_running(timeout)
            return
        self._join_threads()

    def _abandon_running(self, timeout: float | None) -> None:
        """Mark the pool closed and fail the calls still running after a bounded close.

        Their threads go on (nothing can stop them from outside), but whoever
        awaits them must not wait for a pool that has given up on them: they
        get :class:`PoolClosedError` now, and the result the function returns
        later reaches nobody.
        """
        stuck: list[OffloadFuture[Any]] = []
        with self._lock:
            self._state = PoolState.CLOSED
            for worker in self._workers:
                call = worker.call
                if call is not None and call._phase in (RUNNING, CANCELLING):
                    call._phase = ABANDONED
                    self._abandoned += 1
                    stuck.append(call)
        for call in stuck:
            error = PoolClosedError(
                f"{self._describe()} closed with this call of {describe(call.fn)} still "
                f"running after the close's timeout of {timeout} s; the call was abandoned "
                f"(its thread runs on, and its result will reach nobody). Give the close a "
                f"longer timeout, or have the function poll offloop.current_token()."
            )
            sink = call._sink
            if sink is not None:
                # Its owner completes a future of its own (the Executor view's)
                # from what the call holds; the worker still writes to the call,
                # so the owner is given a record with the error instead.
                sink(cast("OffloadFuture[Any]", _Abandoned(call.fn, error)))
                continue
            # A closed loop means nobody awaits the call any more.
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_fail_if_pending, call, error)

    def _refuse_own_thread(self, what: str) -> None:
        current = threading.current_thread()
        with self._lock:
            own = any(w.thread is current for w in self._workers)
        if own:
            raise WouldDeadlockError(
                f"{self!r}.{what} was called from one of the pool's own worker threads. It "
                f"waits until every worker has exited, this one included, so it would wait "
                f"forever. Close the pool from outside it ('await pool.aclose()' on the event "
                f"loop), or return from this function and close it afterwards."
            )

    def _post_skipped(self) -> None:
        # Outside the lock (a sink completes a concurrent.futures future,
        # whose done callbacks are user code): tell the awaiters of the calls
        # the close refused. Each stays on record until it has been posted,
        # so a close cut short by an exception from a signal handler leaves
        # it to the next one (a call posted twice is answered once).
        while True:
            with self._lock:
                unposted = self._unposted
                if not unposted:
                    return
                call = unposted[-1]
            call._channel.post(call)
            with self._lock, contextlib.suppress(ValueError):  # another closer took it
                unposted.remove(call)

    def _begin_close(self, waiter: asyncio.Future[None] | threading.Event) -> None:
        shut_views_of(self)  # their loop threads end with the pool
        running: list[OffloadFuture[Any]] = []
        with self._lock:
            if self._state is PoolState.OPEN:
                self._state = PoolState.CLOSING
                self._told_all = False
            if self._state is PoolState.CLOSING and not self._told_all:
                # Once per close, unless an exception from a signal handler
                # (a second Ctrl-C) cut it short: then the next close does it
                # again, each step safe to repeat. A thread never told to go
                # would keep every close waiting; a None too many on the
                # queue is never read.
                # Fail queued calls now: with every thread busy or stuck, no
                # worker might ever dequeue them, and their awaiters would hang.
                # Each is on record (_unposted) before it is changed, and
                # stays there until its awaiter has been told.
                unposted = self._unposted
                self._take_queue(into=unposted)
                for call in self._pending:
                    if call._phase is QUEUED:
                        unposted.append(call)  # twice after a pass cut short: told twice
                self._pending.clear()
                for call in unposted:
                    if call._phase is QUEUED:
                        self._skip_closed(call)
                self._backlog = 0  # nothing is queued any more
                # Threads wanted but not started yet have nothing to run now.
                unstarted = self._unstarted
                while unstarted:
                    with contextlib.suppress(ValueError):  # removed by a close cut short
                        self._workers.remove(unstarted[-1])
                    del unstarted[-1]
                # An idle thread is told to exit directly, each taken off the
                # stack and woken with no call in between (see Worker's
                # docs); the others find their None on the
                # queue once their call ends.
                idle = self._idle
                busy = [w for w in self._workers if w not in idle]
                while idle:
                    worker = idle[-1]
                    del idle[-1]
                    worker.hand = None
                    worker.wake.release()
                for worker in busy:
                    if worker.call is not None:
                        running.append(worker.call)
                    self._queue.put(None)
                self._told_all = True
            closed = not self._workers
            if closed:
                self._state = PoolState.CLOSED
            else:
                self._closed_waiters.append(waiter)
        self._post_skipped()
        # Outside the lock: a token's callbacks are user code, which may well
        # look at the pool (repr, statistics) and would deadlock under it.
        for call in running:
            call.token.set("pool closing")
        if closed:
            complete_waiter(waiter)

    def _stuck_calls(self) -> list[tuple[str, str]]:
        with self._lock:
            return [
                (w.thread.name if w.thread else "?", describe(w.call.fn))
                for w in self._workers
                if w.call is not None
            ]

    def _told_to_stop(self) -> bool:
        """True while a running call has its StopToken set: it may be about to return."""
        with self._lock:
            for w in self._workers:
                token = None if w.call is None else w.call._token
                if token is not None and token.is_set():
                    return True
        return False

    def _report_stuck(self, when: str) -> None:
        for thread_name, fn in self._stuck_calls():
            logger.warning(
                "offloop: %s in thread %s of pool %r is still running %s and was abandoned; "
                "it cannot be stopped from outside. Poll offloop.current_token() in long "
                "functions so they can stop when asked.",
                fn,
                thread_name,
                self._name,
                when,
            )


def _fail_if_pending(call: OffloadFuture[Any], error: BaseException) -> None:
    # On the call's loop: the call may have ended (and been delivered) meanwhile.
    if not call.done():
        call.set_exception(error)


class _Abandoned:
    """What a call's sink reads of an abandoned call: its function and the error to deliver."""

    __slots__ = ("_error", "_value", "fn")

    def __init__(self, fn: Any, error: BaseException) -> None:
        self.fn = fn
        self._error: BaseException | None = error
        self._value: Any = None

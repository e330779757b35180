"""A ThreadPool's threads: their start and end, cancels, closing, fork, stuck calls.

One of the layers of :class:`~offloop.ThreadPool`, which inherits it:
``view.py`` below it (the pool seen from outside, and the shared state it
declares), ``growth.py``, ``dispatch.py`` and ``pool.py`` above it (how
calls flow through the pool). All of them work on the same state under the
same lock; ``pool.py`` describes the state and its invariants, and sets it
up in ``ThreadPool.__init__``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from typing import Any, Final, cast

from .._core.errors import PoolClosedError, WouldDeadlockError
from .._core.offload import (
    ABANDONED,
    BATCHED,
    CANCELLING,
    QUEUED,
    RUNNING,
    SKIPPED,
    Channel,
    OffloadFuture,
)
from .._core.poolbase import PoolState, complete_waiter, refuse_blocking_close
from .._core.poolexecutor import shut_views_of
from .._core.validate import check_close_timeout, describe
from .view import ThreadPoolView
from .workers import TAKE_QUEUED, Worker

__all__ = ["ThreadPoolLifecycle"]

logger: Final = logging.getLogger("offloop")

#: Seconds that wanted threads wait for a worker to start them before the
#: loop does (see ThreadPoolLifecycle._want_started).
START_GRACE: Final = 0.005


class ThreadPoolLifecycle(ThreadPoolView):
    """The pool's threads: their start and end, cancels, closing, fork, stuck calls."""

    #: Thread starts that failed in a row (see _start_failed).
    _failed_starts = 0

    def _work(self, worker: Worker, starts_others: bool = False) -> None:
        raise NotImplementedError  # pool.py's: the worker thread's body

    def _check_later(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError  # growth.py's: arms a delayed check on the loop

    def _skip_closed(self, call: OffloadFuture[Any]) -> None:
        # Under _lock: a queued call the closing pool will not start.
        call._phase = SKIPPED
        self._queued -= 1
        self._cancelled += 1
        call._error = PoolClosedError(
            f"{self._describe()} closed before this call of {describe(call.fn)} started."
        )

    def _cancel(self, call: OffloadFuture[Any]) -> bool:
        """Handle ``cancel()`` of a call's future; returns whether to cancel it now."""
        call.token.set("cancelled")
        with self._lock:
            if call._phase is BATCHED:
                # In its loop's batch, not yet counted by the pool: the
                # batch's flush drops it.
                call._phase = SKIPPED
                self._cancelled += 1
                return True
            if call._phase is QUEUED:
                call._phase = SKIPPED
                self._queued -= 1
                self._cancelled += 1
                # Not kept until a slot frees: its arguments may be large.
                with contextlib.suppress(ValueError):  # dispatched: handed or on the queue
                    self._pending.remove(call)
                return True
            if call._phase is CANCELLING:
                return False  # already deferred
            if call._phase is not RUNNING:
                return True  # finished, result in flight: the awaiter is gone anyway
            self._cancelled += 1  # once: the phase is no longer RUNNING after this
            if self._wait_on_cancel:
                # Deferred: the worker turns the outcome into the cancellation
                # once the function returns, which is what on_cancel="wait" means.
                call._phase = CANCELLING
                return False
            call._phase = ABANDONED
            self._abandoned += 1
            return True

    def _want_started(self, workers: list[Worker], *, now: float) -> bool:
        # Under _lock, on the loop: threads for these new workers are wanted.
        # Thread.start() waits until the new thread has run, which under GIL
        # contention takes several switch intervals: the loop must not pay
        # it. So a worker that ends a call starts them (_starter_wanted); the
        # loop starts one itself only for a pool with no thread at all, or
        # when no worker came by for START_GRACE (all of them blocked, when
        # a start is cheap; see _late_start). Returns whether the caller
        # claimed the start: it then takes _unstarted[0] to start, and
        # checks _starting against its value before the call, should an
        # exception from a signal handler come as this returns (3.10).
        self._unstarted.extend(workers)
        if self._starting:
            return False
        if len(self._unstarted) == len(self._workers):  # no thread to do it
            self._starting = True
            return True
        if self._start_wanted < 0:
            self._start_wanted = now
        return False

    def _starter_wanted(self) -> bool:
        # Under _lock, by a worker whose call ended: whether it should start
        # the wanted threads (after posting its result).
        if self._unstarted and not self._starting:
            self._starting = True
            self._start_wanted = -1.0
            return True
        return False

    def _late_start(self, now: float) -> bool:
        # Under _lock, on the loop (_rebalance): whether the loop must start
        # a wanted thread (claimed as in _want_started), as threads have been
        # wanted for START_GRACE and no worker came by to start them.
        if (
            self._unstarted
            and not self._starting
            and self._start_wanted >= 0
            and now - self._start_wanted > START_GRACE
        ):
            self._starting = True
            self._start_wanted = -1.0
            return True
        return False

    def _start_others(self) -> None:
        # In a thread started with starts_others: start the workers that
        # were wanted meanwhile, then serve calls like any other.
        while True:
            with self._lock:
                if not self._unstarted:
                    self._starting = False
                    return
                worker = self._unstarted.pop(0)
            try:
                self._start_thread(worker)
            except Exception:
                self._start_failed()
                with self._lock:
                    waiters = self._give_up_starting()
                for waiter in waiters:
                    complete_waiter(waiter)
                return

    def _start_failed(self) -> None:
        # In the except clause of a failed thread start. A start that keeps
        # failing (at a thread limit) is tried again every START_RETRY while
        # calls wait for a thread: one traceback per streak of failures, not
        # one per try. Counted without the lock: a race loses a count, no more.
        self._failed_starts += 1
        if self._failed_starts == 1:
            logger.exception(
                "offloop: pool %r could not start a worker thread; calls that need one wait, "
                "and the start is tried again. Further failures are not logged until a start "
                "succeeds. A limit on threads or processes (ulimit -u, a container's pids "
                "limit) or a lack of memory is the usual cause.",
                self._name,
            )
        else:
            logger.debug("offloop: pool %r could not start a worker thread, again", self._name)

    def _give_up_starting(self) -> list[asyncio.Future[None] | threading.Event]:
        # Under _lock, when a thread failed to start: so will the others, most
        # likely; their calls wait for another thread (_serve_backlog). Returns the
        # close waiters to complete (outside the lock) if these were the last
        # workers of a closing pool.
        for worker in self._unstarted:
            self._workers.remove(worker)
            self._backlog += 1
        self._unstarted.clear()
        self._starting = False
        # Not wanted any more: a stale time would let the next wanted thread
        # skip START_GRACE.
        self._start_wanted = -1.0
        self._serve_backlog()
        return self._closed_if_no_worker() if self._state is not PoolState.OPEN else []

    def _serve_backlog(self) -> None:
        # Under _lock, when calls lost the thread they claimed: idle threads
        # wait on their own locks, not on the queue where those calls are,
        # so each of those calls gets one of them sent to the queue. With
        # none idle, the next thread whose call ends takes it (_free_slot).
        while self._backlog > 0 and self._idle:
            self._backlog -= 1
            self._idle.pop().give(TAKE_QUEUED)
        if self._backlog > 0 and not self._workers and self._state is PoolState.OPEN:
            # No thread is left to come free, and counted as dispatched
            # they would hold their CPU slots for good: they go back to
            # _pending, first in line, for a check to start a thread for
            # them. Nothing else is on the queue: every thread that read it
            # has taken its item.
            calls = self._take_queue()
            self._pending.extendleft(reversed(calls))
            self._backlog = 0
            # Their loops' checks gave up on the start, or never ran: with
            # no thread left, no call ending will dispatch them either, so
            # each of their loops gets a check, a little later (the start
            # just failed, and a retry at once would most likely fail too).
            for call in calls:
                channel = call._channel
                if channel in self._armed:
                    continue  # a check of that loop runs, and dispatches them
                self._armed.add(channel)
                try:
                    # From any thread, the loop's own included: call_at is not thread-safe.
                    call.loop.call_soon_threadsafe(self._check_later, channel, call.loop)
                except RuntimeError:  # its loop is closed: nobody awaits the call
                    self._armed.discard(channel)

    def _lose_thread(self, worker: Worker) -> None:
        # Under _lock: the thread of this worker failed to start, or will not
        # be started (_submit, interrupted): the call it claimed on the queue
        # waits for the next free thread.
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._unstarted.remove(worker)
        self._backlog += 1
        self._serve_backlog()

    def _undo_starts(self, new: list[Worker], starter: Worker | None, was_starting: bool) -> None:
        # Under _lock, in the except clause of a locked section on the loop
        # (_rebalance, _flush) that an exception from a signal handler cut
        # short: its new workers not yet wanted, and a start it claimed
        # (``starter``, taken or not), are given up as after a failed start.
        # Their calls wait for another thread (_serve_backlog).
        for worker in new:
            if worker is not starter and worker not in self._unstarted:
                self._lose_thread(worker)
        if starter is not None:
            starter.launch = -1  # given up: the caller's own except leaves it
            self._lose_thread(starter)
        if self._starting and not was_starting:
            self._give_up_starting()  # the pool is open: no close waiters

    def _settle_start(self, starter: Worker | None) -> list[asyncio.Future[None] | threading.Event]:
        # Under _lock, when an exception from a signal handler came after
        # ``starter`` was claimed and taken but before its start began (or
        # settled it: _start_or_give_up): it is given up, with the other
        # wanted threads. Returns the close waiters to complete.
        if starter is None or starter.launch != 0:
            return []
        starter.launch = -1
        self._lose_thread(starter)
        return self._give_up_starting()

    def _take_queue(self) -> list[OffloadFuture[Any]]:
        # Under _lock: empty the queue, counting its calls out of _ready
        # (no thread will take them), and return those still QUEUED: the
        # others were cancelled, or their run() raised.
        queued: list[OffloadFuture[Any]] = []
        while True:
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                return queued
            if call is not None:
                self._ready -= 1
                self._gil_calls.discard(call)
                if call._phase is QUEUED:
                    queued.append(call)

    def _start_thread(self, worker: Worker, *, starts_others: bool = False) -> None:
        thread = threading.Thread(
            target=self._work,
            args=(worker, starts_others),
            name=f"offloop-{self._name}-{next(self._thread_numbers)}",
            daemon=True,
        )
        worker.thread = thread
        try:
            thread.start()
        except BaseException:
            # Failed (no thread), or interrupted by an exception from a signal
            # handler (Ctrl-C's KeyboardInterrupt) before or after the thread
            # was launched: start() waits for the new thread to run, and
            # nothing public tells whether it launched one. The thread itself
            # settles it, under the lock (_work): if it runs already, it
            # serves like any other; if not, it is given up here, and leaves
            # at once should it run after all.
            with self._lock:
                if worker.launch > 0:
                    raise
                worker.launch = -1
                self._lose_thread(worker)
                # A close may now wait for no thread at all.
                waiters = self._closed_if_no_worker() if self._state is not PoolState.OPEN else []
            for waiter in waiters:
                complete_waiter(waiter)
            raise
        if self._failed_starts:
            failed, self._failed_starts = self._failed_starts, 0
            logger.info(
                "offloop: pool %r started a worker thread again, after %d failed starts.",
                self._name,
                failed,
            )

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

    def _begin_close(self, waiter: asyncio.Future[None] | threading.Event) -> None:
        shut_views_of(self)  # their loop threads end with the pool
        running: list[OffloadFuture[Any]] = []
        skipped: list[OffloadFuture[Any]] = []
        with self._lock:
            if self._state is PoolState.OPEN:
                self._state = PoolState.CLOSING
                # Fail queued calls now: with every thread busy or stuck, no
                # worker might ever dequeue them, and their awaiters would hang.
                for call in self._take_queue():
                    self._skip_closed(call)
                    skipped.append(call)
                for call in self._pending:
                    if call._phase is QUEUED:
                        self._skip_closed(call)
                        skipped.append(call)
                self._pending.clear()
                self._backlog = 0  # nothing is queued any more
                # Threads wanted but not started yet have nothing to run now.
                for worker in self._unstarted:
                    self._workers.remove(worker)
                self._unstarted.clear()
                # An idle thread is told to exit directly; the others find
                # their None on the queue once their call ends.
                idle = self._idle
                for worker in self._workers:
                    if worker.call is not None:
                        running.append(worker.call)
                    if worker in idle:
                        worker.give(None)
                    else:
                        self._queue.put(None)
                idle.clear()
            closed = not self._workers
            if closed:
                self._state = PoolState.CLOSED
            else:
                self._closed_waiters.append(waiter)
        for call in skipped:
            call._channel.post(call)
        # Outside the lock: a token's callbacks are user code, which may well
        # look at the pool (repr, statistics) and would deadlock under it.
        for call in running:
            call.token.set("pool closing")
        if closed:
            complete_waiter(waiter)

    def _thread_exited(self, worker: Worker) -> None:
        # The worker was handed a None, or took one off the queue: from
        # close(), or for a thread above a lowered max_workers (_retiring).
        with self._lock:
            if self._retiring > 0:
                self._retiring -= 1
            self._workers.remove(worker)
            worker.close()
            self._leaving.append(threading.current_thread())
            # The last thread to retire may leave calls that lost their
            # thread, with none left to take them.
            self._serve_backlog()
            # The last thread to retire leaves an open pool open: it starts
            # a thread for its next call.
            waiters = self._closed_if_no_worker() if self._state is not PoolState.OPEN else []
        for waiter in waiters:
            complete_waiter(waiter)

    def _launched(self, worker: Worker) -> bool:
        # By a new worker thread, before anything else: whether it serves the
        # pool, or was given up as its start was interrupted (_start_thread).
        with self._lock:
            if worker.launch < 0:
                return False
            worker.launch = 1
            return True

    def _idle_exit(self, worker: Worker) -> bool:
        # By an idle worker whose wait for a call timed out: whether it left
        # the pool. If it was handed something meanwhile, it takes that.
        with self._lock:
            if worker not in self._idle:
                return False
            self._idle.remove(worker)
            self._workers.remove(worker)
            worker.close()
            # Forget threads that are gone, so a long-lived pool does not
            # collect them forever.
            self._leaving = [t for t in self._leaving if t.is_alive()]
            self._leaving.append(threading.current_thread())
            return True

    def _closed_if_no_worker(self) -> list[asyncio.Future[None] | threading.Event]:
        # Under _lock, while closing: once no worker is left the pool is closed;
        # returns the waiters to complete (outside the lock).
        if self._workers:
            return []
        self._state = PoolState.CLOSED
        waiters, self._closed_waiters = self._closed_waiters, []
        return waiters

    def _join_threads(self) -> None:
        # Every worker has signalled its exit; what is left of its thread is
        # returning from work(), so these joins take microseconds.
        with self._lock:
            leaving, self._leaving = self._leaving, []
        for thread in leaving:
            thread.join()

    def _forget_threads(self) -> None:
        """In a child made by ``os.fork()``: start over with no threads.

        Only the forking thread exists in the child; the parent's workers,
        queue and lock (maybe held at the fork) are not this process's.
        """
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        for worker in self._workers:
            worker.close()  # the parent's threads' files, inherited
        self._workers = []
        self._leaving = []
        self._idle = []
        self._backlog = self._running = self._abandoned = self._queued = 0
        self._retiring = 0
        self._ready = self._waiting = 0
        self._pending = deque()
        self._short = False
        self._unstarted = []
        self._starting = False
        self._start_wanted = -1.0
        self._armed = set()
        self._closed_waiters = []
        self._gil_calls = set()
        if self._state is not PoolState.OPEN:
            self._state = PoolState.CLOSED

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

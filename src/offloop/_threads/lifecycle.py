"""A ThreadPool's threads: their start and end, cancels, fork.

One of the layers of :class:`~offloop.ThreadPool`, which inherits it:
``view.py`` below it (the pool seen from outside, and the shared state it
declares), ``closing.py`` (its close), ``growth.py``, ``dispatch.py`` and
``pool.py`` above it (how calls flow through the pool). All of them work on the same state under the
same lock; ``pool.py`` describes the state and its invariants, and sets it
up in ``ThreadPool.__init__``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from typing import Any, Final

from .._core.errors import PoolClosedError
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
from .._core.poolbase import PoolState, complete_waiter
from .._core.validate import describe
from .view import ThreadPoolView
from .workers import TAKE_QUEUED, Worker

__all__ = ["ThreadPoolLifecycle"]

logger: Final = logging.getLogger("offloop")

#: Seconds that wanted threads wait for a worker to start them before the
#: loop does (see ThreadPoolLifecycle._want_started).
START_GRACE: Final = 0.005


class ThreadPoolLifecycle(ThreadPoolView):
    """The pool's threads: their start and end, cancels, fork."""

    #: Thread starts that failed in a row (see _start_failed).
    _failed_starts = 0

    def _work(self, worker: Worker, starts_others: bool = False) -> None:
        raise NotImplementedError  # pool.py's: the worker thread's body

    def _check_later(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError  # growth.py's: arms a delayed check on the loop

    def _skip_closed(self, call: OffloadFuture[Any]) -> None:
        # Under _lock: a queued call the closing pool will not start. The
        # error is made first, and the call changed with no call in between:
        # see ThreadPoolClosing._begin_close.
        error = PoolClosedError(
            f"{self._describe()} closed before this call of {describe(call.fn)} started."
        )
        call._error = error
        call._phase = SKIPPED
        self._queued -= 1
        self._cancelled += 1

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
        idle = self._idle
        while self._backlog > 0 and idle:
            # Handed with no call from taking the thread off the stack to
            # waking it (see Worker's docs).
            worker = idle[-1]
            del idle[-1]
            self._backlog -= 1
            worker.hand = TAKE_QUEUED
            worker.wake.release()
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

    def _take_queue(self, into: list[OffloadFuture[Any]] | None = None) -> list[OffloadFuture[Any]]:
        # Under _lock: empty the queue, counting its calls out of _ready
        # (no thread will take them), and return those still QUEUED (added
        # to ``into`` if given): the others were cancelled, or their run()
        # raised. Each call is in the list before it is counted out: an
        # exception from a signal handler (Ctrl-C) between the two leaves a
        # count too high, not a call nobody will ever answer.
        queued: list[OffloadFuture[Any]] = [] if into is None else into
        while True:
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                return queued
            if call is not None:
                if call._phase is QUEUED:
                    queued.append(call)
                self._ready -= 1
                self._gil_calls.discard(call)

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
        self._unposted = []
        self._gil_calls = set()
        self._failed_starts = 0
        if self._state is not PoolState.OPEN:
            self._state = PoolState.CLOSED

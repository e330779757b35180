"""Thread pools: run blocking sync functions without stalling the event loop.

This is offloop's hot path, in one file: :class:`ThreadPool` and the loop its
worker threads run (:meth:`ThreadPool._work`). The call record they share is
the :class:`~offloop.OffloadFuture` of ``_core/offload.py``, whose
:class:`~offloop._core.offload.CallPhase` lists the states of a call and the
legal transitions between them; its result travels back to the awaiting loop
through that module's ``Channel``.

One call, in order::

    run()           loop thread: a future in phase QUEUED; _submit() claims a
                    thread for it (an idle one, a new one, or the backlog) and
                    puts it on the queue
    _work()         worker: takes it (QUEUED -> RUNNING), runs fn in the
                    caller's copied context, records the outcome, frees its
                    slot (RUNNING -> DONE), then posts the call to the Channel
    Channel.drain() loop thread: sets the future's result or exception

Counters, all guarded by ``_lock``, and what stays true between two
critical sections:

- ``len(_workers)`` threads are started and have not exited; never more
  than ``max_workers``.
- ``_queued`` calls are in the queue in phase QUEUED; ``_running`` calls are
  in a worker, in phase RUNNING, ABANDONED or CANCELLING; ``_abandoned`` of
  them in phase ABANDONED.
- ``_idle`` threads wait for a call that no queued call has claimed, and
  ``_backlog`` queued calls have claimed no thread. A call claims a thread
  when it is submitted (``_idle -= 1``, or a new thread), else it joins the
  backlog; a thread that finishes a call claims a backlogged call, else it
  becomes idle (:meth:`ThreadPool._free_slot`). Claims only steer spawning:
  any thread takes any call off the queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from time import monotonic
from types import CoroutineType, FunctionType
from typing import Any, Final, Literal, ParamSpec, TypeVar, final

from .._core.errors import PoolClosedError, WouldDeadlockError
from .._core.offload import (
    ABANDONED,
    CANCELLING,
    DONE,
    QUEUED,
    RUNNING,
    SKIPPED,
    DeferredCancel,
    OffloadFuture,
    new_call,
    running_loop,
)
from .._core.poolbase import (
    CallCounters,
    PoolContext,
    PoolState,
    complete_waiter,
    refuse_blocking_close,
)
from .._core.spin import yield_cpu
from .._core.token import thread_state
from .._core.validate import (
    REFUSED_CODE_FLAGS,
    check_close_timeout,
    check_positive_int,
    check_sync_callable,
    check_thread_name,
    describe,
)

__all__ = ["DEFAULT_MAX_WORKERS", "ThreadPool", "ThreadPoolStatistics"]

P = ParamSpec("P")
R = TypeVar("R")

logger: Final = logging.getLogger("offloop")

#: Default bound on a pool's threads. Blocking calls are usually I/O waits, so
#: more threads than cores pay off; 40 matches anyio's default limiter and is
#: low enough that a flood of calls queues instead of spawning hundreds of threads.
DEFAULT_MAX_WORKERS: Final = 40

_get_running_loop: Final = asyncio.get_running_loop

#: How often (seconds) a pool with queued calls checks whether its threads are
#: stuck. Calls beyond the idle threads first queue behind the busy ones: for
#: short functions one warm thread beats many threads fighting over the GIL.
#: A thread whose call has run longer than this counts as blocked, and the pool
#: adds one thread per blocked thread (doubling at most), so truly blocking
#: calls reach max_workers within a few periods and a call that waits for
#: another queued call (a nested offload) never deadlocks below max_workers.
GROWTH_PERIOD: Final = 0.001

#: Seconds an idle worker waits for work before its thread exits.
IDLE_TIMEOUT: Final = 30.0

#: Seconds a worker keeps polling for its next call before it sleeps on the
#: queue. Waking a sleeping thread costs a futex wake and a trip through the
#: scheduler, several times the cost of the rest of a round trip; a worker
#: still polling when the next call of a sequential ``await`` loop arrives
#: takes it at once. Each turn yields the CPU and the GIL, and the window is
#: short enough that an idle pool costs nothing measurable.
SPIN_WINDOW: Final = 50e-6

OnCancel = Literal["abandon", "wait"]


class Worker:
    """A worker thread and the call it runs now (read by close() and at exit)."""

    __slots__ = ("call", "started", "thread")

    def __init__(self) -> None:
        self.call: OffloadFuture[Any] | None = None
        self.started = 0.0
        self.thread: threading.Thread | None = None


class ThreadPoolStatistics(CallCounters):
    """What :meth:`ThreadPool.statistics` returns."""

    threads: int


_pools: Final[weakref.WeakSet[ThreadPool]] = weakref.WeakSet()
_pool_numbers: Final = iter(range(1, 1 << 62))


@final
class ThreadPool(PoolContext):
    """A named, bounded pool of worker threads: a bulkhead for blocking calls.

    ``await pool.run(fn, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` in one
    of at most ``max_workers`` threads and returns its result, without blocking
    the event loop. Threads start on demand, are named ``offloop-<name>-<n>``
    and exit after 30 s idle. Calls beyond ``max_workers`` wait in a queue.
    Several event loops in several threads may share one pool.

    Args:
        max_workers: the most threads the pool runs at once (default
            :data:`DEFAULT_MAX_WORKERS`, 40). It is a true bound: a call whose
            awaiter was cancelled keeps its thread until the function returns.
        name: used in thread names, ``repr`` and log messages.
        on_cancel: what cancelling the awaiting task does. ``"abandon"``
            (default): the task gets ``CancelledError`` at once, the call's
            :class:`StopToken` is set, and the function keeps its thread until
            it returns. ``"wait"``: the token is set, and the cancellation is
            delivered only once the function has returned.

    Example::

        async with offloop.ThreadPool(4, name="db") as pool:
            rows = await pool.run(query, "select 1", timeout=5)
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        name: str | None = None,
        on_cancel: OnCancel = "abandon",
    ) -> None:
        check_positive_int(max_workers, "ThreadPool(max_workers=...)")
        if on_cancel not in ("abandon", "wait"):
            raise ValueError(
                f"ThreadPool(on_cancel=...) must be 'abandon' or 'wait', got {on_cancel!r}."
            )
        check_thread_name(name, "ThreadPool")
        self._name = name or f"pool{next(_pool_numbers)}"
        #: How error messages name the call (the default pool says offloop.to_thread()).
        self._run_name = f"ThreadPool {self._name!r}.run()"
        self._max_workers = max_workers or DEFAULT_MAX_WORKERS
        self._wait_on_cancel = on_cancel == "wait"
        self._on_cancel = on_cancel
        self._state = PoolState.OPEN
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[OffloadFuture[Any] | None] = queue.SimpleQueue()
        self._workers: list[Worker] = []
        # Threads that left _workers but may still be returning from work():
        # close() joins them so that none outlives the pool.
        self._leaving: list[threading.Thread] = []
        self._thread_numbers = iter(range(1, 1 << 62))
        # The counters, guarded by _lock: the module docstring states what
        # each one counts and what stays true between critical sections.
        self._idle = 0
        self._backlog = 0
        self._queued = 0
        self._running = 0
        self._abandoned = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        # Loops with a growth check armed. Each loop that queues calls behind
        # busy threads arms its own, so a loop that stopped or blocks cannot
        # keep the pool from growing for the others.
        # Weak: a loop closed with its check armed must not stay alive here.
        self._growth_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._closed_waiters: list[asyncio.Future[None] | threading.Event] = []
        _pools.add(self)

    # -- public API ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name, as used in thread names."""
        return self._name

    @property
    def max_workers(self) -> int:
        """The most threads this pool runs at once."""
        return self._max_workers

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
        """Run ``fn(*args, **kwargs)`` in a worker thread; await the result.

        The call is queued at once (like ``loop.run_in_executor``) and the
        returned :class:`OffloadFuture` resolves to its result: ``await`` it,
        or pass it to ``asyncio.gather``, ``asyncio.wait_for`` or
        ``asyncio.create_task``. The caller's context variables are visible in
        the worker. Exceptions propagate with their type and traceback.

        Raises:
            TypeError: ``fn`` is not callable, or is a coroutine or generator function.
            RuntimeError: no event loop is running in this thread.
            PoolClosedError: the pool is closing or closed.
        """
        # Messages are formatted only on the error path: this runs per call.
        if type(fn) is not FunctionType or fn.__code__.co_flags & REFUSED_CODE_FLAGS:
            check_sync_callable(fn, self._run_name, "offloop.to_loop()")
        try:
            loop = _get_running_loop()
        except RuntimeError:
            loop = running_loop(self._run_name)
        call: OffloadFuture[R] = new_call(self, fn, args, kwargs, loop)
        self._submit(call)
        return call

    def statistics(self) -> ThreadPoolStatistics:
        """A snapshot of the pool's counters.

        Keys: ``state``, ``max_workers``, ``threads``, ``idle``, ``running``
        (including abandoned calls), ``abandoned`` (cancelled by their awaiter
        but still running), ``queued``, ``completed``, ``failed``, ``cancelled``.

        ``cancelled`` counts awaiters cancelled; ``completed`` and ``failed``
        count functions that returned or raised. So an abandoned call whose
        function later returns is counted in ``cancelled`` and in
        ``completed``: its thread did the whole work, nobody used the result.
        """
        with self._lock:
            return {
                "state": self._state.value,
                "max_workers": self._max_workers,
                "threads": len(self._workers),
                "idle": self._idle,
                "running": self._running,
                "abandoned": self._abandoned,
                "queued": self._queued,
                "completed": self._completed,
                "failed": self._failed,
                "cancelled": self._cancelled,
            }

    async def aclose(self, *, timeout: float | None = None) -> None:
        """Close the pool and wait for its threads to exit.

        New calls are refused with :class:`PoolClosedError`. Calls still queued
        are not started: their awaiters get ``PoolClosedError``. Running calls
        get their :class:`StopToken` set and are waited for, up to ``timeout``
        seconds (``None``: as long as they take). Threads still busy after the
        timeout are abandoned (they are daemon threads, so they never keep the
        process alive) and logged with the function they run.

        Closing twice is allowed; the second call waits like the first.
        """
        timeout = check_close_timeout(timeout, "ThreadPool.aclose")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._begin_close(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            self._report_stuck(f"after waiting {timeout} s in aclose()")
            with self._lock:
                self._state = PoolState.CLOSED
            return
        self._join_threads()

    def close(self, *, timeout: float | None = None) -> None:
        """Close the pool from sync code (not from a running loop's thread).

        Same semantics as :meth:`aclose`, blocking the calling thread.

        Raises:
            WouldDeadlockError: called on a running event loop's thread, or
                from one of this pool's own worker threads (it would wait for
                itself to exit).
        """
        timeout = check_close_timeout(timeout, "ThreadPool.close")
        refuse_blocking_close(self)
        self._refuse_own_thread("close()")
        done = threading.Event()
        self._begin_close(done)
        if not done.wait(timeout):
            self._report_stuck(f"after waiting {timeout} s in close()")
            with self._lock:
                self._state = PoolState.CLOSED
            return
        self._join_threads()

    def __repr__(self) -> str:
        with self._lock:
            return self._describe()

    def _describe(self) -> str:
        # The repr without taking _lock, for messages built while holding it.
        abandoned = f" ({self._abandoned} abandoned)" if self._abandoned else ""
        return (
            f"<ThreadPool {self._name!r} {self._state.value}: {self._running} running"
            f"{abandoned}, {self._queued} queued, "
            f"{len(self._workers)}/{self._max_workers} threads>"
        )

    # -- internals ----------------------------------------------------------

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

    def _submit(self, call: OffloadFuture[Any]) -> None:
        spawn = False
        with self._lock:
            if self._state is not PoolState.OPEN:
                raise PoolClosedError(
                    f"{self._describe()} is {self._state.value} and takes no new calls; "
                    f"create a new ThreadPool or use offloop.to_thread()."
                )
            self._queued += 1
            if self._idle > 0:
                self._idle -= 1
            elif not self._workers:
                spawn = True
                worker = Worker()
                self._workers.append(worker)
            else:
                self._backlog += 1
                loop = call.loop
                if len(self._workers) < self._max_workers and loop not in self._growth_loops:
                    self._growth_loops.add(loop)
                    loop.call_later(GROWTH_PERIOD, self._check_growth, loop)
        self._queue.put(call)
        if spawn:
            try:
                self._start_thread(worker)
            except BaseException:
                with self._lock:
                    taken = call._phase is not QUEUED  # by a thread another call started
                    if not taken:
                        # run() raises, so the call must never run: a later
                        # thread takes it off the queue and drops it.
                        call._phase = SKIPPED
                        self._queued -= 1
                if not taken:
                    raise

    def _check_growth(self, loop: asyncio.AbstractEventLoop) -> None:
        # Runs on ``loop``, every GROWTH_PERIOD while calls queue.
        new: list[Worker] = []
        with self._lock:
            room = self._max_workers - len(self._workers)
            if self._state is not PoolState.OPEN or self._backlog == 0 or room <= 0:
                self._growth_loops.discard(loop)
                return
            stale = monotonic() - GROWTH_PERIOD
            blocked = sum(1 for w in self._workers if w.call is not None and w.started < stale)
            for _ in range(min(self._backlog, room, blocked)):
                worker = Worker()
                self._workers.append(worker)
                new.append(worker)
            self._backlog -= len(new)
        for i, worker in enumerate(new):
            try:
                self._start_thread(worker)
            except Exception:
                logger.exception("offloop: pool %r could not start a worker thread", self._name)
                # The queued calls wait for a busy thread to come free. No retry
                # every period (and a log line each time): the next call that
                # queues arms the check again.
                with self._lock:
                    for unstarted in new[i + 1 :]:
                        self._workers.remove(unstarted)
                        self._backlog += 1
                    self._growth_loops.discard(loop)
                return
        loop.call_later(GROWTH_PERIOD, self._check_growth, loop)

    # -- the worker thread ----------------------------------------------------

    def _work(self, worker: Worker) -> None:
        """The body of a worker thread: take calls off the queue and run them."""
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        lock = self._lock
        local = thread_state
        while True:
            # Poll first (see SPIN_WINDOW), then sleep on the queue.
            deadline = monotonic() + SPIN_WINDOW
            polled = False
            while True:
                try:
                    call = get_nowait()
                    polled = True
                    break
                except queue.Empty:
                    if monotonic() > deadline:
                        break
                    yield_cpu()
            if not polled:
                try:
                    call = get(timeout=IDLE_TIMEOUT)
                except queue.Empty:
                    with lock:
                        # Exit only if this thread is unclaimed: a claimed one
                        # has a call on its way.
                        if self._idle > 0 and self._state is PoolState.OPEN:
                            self._idle -= 1
                            self._workers.remove(worker)
                            # Forget threads that are gone, so a long-lived
                            # pool does not collect them forever.
                            self._leaving = [t for t in self._leaving if t.is_alive()]
                            self._leaving.append(threading.current_thread())
                            return
                    continue
            if call is None:  # close() puts one None per worker
                break
            # The phase is read under the lock: cancel() and close() change it
            # under the same lock, so a call is either taken here or skipped
            # there, never both.
            with lock:
                if call._phase is QUEUED and self._state is not PoolState.OPEN:
                    self._skip_closed(call)
                if call._phase is SKIPPED:
                    self._free_slot()
                    skipped = True
                else:
                    skipped = False
                    call._phase = RUNNING
                    self._queued -= 1
                    self._running += 1
                    worker.call = call
                    worker.started = monotonic()
            if skipped:
                if call._error is not None:  # closed before it started: tell the awaiter
                    call._channel.post(call)
                continue
            # Set before the call, so current_token() and from_thread() in the
            # function find the call they belong to.
            local.call = call
            result: Any = None
            try:
                result = call._ctx.run(call.fn, *call._args, **call._kwargs)  # type: ignore[union-attr]
                if type(result) is CoroutineType:
                    result.close()
                    raise TypeError(
                        f"{describe(call.fn)} returned a coroutine instead of a result, so it "
                        f"is async code: 'await' it directly or use offloop.to_loop()."
                    )
                call._value = result
            except BaseException as exc:  # delivered to the awaiter, like any result
                call._error = exc
            local.call = None
            with lock:
                worker.call = None
                self._running -= 1
                if call._phase is ABANDONED:
                    self._abandoned -= 1
                if call._error is None:
                    self._completed += 1
                else:
                    self._failed += 1
                if call._phase is CANCELLING:
                    call._error = DeferredCancel()  # delivered as the cancellation
                call._phase = DONE
                # The slot is freed before the result is posted: the awaiter
                # may submit its next call as soon as it wakes, and must then
                # find this thread idle, not spawn another one for a
                # sequential caller.
                self._free_slot()
            call._channel.post(call)
            # An idle worker must not keep its last call's result, arguments
            # and context alive for up to IDLE_TIMEOUT.
            del call, result
        self._thread_exited(worker)

    def _start_thread(self, worker: Worker) -> None:
        thread = threading.Thread(
            target=self._work,
            args=(worker,),
            name=f"offloop-{self._name}-{next(self._thread_numbers)}",
            daemon=True,
        )
        worker.thread = thread
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._workers.remove(worker)
                self._backlog += 1  # its claimed call waits for the next free thread
                # A close may now wait for no thread at all.
                waiters = self._closed_if_no_worker() if self._state is not PoolState.OPEN else []
            for waiter in waiters:
                complete_waiter(waiter)
            raise

    def _skip_closed(self, call: OffloadFuture[Any]) -> None:
        # Under _lock: a queued call the closing pool will not start.
        call._phase = SKIPPED
        self._queued -= 1
        self._cancelled += 1
        call._error = PoolClosedError(
            f"{self._describe()} closed before this call of {describe(call.fn)} started."
        )

    def _free_slot(self) -> None:
        # Called under _lock by a thread that is about to take the next call.
        if self._backlog > 0:
            self._backlog -= 1
        else:
            self._idle += 1

    def _cancel(self, call: OffloadFuture[Any]) -> bool:
        """Handle ``cancel()`` of a call's future; returns whether to cancel it now."""
        call.token.set("cancelled")
        with self._lock:
            if call._phase is QUEUED:
                call._phase = SKIPPED
                self._queued -= 1
                self._cancelled += 1
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

    def _begin_close(self, waiter: asyncio.Future[None] | threading.Event) -> None:
        running: list[OffloadFuture[Any]] = []
        skipped: list[OffloadFuture[Any]] = []
        with self._lock:
            if self._state is PoolState.OPEN:
                self._state = PoolState.CLOSING
                # Fail queued calls now: with every thread busy or stuck, no
                # worker might ever dequeue them, and their awaiters would hang.
                while True:
                    try:
                        call = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if call is not None and call._phase is QUEUED:
                        self._skip_closed(call)
                        skipped.append(call)
                self._backlog = 0  # nothing is queued any more
                for worker in self._workers:
                    if worker.call is not None:
                        running.append(worker.call)
                    self._queue.put(None)
            closed = not self._workers
            if closed:
                self._state = PoolState.CLOSED
                self._idle = 0
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
        with self._lock:
            self._workers.remove(worker)
            self._leaving.append(threading.current_thread())
            waiters = self._closed_if_no_worker()
        for waiter in waiters:
            complete_waiter(waiter)

    def _closed_if_no_worker(self) -> list[asyncio.Future[None] | threading.Event]:
        # Under _lock, while closing: once no worker is left the pool is closed;
        # returns the waiters to complete (outside the lock).
        if self._workers:
            return []
        self._state = PoolState.CLOSED
        self._idle = 0
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
        self._workers = []
        self._leaving = []
        self._idle = self._backlog = self._running = self._abandoned = self._queued = 0
        self._growth_loops = weakref.WeakSet()
        self._closed_waiters = []
        if self._state is not PoolState.OPEN:
            self._state = PoolState.CLOSED

    def _stuck_calls(self) -> list[tuple[str, str]]:
        with self._lock:
            return [
                (w.thread.name if w.thread else "?", describe(w.call.fn))
                for w in self._workers
                if w.call is not None
            ]

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

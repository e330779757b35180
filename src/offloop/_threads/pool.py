"""Thread pools: run blocking sync functions without stalling the event loop.

This is offloop's hot path: :class:`ThreadPool`, its ``run()`` and the loop
its worker threads run (:meth:`ThreadPool._work`). Where a new call goes
(``_submit``, the per-iteration batches) is in ``dispatch.py``; the periodic
check that dispatches pending calls (``_rebalance``) in ``growth.py``; how
threads start and end in ``lifecycle.py``; how the pool closes in
``closing.py``; its name, sizes, statistics and repr in ``view.py``.
``ThreadPool`` inherits all five; this
docstring states the state they share. The call
record is the :class:`~offloop.OffloadFuture` of ``_core/offload.py``, whose
:class:`~offloop._core.offload.CallPhase` lists the states of a call and the
legal transitions between them; its result travels back to the awaiting loop
through that module's ``Channel``.

One call, in order::

    run()           loop thread: a future in phase QUEUED; _submit() dispatches
                    it (hands it to the thread that went idle last, or puts
                    it on the queue for a new thread) if a CPU slot is free,
                    else it waits in _pending. While an
                    earlier call of this loop iteration waits in _pending, it
                    joins the loop's batch instead (phase BATCHED), which
                    _flush() hands to the pool at the next iteration
    _work()         worker: takes it (QUEUED -> RUNNING), runs fn in the
                    caller's copied context, records the outcome (-> DONE),
                    takes the next pending call if a slot is free, then posts
                    the finished call to the Channel
    Channel.drain() loop thread: sets the future's result or exception
    _rebalance()    loop thread (growth.py), every GROWTH_PERIOD (FULL_PERIOD when
                    every thread is busy) while calls are pending:
                    marks running calls that wait (workers.py) and dispatches
                    pending calls into the CPU slots they free

Counters, all guarded by ``_lock``, and what stays true between two
critical sections:

- ``len(_workers)`` threads are started (or about to be: ``_unstarted``)
  and have not exited; never more than ``max_workers``, except after
  ``max_workers`` was lowered, until enough of them end.
- ``_queued`` calls are in phase QUEUED: dispatched (handed to a thread or
  on the queue) or in ``_pending``.
  Calls in a loop's batch (phase BATCHED) are not counted anywhere until
  ``_flush`` takes them in; a call cancelled there only counts as cancelled.
  ``_ready`` calls are dispatched, each with a thread claimed for it:
  handed to an idle thread (its ``Worker.hand``) or on the queue; a call
  cancelled there stays counted until its worker takes and drops it.
  ``_running`` calls are in a worker, in phase RUNNING, ABANDONED or
  CANCELLING; ``_abandoned`` of them ABANDONED;
  ``_waiting`` of them marked as waiting (their worker's ``waiting``).
- ``_ready + _running - _waiting``, the calls that may use the CPU, grows
  past ``_cpu_slots`` only when a call marked waiting turns out to compute
  (until its next reading: WAITING_REREAD for one presumed to wait, else
  JUDGE_AFTER),
  after ``cpu_slots`` or ``max_workers`` was lowered, or for a moment, when
  a call of a function known to wait (``_waits``) is dispatched and not yet
  taken.
- The threads on the ``_idle`` stack wait for a call, each on its own
  ``Worker.wake`` (or are about to: one that just went idle may still be
  posting its last result, without a sink, or starting threads), and are
  claimed by none; a dispatched call claims the
  one on top (handed to it) or a new thread (on the queue, which only
  threads that are not idle read). ``_backlog`` dispatched calls lost the
  thread they claimed (it failed to start): an idle thread is sent to the
  queue for each, or else the next thread that comes free takes them
  instead of becoming idle; with no thread left, they go back to
  ``_pending``. ``_retiring`` threads were above a lowered
  ``max_workers`` and were handed a None, or have one on the queue, to end
  them; they count neither as idle nor as claimed.
- A call cancelled in ``_pending`` leaves it at once; one cancelled once
  dispatched stays there (handed or on the queue), SKIPPED, until the
  worker that takes it drops it.
- Every call in ``_gil_calls`` (gil.py) is of a function ``_gil_fns`` knows
  (or knew when it went in), and dispatched or running; none is pending.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic
from types import CoroutineType, FunctionType
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast, final

from .._core.latency import CALL_BUCKETS, new_counts
from .._core.offload import (
    ABANDONED,
    BATCHED,
    CANCELLING,
    DONE,
    QUEUED,
    RUNNING,
    SKIPPED,
    Channel,
    DeferredCancel,
    OffloadFuture,
    channel_for,
    loop_local,
    running_loop,
)
from .._core.poolbase import PoolState
from .._core.poolexecutor import PoolExecutorView
from .._core.registry import register
from .._core.spin import SpinTuner, poll_lock
from .._core.token import thread_state
from .._core.validate import (
    REFUSED_CODE_FLAGS,
    check_bool,
    check_positive_int,
    check_sync_callable,
    check_thread_name,
    describe,
)
from .batch import MapResults
from .dispatch import ThreadPoolDispatch
from .gil import GilMemory, learn_gil
from .growth import GROWTH_PERIOD
from .workers import DEFAULT_CPU_SLOTS, TAKE_QUEUED, WaitMemory, Worker

__all__ = ["DEFAULT_MAX_WORKERS", "ThreadPool"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger: Final = logging.getLogger("offloop")

#: Default bound on a pool's threads. Blocking calls are usually I/O waits, so
#: more threads than cores pay off; 40 matches anyio's default limiter and is
#: low enough that a flood of calls queues instead of spawning hundreds of threads.
DEFAULT_MAX_WORKERS: Final = 40

_get_running_loop: Final = asyncio.get_running_loop
_copy_context: Final = contextvars.copy_context
_OPEN: Final = PoolState.OPEN

#: Seconds an idle worker waits for work before its thread exits.
IDLE_TIMEOUT: Final = 30.0

#: Seconds an idle worker polls for its next call before it sleeps, where
#: that pays (its pool's SpinTuner measures it: _core/spin.py). A call that
#: arrives while it polls costs no wake-up of the worker, which on some
#: machines is most of a sequential round trip.
SPIN_WINDOW: Final = 50e-6

OnCancel = Literal["abandon", "wait"]


_pool_numbers: Final = iter(range(1, 1 << 62))


@final
class ThreadPool(ThreadPoolDispatch):
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
        cpu_slots: the most calls that run at once while they compute
            (default :data:`~offloop._threads.workers.DEFAULT_CPU_SLOTS`, one
            more than the CPUs this process may use); calls that wait in I/O,
            a sleep or a lock hold none. Never more than ``max_workers``. See
            :attr:`cpu_slots`.

    Example::

        async with offloop.ThreadPool(4, name="db") as pool:
            rows = await pool.run(query, "select 1", timeout=5)
    """

    _kind = "thread"  # the kind label of its /metrics series

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        name: str | None = None,
        on_cancel: OnCancel = "abandon",
        cpu_slots: int | None = None,
    ) -> None:
        check_positive_int(max_workers, "ThreadPool(max_workers=...)")
        check_positive_int(cpu_slots, "ThreadPool(cpu_slots=...)")
        if on_cancel not in ("abandon", "wait"):
            raise ValueError(
                f"ThreadPool(on_cancel=...) must be 'abandon' or 'wait', got {on_cancel!r}."
            )
        check_thread_name(name, "ThreadPool")
        self._name = name or f"pool{next(_pool_numbers)}"
        #: How error messages name the call (the default pool says offloop.to_thread()).
        self._run_name = f"ThreadPool {self._name!r}.run()"
        self._max_workers = max_workers or DEFAULT_MAX_WORKERS
        #: The most calls that run at once while they use the CPU (see
        #: workers.py): the setting, never more than max_workers.
        self._cpu_slots_setting = cpu_slots or DEFAULT_CPU_SLOTS
        self._cpu_slots = min(self._max_workers, self._cpu_slots_setting)
        self._wait_on_cancel = on_cancel == "wait"
        self._on_cancel = on_cancel
        self._state = PoolState.OPEN
        self._lock = threading.Lock()
        # Read only by threads that are not idle: the first call of a new
        # thread, calls whose thread failed to start, and the None that
        # tells a thread to exit. Idle threads are handed theirs (_idle);
        # calls wait in _pending until dispatched.
        self._queue: queue.SimpleQueue[OffloadFuture[Any] | None] = queue.SimpleQueue()
        self._pending: deque[OffloadFuture[Any]] = deque()
        self._workers: list[Worker] = []
        # Threads that left _workers but may still be returning from work():
        # close() joins them so that none outlives the pool.
        self._leaving: list[threading.Thread] = []
        self._thread_numbers = iter(range(1, 1 << 62))
        # The counters, guarded by _lock: the module docstring states what
        # each one counts and what stays true between critical sections.
        self._idle: list[Worker] = []
        # Whether idle threads poll before they sleep (_core/spin.py).
        self._spin = SpinTuner(SPIN_WINDOW)
        self._backlog = 0
        self._retiring = 0
        self._queued = 0
        self._ready = 0
        self._running = 0
        self._waiting = 0
        # Set by a worker that finished a call shorter than GROWTH_PERIOD while
        # calls were pending; read and cleared by _rebalance.
        self._short = False
        # Workers whose threads are wanted but not started yet, and whether a
        # thread is starting them (see _want_started).
        self._unstarted: list[Worker] = []
        self._starting = False
        self._start_wanted = -1.0  # since when (monotonic); -1: not wanted
        # Which functions' calls were found waiting (see workers.py).
        self._waits = WaitMemory()
        # Which functions hold the GIL, and the calls of theirs dispatched
        # and not ended: at most one starts while any runs (see gil.py).
        self._gil_fns = GilMemory()
        self._gil_calls: set[OffloadFuture[Any]] = set()
        self._abandoned = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        # Run times of the calls that ended, under _lock: per-bucket counts
        # (CALL_BUCKETS, then +Inf) and their sum in seconds.
        self._call_counts = new_counts()
        self._call_seconds = 0.0
        # Queue waits of the same calls (from run() to a worker taking the
        # call), recorded with their run time, so both histograms count the
        # same calls.
        self._wait_counts = new_counts()
        self._wait_seconds = 0.0
        # The result channels (one per loop) of the loops with a rebalancing
        # check armed. Each loop whose calls wait in _pending arms its own, so
        # a loop that stopped or blocks cannot keep the pool from dispatching
        # for the others. Channels, not loops: a channel holds its loop only
        # weakly, so a loop closed with its check armed does not stay alive
        # here, and a set of them is tested in C on every pending call (a
        # WeakSet's test is Python code).
        self._armed: set[Channel] = set()
        self._closed_waiters: list[asyncio.Future[None] | threading.Event] = []
        self._unposted: list[OffloadFuture[Any]] = []  # refused at close, not yet told
        register(self)

    # -- public API ---------------------------------------------------------

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
        # new_call() inlined: this is the per-call cost of a fan-out.
        call: OffloadFuture[R] = OffloadFuture(loop=loop)
        call.fn = fn
        call.loop = loop
        call._args = args
        call._kwargs = kwargs
        call._ctx = _copy_context()
        call._error = None
        call._value = None
        channel = loop_local.channel
        if channel is None or channel.loop_ref() is not loop:
            channel = channel_for(loop)
        call._channel = channel
        call._owner = self
        call._token = None
        call._sink = loop_local.sink
        call._submitted = monotonic()
        batch = channel.batch
        if batch is not None and channel.batch_owner is self and self._state is _OPEN:
            # Calls before it in this loop iteration found the pool busy: it
            # joins them, and the pool takes them all at once (dispatch.py).
            call._phase = BATCHED
            batch.append(call)
            return call
        call._phase = QUEUED
        self._submit(call)
        return call

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        /,
        *,
        chunksize: int | None = None,
        ordered: bool = True,
    ) -> MapResults[R]:
        """Run ``fn(item)`` for every item, in batches; ``async for`` the results.

        ``chunksize`` items go to each pool call (``None``: start at one and
        grow while calls are quick, so blocking items still run in parallel
        and tiny ones cost little). Results come in order, or as they finish
        with ``ordered=False``. See :class:`~offloop._threads.batch.MapResults`
        for errors, cancellation and closing.

        Raises:
            TypeError, ValueError: ``fn`` is not a sync callable, or
                ``chunksize`` not a positive int (before anything runs).
        """
        if type(fn) is not FunctionType or fn.__code__.co_flags & REFUSED_CODE_FLAGS:
            check_sync_callable(fn, f"ThreadPool {self._name!r}.map()", "offloop.to_loop()")
        check_positive_int(chunksize, "ThreadPool.map(chunksize=...)")
        check_bool(
            ordered, "ThreadPool.map(ordered=...)", "get the results in the order of the items"
        )
        return MapResults(self, fn, iterable, chunksize=chunksize, ordered=ordered)

    def executor(self) -> PoolExecutorView:
        """A ``concurrent.futures.Executor`` whose calls run in this pool (``submit``, ``map``).

        Give it to ``loop.set_default_executor()`` and ``asyncio.to_thread``
        and ``run_in_executor(None, ...)`` (in third-party code too) go
        through this pool, under its ``max_workers``; cancelling their
        awaiter sets the call's stop token. ``shutdown()`` waits for the
        view's calls and leaves the pool open: close the pool yourself (which
        shuts its views down too).
        """
        return PoolExecutorView(self)

    # -- the worker thread ----------------------------------------------------

    def _work(self, worker: Worker, starts_others: bool = False) -> None:
        """The body of a worker thread: take calls and run them."""
        if not self._launched(worker):
            return  # its start was given up, interrupted (see _start_thread)
        if starts_others:
            self._start_others()
        get = self._queue.get
        poll = worker.wake.acquire
        spin = self._spin
        lock = self._lock
        local = thread_state
        worker.tid = threading.get_native_id()
        # The next call to run, taken from _pending when the last one ended;
        # None: wait for one.
        call: OffloadFuture[Any] | None = None
        # Whether this thread is on the _idle stack, waiting to be handed its
        # next call; if not, that call (or the None that ends the thread) is
        # on the queue already, or about to be (see _free_slot).
        idle = False
        # When this thread last went idle (monotonic), and the poll window it
        # used; 0: its call came off the queue.
        parked = window = 0.0
        while True:
            if call is None:
                if idle:
                    # Poll first where that pays (_core/spin.py), then sleep on the lock.
                    window = spin.window
                    parked = monotonic()
                    if not poll_lock(poll, parked + window):
                        while not poll(True, IDLE_TIMEOUT):
                            if self._idle_exit(worker):
                                return
                            # Handed something as the wait timed out: the
                            # lock is released already.
                    hand = worker.hand
                    worker.hand = None
                    idle = False
                    if hand is TAKE_QUEUED:
                        hand = get()
                        parked = 0.0
                else:
                    hand = get()
                    parked = 0.0
                if hand is None:  # close() or a lowered max_workers; see _retiring
                    break
                call = cast("OffloadFuture[Any]", hand)
                hand = None  # as with result below: an idle worker keeps nothing
                # The phase is read under the lock: cancel() and close() change
                # it under the same lock, so a call is either taken here or
                # skipped there, never both.
                with lock:
                    self._ready -= 1
                    if call._phase is QUEUED and self._state is not PoolState.OPEN:
                        self._skip_closed(call)
                    if call._phase is SKIPPED:
                        self._gil_calls.discard(call)
                        idle = self._free_slot(worker)
                        skipped = True
                    else:
                        skipped = False
                        call._phase = RUNNING
                        self._queued -= 1
                        self._running += 1
                        worker.call = call
                        worker.started = monotonic()
                        if parked:
                            spin.record(worker.started - parked, window)
                        if self._waits and self._waits.waits(call.fn):
                            # Its function's last call waited: it holds no
                            # slot until the check finds otherwise.
                            worker.waiting = worker.presumed = True
                            self._waiting += 1
                if skipped:
                    if call._error is not None:  # closed before it started: tell the awaiter
                        call._channel.post(call)
                    call = None
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
            if self._lock is not lock:
                # The function forked, and this is the child: _forget_threads
                # gave the child's pool a fresh state that this thread is no
                # part of, so it must not touch the counters.
                return
            with lock:
                worker.call = None
                worker.presumed = False
                self._running -= 1
                if worker.waiting:
                    worker.waiting = False
                    self._waiting -= 1
                    if (worker.judged and worker.seen == worker.started) or (
                        worker.in_io and worker.io_read >= worker.started
                    ):
                        # Measured waiting when it ended: its function's
                        # next calls take a thread without a slot.
                        self._waits.remember(call, True)
                elif worker.judged and worker.seen == worker.started:
                    # Measured computing: its function must wait twice in a
                    # row again before its calls skip the slots.
                    self._waits.remember(call, False)
                if self._gil_calls:
                    self._gil_calls.discard(call)
                if worker.gil_at == worker.started or self._gil_fns:
                    learn_gil(worker, call, self._gil_fns)
                if call._phase is ABANDONED:
                    self._abandoned -= 1
                if call._error is None:
                    self._completed += 1
                else:
                    self._failed += 1
                # Run time: worker.started was stamped when this thread took
                # the call, so one clock read and a bisect is the whole cost.
                started = worker.started
                ended = monotonic()
                ran = ended - started
                self._call_counts[bisect_left(CALL_BUCKETS, ran)] += 1
                self._call_seconds += ran
                waited = started - call._submitted
                self._wait_counts[bisect_left(CALL_BUCKETS, waited)] += 1
                self._wait_seconds += waited
                if call._phase is CANCELLING:
                    call._error = DeferredCancel()  # delivered as the cancellation
                call._phase = DONE
                # The slot is freed before the result is posted: the awaiter
                # may submit its next call as soon as it wakes, and must then
                # find this thread free, not start another one for a
                # sequential caller.
                nxt = self._next_pending(worker, ended) if self._pending else None
                # A sink (the executor view's) completes its future in this
                # thread, which runs the future's done callbacks: user code,
                # which may wait for another call of this pool. Were this
                # thread idle meanwhile, that call would be handed to it, and
                # wait for itself. So it goes idle after posting (below).
                sink = call._sink
                if nxt is None and sink is None:
                    idle = self._free_slot(worker)
                starts = self._unstarted and self._starter_wanted()
            call._channel.post(call)
            if nxt is None and sink is not None:
                with lock:
                    # A call made meanwhile found no thread idle: it waits
                    # in _pending, and this thread takes it as it would have.
                    nxt = self._next_pending(worker, monotonic()) if self._pending else None
                    if nxt is None:
                        idle = self._free_slot(worker)
            if starts:
                self._start_others()
            # An idle worker must not keep its last call's result, arguments
            # and context alive for up to IDLE_TIMEOUT.
            del result
            call = nxt
        self._thread_exited(worker)

    def _next_pending(self, worker: Worker, now: float) -> OffloadFuture[Any] | None:
        # Under _lock, by a worker whose call just ended: take the next pending
        # call if a CPU slot is free, and run it without a trip through the
        # queue. A dispatched call waiting for a thread (_backlog) goes first.
        if (
            self._backlog > 0
            or self._ready + self._running - self._waiting >= self._cpu_slots
            or len(self._workers) - self._retiring > self._max_workers
        ):
            return None
        if now - worker.started < GROWTH_PERIOD:
            self._short = True
        if self._gil_calls:  # a GIL-holding call runs: its peers wait (gil.py)
            i = self._pending_index()
            if i < 0:
                return None
            call = self._pending[i]
            del self._pending[i]
        else:
            pending = self._pending
            while pending:
                call = pending.popleft()
                if call._phase is QUEUED:  # else cancelled while pending
                    break
            else:
                return None
        if self._gil_fns and self._gil_fns.holds(call.fn):
            self._gil_calls.add(call)  # see gil.py
        call._phase = RUNNING
        self._queued -= 1
        self._running += 1
        worker.call = call
        worker.started = now
        if self._waits and self._waits.waits(call.fn):
            worker.waiting = worker.presumed = True  # as in _work
            self._waiting += 1
        return call

    def _free_slot(self, worker: Worker) -> bool:
        # Under _lock, by a worker with no call to run next: returns whether
        # it went idle (onto the _idle stack, to be handed its next call);
        # if not, what it runs next is on the queue, or about to be.
        if self._backlog > 0:
            self._backlog -= 1  # a call that lost its thread: this one takes it
            return False
        if self._state is not _OPEN:
            return False  # close() put this thread's None on the queue
        if len(self._workers) - self._retiring > self._max_workers:
            # Above a lowered max_workers: this thread ends instead of
            # waiting for calls.
            self._retiring += 1
            self._queue.put(None)
            return False
        # On top of the stack: the next call goes to the thread that went
        # idle last, which may still be polling and has its stack and
        # caches warm, not to one that has slept longest. The bottom of the
        # stack, which a steady trickle of calls never reaches, ages out
        # (IDLE_TIMEOUT).
        self._idle.append(worker)
        return True

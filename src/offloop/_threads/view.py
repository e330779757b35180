"""A ThreadPool seen from outside: its name, its size settings, statistics, histograms and repr.

The base of :class:`~offloop.ThreadPool`'s layers (``lifecycle.py``, then
``closing.py``, ``growth.py``, ``dispatch.py`` and ``pool.py`` on top). It declares the state
they all share, which ``pool.py`` describes and sets up in
``ThreadPool.__init__``, and reads it under the pool's lock.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from .._core.latency import CallHistogram, histogram_snapshot
from .._core.offload import Channel, OffloadFuture
from .._core.poolbase import CallCounters, PoolContext, PoolState
from .._core.validate import check_positive_int
from .gil import GilMemory
from .workers import Worker

__all__ = ["ThreadPoolStatistics", "ThreadPoolView"]


class ThreadPoolStatistics(CallCounters):
    """What :meth:`ThreadPool.statistics` returns."""

    threads: int
    #: Running calls that wait (I/O, sleep, locks) and hold no CPU slot.
    waiting: int
    cpu_slots: int
    gil_bound: int


class ThreadPoolView(PoolContext):
    """The pool seen from outside: name, sizes, statistics, histograms, repr."""

    # Set up by ThreadPool.__init__; see pool.py for what each one holds.
    _name: str
    _lock: threading.Lock
    _queue: queue.SimpleQueue[OffloadFuture[Any] | None]
    _pending: deque[OffloadFuture[Any]]
    _workers: list[Worker]
    _leaving: list[threading.Thread]
    _closed_waiters: list[asyncio.Future[None] | threading.Event]
    _unposted: list[OffloadFuture[Any]]
    _armed: set[Channel]
    _call_counts: list[int]
    _call_seconds: float
    _wait_counts: list[int]
    _wait_seconds: float
    _idle: list[Worker]
    _backlog: int
    _retiring: int
    _queued: int
    _ready: int
    _running: int
    _waiting: int
    _gil_fns: GilMemory
    _gil_calls: set[OffloadFuture[Any]]
    _abandoned: int
    _short: bool
    _unstarted: list[Worker]
    _starting: bool
    _start_wanted: float
    _cancelled: int
    _thread_numbers: Iterator[int]
    _max_workers: int
    _cpu_slots: int
    _cpu_slots_setting: int
    _completed: int
    _failed: int
    _wait_on_cancel: bool

    @property
    def name(self) -> str:
        """The pool's name, as used in thread names."""
        return self._name

    @property
    def max_workers(self) -> int:
        """The most threads this pool runs at once; settable while it runs.

        Raising it lets pending calls start more threads at the next check.
        Lowering it ends the idle threads above it at once, and busy ones as
        their call ends (a running call is never interrupted): no call starts
        while that many threads or more run. ``cpu_slots`` follows it when it
        drops below the ``cpu_slots`` setting.

        Raises:
            TypeError, ValueError: (on set) not a positive int.
        """
        return self._max_workers

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        check_positive_int(value, "ThreadPool.max_workers = ...", allow_none=False)
        with self._lock:
            self._max_workers = value
            self._cpu_slots = min(value, self._cpu_slots_setting)
            if self._state is PoolState.OPEN:
                # Idle threads above the new bound end now, or they would
                # take new calls beyond it; busy ones end as their call does
                # (pool.py, _work). A worker handed None exits. The bottom
                # of the stack first: the threads idle longest.
                surplus = len(self._workers) - self._retiring - value
                idle = self._idle
                for _ in range(min(surplus, len(idle))):
                    # Handed with no call from taking the thread off the
                    # stack to waking it (see Worker's docs): a thread lost
                    # so would keep a close waiting for ever.
                    worker = idle[0]
                    del idle[0]
                    self._retiring += 1
                    worker.hand = None
                    worker.wake.release()

    @property
    def cpu_slots(self) -> int:
        """The most calls that run at once while they compute; settable while it runs.

        Calls that wait (I/O, a sleep, a lock) hold no slot, so this bounds
        only the threads that compete with the loop's thread for the cores
        and the GIL. The default, one more than the CPUs this process may use,
        keeps the cores busy while a computing call waits for the GIL; set
        the CPU count or fewer for the least loop lag under CPU-bound work.
        It never exceeds ``max_workers`` (a higher setting applies up to it).

        Raises:
            TypeError, ValueError: (on set) not a positive int.
        """
        return self._cpu_slots

    @cpu_slots.setter
    def cpu_slots(self, value: int) -> None:
        check_positive_int(value, "ThreadPool.cpu_slots = ...", allow_none=False)
        with self._lock:
            self._cpu_slots_setting = value
            self._cpu_slots = min(self._max_workers, value)

    def statistics(self) -> ThreadPoolStatistics:
        """A snapshot of the pool's counters.

        Keys: ``state``, ``max_workers``, ``threads``, ``idle``, ``running``
        (including abandoned calls), ``waiting`` (running, but blocked in I/O,
        a sleep or a lock, so holding no CPU slot), ``cpu_slots`` (the most
        calls that run at once while using the CPU), ``gil_bound`` (functions
        whose calls run one at a time, as they contend for the GIL),
        ``abandoned`` (cancelled by their awaiter but still running),
        ``queued`` (not started yet; a loop's calls made while the pool was
        busy count from its next iteration, when they reach the pool in one
        batch), ``completed``, ``failed``, ``cancelled``.

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
                "idle": len(self._idle),
                "running": self._running,
                "waiting": self._waiting,
                "cpu_slots": self._cpu_slots,
                "gil_bound": self._gil_fns.bound(),
                "abandoned": self._abandoned,
                "queued": self._queued,
                "completed": self._completed,
                "failed": self._failed,
                "cancelled": self._cancelled,
            }

    def call_durations(self) -> CallHistogram:
        """A histogram of how long the pool's calls ran in their worker thread.

        From the moment a thread took a call to the moment the function
        returned or raised (time spent queued is not included; see
        ``statistics()["queued"]`` for the backlog). Cumulative counts per
        upper bound in seconds (:data:`~offloop._core.latency.CALL_BUCKETS`,
        then ``inf``), Prometheus-style, with the ``sum`` and ``count`` of
        every call that ended, completed or failed.
        """
        with self._lock:
            counts = list(self._call_counts)
            total = self._call_seconds
        return histogram_snapshot(counts, total)

    def queue_waits(self) -> CallHistogram:
        """A histogram of how long the pool's calls waited before a thread took them.

        From ``run()`` to the moment a worker thread took the call: the
        time queued behind busy threads, plus a thread's wake-up. Recorded
        when the call ends, alongside its run time, so it counts the same
        calls as :meth:`call_durations` (a call's submit-to-done time is
        the sum of both). Same shape as :meth:`call_durations`.
        """
        with self._lock:
            counts = list(self._wait_counts)
            total = self._wait_seconds
        return histogram_snapshot(counts, total)

    def __repr__(self) -> str:
        # Without the lock: a repr is asked for where waiting could deadlock
        # (a signal handler's log line that interrupted the lock's holder, a
        # debugger, a failure report of a thread that holds it), and a
        # snapshot of counters that move anyway needs no lock.
        return self._describe()

    def _describe(self) -> str:
        # The repr without taking _lock, for messages built while holding it.
        abandoned = f" ({self._abandoned} abandoned)" if self._abandoned else ""
        return (
            f"<ThreadPool {self._name!r} {self._state.value}: {self._running} running"
            f"{abandoned}, {self._queued} queued, "
            f"{len(self._workers)}/{self._max_workers} threads>"
        )

"""A thread pool's worker threads: the loop each one runs (offloop's hot path).

The pool's bookkeeping (queue, counters, growth, closing) lives in
``_threadpool``; this module is what runs in the threads it starts.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from time import monotonic
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Final

from ._offload import ABANDONED, CANCELLING, DONE, QUEUED, RUNNING, SKIPPED, DeferredCancel
from ._poolbase import PoolState
from ._token import thread_state
from ._validate import describe

if TYPE_CHECKING:
    from ._offload import OffloadFuture
    from ._threadpool import ThreadPool

__all__ = ["IDLE_TIMEOUT", "SPIN_WINDOW", "Worker", "work", "yield_cpu"]

#: Seconds an idle worker waits for work before its thread exits.
IDLE_TIMEOUT: Final = 30.0

#: Seconds a worker keeps polling for its next call before it sleeps on the
#: queue. Waking a sleeping thread costs ~20 us here (a futex wake plus the
#: scheduler); a worker that is still polling when the next call of a
#: sequential ``await`` loop arrives takes it at once. Measured on this 2-core
#: machine: round trip 24 us with the poll versus 48 us without. Polling
#: yields the CPU and the GIL on every turn, and is bounded by this window.
SPIN_WINDOW: Final = 50e-6

yield_cpu: Final[Callable[[], object]] = getattr(os, "sched_yield", lambda: time.sleep(0))


class Worker:
    """A worker thread and the call it runs now (read by close() and at exit)."""

    __slots__ = ("call", "started", "thread")

    def __init__(self) -> None:
        self.call: OffloadFuture[Any] | None = None
        self.started = 0.0
        self.thread: threading.Thread | None = None


def work(pool: ThreadPool, worker: Worker) -> None:
    """The body of a worker thread: take calls off the pool's queue and run them."""
    get = pool._queue.get
    get_nowait = pool._queue.get_nowait
    lock = pool._lock
    local = thread_state
    while True:
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
                    if pool._idle > 0 and pool._state is PoolState.OPEN:
                        pool._idle -= 1
                        pool._workers.remove(worker)
                        # Forget threads that are gone, so a long-lived
                        # pool does not collect them forever.
                        pool._leaving = [t for t in pool._leaving if t.is_alive()]
                        pool._leaving.append(threading.current_thread())
                        return
                continue
        if call is None:
            break
        with lock:
            if call._phase is QUEUED and pool._state is not PoolState.OPEN:
                pool._skip_closed(call)
            if call._phase is SKIPPED:
                pool._free_slot()
                skipped = True
            else:
                skipped = False
                call._phase = RUNNING
                pool._queued -= 1
                pool._running += 1
                worker.call = call
                worker.started = monotonic()
        if skipped:
            if call._error is not None:
                call._channel.post(call)
            continue
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
            pool._running -= 1
            if call._phase is ABANDONED:
                pool._abandoned -= 1
            if call._error is None:
                pool._completed += 1
            else:
                pool._failed += 1
            if call._phase is CANCELLING:
                call._error = DeferredCancel()  # delivered as the cancellation
            call._phase = DONE
            pool._free_slot()
        call._channel.post(call)
        del call, result
    pool._thread_exited(worker)

"""How a ProcessPool handles the end of a worker process (mixed into WorkerSet).

A worker's process sentinel is always watched by the manager thread, whoever
reads its replies: :meth:`WorkerExits._on_exit` reads what the worker wrote
before it died, then fails its call with :class:`WorkerCrashed` (or sends the
call again if the worker never took it), and closes its pipe. ``_abort``
closes the whole pool when the manager thread itself fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import signal
import threading
from collections import deque
from typing import TYPE_CHECKING, Final

from .._core.errors import PoolClosedError, WorkerCrashed
from .._core.offload import ABANDONED, DONE, QUEUED, RUNNING
from .._core.poolbase import PoolState, complete_waiter
from .._core.validate import describe
from .records import MANAGER, ProcessCall, ProcessWorker, close_lsock

__all__ = ["WorkerExits"]

logger: Final = logging.getLogger("offloop")


class WorkerExits:
    """Worker deaths and the manager thread's failure (mixed into WorkerSet)."""

    if TYPE_CHECKING:
        _lock: threading.Lock
        _state: PoolState
        _where: str
        _workers: list[ProcessWorker]
        _idle: list[ProcessWorker]
        _pending: deque[ProcessCall]
        _closed_waiters: list[asyncio.Future[None] | threading.Event]
        _running: int
        _queued: int
        _failed: int
        _crashed: int
        _killed_all: bool

        def _describe(self) -> str: ...
        def _next_pending(self) -> ProcessCall | None: ...
        def _on_reply(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None: ...
        def _drop_pipe(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None: ...
        def _finish(
            self, worker: ProcessWorker, call: ProcessCall, *, ok: bool, count: bool = True
        ) -> None: ...

    def _requeue(self, worker: ProcessWorker, call: ProcessCall) -> bool:
        """Queue again, first in line, a call its dead worker never took.

        Under _lock. That worker died idle (kill -9, the OOM killer) before
        the manager noticed, and run() or the manager gave it the call. Only
        once: a call whose very reading kills workers (a huge message) must
        fail, not kill them forever. A worker that died while starting keeps
        its error, for the same reason.
        """
        if (
            call._payload is None
            or call._requeued
            or not worker.ready
            or call._phase is not RUNNING
            or self._state is not PoolState.OPEN
            or worker.received is None
            or worker.received.value >= worker.sent
        ):
            return False
        call._requeued = True
        worker.call = None
        call._worker = None
        call._phase = QUEUED
        self._running -= 1
        self._queued += 1
        self._pending.appendleft(call)
        return True

    def _on_exit(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        # A reply written just before the exit is still in the pipe: read it
        # first (max_tasks_per_worker exits right after its last reply).
        with self._lock:
            worker.dead = True
            worker.doomed = True
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
            if worker.reader is not None:
                # A loop reading its reply no longer does: the manager reads
                # what the worker wrote before it died, or fails the call.
                worker.reader = MANAGER
            watcher = worker.watcher
            if watcher is None or watcher.is_closed():
                # No loop watches the loops' descriptor (a closed loop's
                # selector is gone): closed here, else by that loop.
                worker.watcher = None
                close_lsock(worker)
        while worker.conn is not None and worker.call is not None and worker.conn.poll(0):
            self._on_reply(worker, selector)
        process = worker.process
        assert process is not None
        selector.unregister(process.sentinel)
        process.join()
        exitcode = process.exitcode
        process.close()
        self._drop_pipe(worker, selector)
        with self._lock:
            self._workers.remove(worker)
            call = worker.call
            if call is None:
                return
            if self._requeue(worker, call):
                return  # _maintain, next, starts a worker for it
            cancelled = call._phase is ABANDONED
            # Killed by a close that timed out, not a crash of its own.
            killed = self._killed_all
            if not cancelled and not killed:
                self._crashed += 1
            # A call whose worker died after it was cancelled (killed on cancel,
            # most often) is counted as cancelled only, not also as failed.
            self._finish(worker, call, ok=False, count=not cancelled)
        if cancelled:
            return  # killed on cancel, or died after its awaiter left
        if killed:
            call._error = PoolClosedError(
                f"{self._describe()} killed the worker running {describe(call.fn)} because "
                f"close() or aclose() timed out before the call finished."
            )
        elif not worker.ready:
            call._error = WorkerCrashed(
                f"A new worker process (pid {worker.pid}) of {self._where} died while "
                f"starting, {_exit_reason(exitcode)}, before it ran the call of "
                f"{describe(call.fn)}. Only this call failed; the next call starts another "
                f"worker. Check that the pool's initializer does not exit or crash, and, with "
                f"the 'spawn' or 'forkserver' start method, that the main module can be "
                f"imported again in a new process: guard the script's entry point with "
                f"'if __name__ == \"__main__\":'.",
                exitcode=exitcode,
                pid=worker.pid,
            )
        else:
            call._error = WorkerCrashed(
                f"The worker process (pid {worker.pid}) of {self._where} running "
                f"{describe(call.fn)} died {_exit_reason(exitcode)}. Only this call failed: "
                f"the pool has dropped that worker and keeps serving.",
                exitcode=exitcode,
                pid=worker.pid,
            )
        call._channel.post(call)

    def _abort(self, exc: BaseException) -> None:
        """Close the pool at once after its manager thread failed; fail every call."""
        logger.error(
            "The manager thread of %s failed; the pool is closed.", self._where, exc_info=exc
        )
        with self._lock:
            self._state = PoolState.CLOSED
            calls = []
            while (call := self._next_pending()) is not None:
                calls.append(call)
                call._phase = DONE
                call._payload = None
                self._failed += 1
            self._pending.clear()
            workers, self._workers, self._idle = self._workers, [], []
            for worker in workers:
                # Loops watching a worker let go of it on their next callback.
                worker.dead = True
                worker.reader = MANAGER
                if worker.watcher is None or worker.watcher.is_closed():
                    worker.watcher = None
                    close_lsock(worker)
                call = worker.call
                if call is not None:
                    calls.append(call)
                    # An abandoned call was counted as cancelled already.
                    self._finish(worker, call, ok=False, count=call._phase is not ABANDONED)
            waiters, self._closed_waiters = self._closed_waiters, []
        for worker in workers:
            process = worker.process
            with contextlib.suppress(Exception):
                if process is not None:
                    process.kill()
                    process.join()
                    process.close()
                if worker.conn is not None:
                    worker.conn.close()
        for call in calls:
            call._error = PoolClosedError(
                f"{self._where} broke while running or queueing the call of "
                f"{describe(call.fn)}: its manager thread failed ({type(exc).__name__}: {exc}), "
                f"so the pool closed itself and killed its workers. Create a new ProcessPool; "
                f"please report this as a bug in offloop if it was not caused by the process "
                f"running out of memory."
            )
            call._error.__cause__ = exc
            call._channel.post(call)
        for waiter in waiters:
            complete_waiter(waiter)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"from {name} (exit code {exitcode})"
    return f"with exit code {exitcode}"

"""The worker half of a ProcessPool: its processes, their pipes, and the manager thread.

:class:`WorkerSet` owns the state both halves share (the lock, the workers,
the queue, the counters) and everything that runs on the manager thread:
starting workers, reading the replies no loop reads, and handing freed
workers their next call. Mixed into it: the replies a call's own event loop
reads (``loopread.py``) and worker deaths, which fail their call alone with
:class:`WorkerCrashed` (``exits.py``). The records it works on are in
``records.py``; the thread's loop, which holds the pool only weakly, is in
``manager.py``. :class:`~offloop._process.pool.ProcessPool` adds the public
API, cancellation and closing on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import selectors
import socket
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any

from .._core.errors import WorkerCrashed
from .._core.latency import CALL_BUCKETS, CallHistogram, histogram_snapshot, new_counts
from .._core.offload import ABANDONED, DONE, QUEUED, RUNNING
from .._core.poolbase import PoolState, complete_waiter
from .._core.validate import describe
from .child import worker_main
from .exits import WorkerExits
from .loopread import READ_MAX, LoopReplies, read_rest
from .pickling import InitFailure, RemoteTraceback, decode_reply
from .records import MANAGER, ProcessCall, ProcessWorker, ask_to_exit, send_to
from .writer import Payload, PayloadWriter, is_small

__all__ = ["WorkerSet"]


class WorkerSet(LoopReplies, WorkerExits):
    """Shared state of a process pool, and the manager thread that runs its workers."""

    _pdeathsig = True  # tests switch it off to exercise the fallback watcher

    def __init__(
        self,
        name: str,
        max_workers: int,
        ctx: BaseContext,
        init: bytes | None,
        max_tasks: int | None,
    ) -> None:
        self._name = name
        self._max_workers = max_workers
        self._ctx = ctx
        self._init = init
        self._max_tasks = max_tasks
        self._where = f"ProcessPool {name!r}"
        #: How error messages name the call (the default pool says offloop.to_process()).
        self._run_name = f"{self._where}.run()"
        self._state = PoolState.OPEN
        self._lock = threading.Lock()
        self._workers: list[ProcessWorker] = []
        self._idle: list[ProcessWorker] = []
        self._pending: deque[ProcessCall] = deque()
        # Workers whose replies the manager reads from now on, handed over
        # by a loop or run() (see loopread.py); the manager watches their pipes.
        self._adopt: list[ProcessWorker] = []
        # Scratch space of the loops reading replies (used under _lock).
        self._scratch = bytearray(READ_MAX)
        self._manager: threading.Thread | None = None
        self._wake_fds: tuple[int, int] | None = None
        #: Set with the manager thread: stops it, and warns, if the pool is dropped unclosed.
        self._finalizer: weakref.finalize[..., Any] | None = None
        self._closed_waiters: list[asyncio.Future[None] | threading.Event] = []
        self._writer = PayloadWriter(f"offloop-process-{name}-writer")
        self._queued = 0
        self._running = 0
        self._abandoned = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._crashed = 0
        # Times from handing a call to a worker to its reply (see call_durations).
        self._call_counts = new_counts()
        self._call_seconds = 0.0
        # Times from run() to handing the call to a worker (see queue_waits).
        self._wait_counts = new_counts()
        self._wait_seconds = 0.0
        # Set once close()/aclose() timed out and killed the workers.
        self._killed_all = False

    def _disown_workers(self) -> None:
        """In a child made by ``os.fork()``: forget the parent's workers and close.

        The child's copy of the pool must never send them calls, nor kill
        them at exit; it is closed, and a new pool works as usual.
        """
        self._lock = threading.Lock()
        for worker in self._workers:
            if worker.lsock is not None:
                # The parent's descriptor, inherited like the others: left open.
                worker.lsock.detach()
                worker.lsock = None
        self._workers = []
        self._idle = []
        self._adopt = []
        self._pending.clear()
        if self._finalizer is not None:
            # The parent's manager thread is not here to stop, nor its workers.
            self._finalizer.detach()
        self._manager = None
        self._wake_fds = None
        self._closed_waiters = []
        # The parent's writer thread does not exist here; its pending
        # descriptors are the child's copies, like every other inherited one.
        self._writer = PayloadWriter(f"offloop-process-{self._name}-writer")
        self._queued = self._running = self._abandoned = 0
        self._state = PoolState.CLOSED

    def call_durations(self) -> CallHistogram:
        """A histogram of how long calls took from being handed to a worker to its reply.

        Includes pickling both ways and the start of a worker process started
        for the call; not the time queued. Same shape as
        :meth:`ThreadPool.call_durations`; completed and failed calls alike.
        """
        with self._lock:
            counts, total = list(self._call_counts), self._call_seconds
        return histogram_snapshot(counts, total)

    def queue_waits(self) -> CallHistogram:
        """A histogram of how long calls waited from ``run()`` until handed to a worker.

        The time queued behind busy workers (a worker started for the call
        counts in :meth:`call_durations`, not here). Recorded when the call
        ends, so it counts the same calls as :meth:`call_durations`.
        """
        with self._lock:
            counts, total = list(self._wait_counts), self._wait_seconds
        return histogram_snapshot(counts, total)

    def _describe(self) -> str:
        abandoned = f" ({self._abandoned} abandoned)" if self._abandoned else ""
        crashed = f", {self._crashed} crashed" if self._crashed else ""
        return (
            f"<ProcessPool {self._name!r} {self._state.value}: {self._running} running"
            f"{abandoned}, {self._queued} queued, "
            f"{len(self._workers)}/{self._max_workers} processes{crashed}>"
        )

    # -- calls (any thread; _assign and _next_pending under _lock) ------------

    def _assign(self, worker: ProcessWorker, call: ProcessCall) -> None:
        worker.call = call
        worker.assigned = time.monotonic()
        worker.sent += 1
        call._worker = worker
        call._phase = RUNNING
        self._running += 1

    def _next_pending(self) -> ProcessCall | None:
        pending = self._pending
        while pending:
            call = pending.popleft()
            if call._phase is QUEUED:
                self._queued -= 1
                return call
        return None

    def _send(self, worker: ProcessWorker, call: ProcessCall) -> None:
        # Under _lock (see send_to).
        payload = call._payload
        assert payload is not None
        if not is_small(payload):
            # A large payload is not kept: only a call that could not be
            # handed to the writer (its worker is dead) can be sent again.
            fd = self._dup_pipe(worker)
            if fd is not None:
                call._payload = None
            self._send_later(fd, payload)
            return
        # If the worker just died, the manager sees the death and queues the
        # call again.
        send_to(worker, payload)

    def _dup_pipe(self, worker: ProcessWorker) -> int | None:
        # On the manager thread, which alone closes pipes, or under _lock,
        # since the manager detaches a pipe under it before closing it: so the
        # descriptor is this worker's, not a closed or reused one.
        conn = worker.conn
        if conn is None:
            return None  # it died; the manager handles its call
        try:
            # A worker speaks only to answer a call, and its answer to the
            # last one was read: a pipe with something to read is at its end,
            # the worker is dead.
            if conn.poll(0):
                return None
            return os.dup(conn.fileno())
        except (OSError, ValueError):
            return None

    def _send_later(self, fd: int | None, payload: Payload) -> None:
        # A large call goes to the writer thread: the worker may take long to
        # read it, and neither the loop's thread nor the manager may wait.
        if fd is not None:
            self._writer.submit(fd, payload)

    # -- the manager thread ------------------------------------------------------

    def _on_events(
        self, events: list[tuple[selectors.SelectorKey, int]], selector: selectors.BaseSelector
    ) -> bool:
        """Handle one batch of the manager thread's events. Returns True once the pool closed.

        The loop around it (``manager.manage``) holds the pool only
        for the batch.
        """
        for key, _ in events:
            data = key.data
            if data is None:  # the wake pipe (or the drop pipe of a pool alive after all)
                with contextlib.suppress(BlockingIOError):
                    os.read(key.fd, 4096)
            elif data[1]:
                self._on_reply(data[0], selector)
            else:
                self._on_exit(data[0], selector)
        self._adopt_workers(selector)
        return self._maintain(selector)

    def _adopt_workers(self, selector: selectors.BaseSelector) -> None:
        """Watch the pipes of the workers whose replies the manager reads from now on."""
        with self._lock:
            if self._pending or self._state is not PoolState.OPEN:
                # Calls wait for a worker, or the pool closes: one whose loop
                # closed while it ran a call nobody awaited would never be
                # read by that loop.
                for worker in self._workers:
                    reader = worker.reader
                    if isinstance(reader, asyncio.AbstractEventLoop) and reader.is_closed():
                        self._to_manager(worker)
            adopted, self._adopt = self._adopt, []
            for worker in adopted:
                conn = worker.conn
                if worker.reader is MANAGER and conn is not None and not worker.mwatch:
                    selector.register(conn.fileno(), selectors.EVENT_READ, (worker, True))
                    worker.mwatch = True

    def _close_wake_pipe(self) -> None:
        # On the manager thread as it exits. Under _lock: see ProcessPool._wake.
        with self._lock:
            fds, self._wake_fds = self._wake_fds, None
        for fd in fds or ():
            os.close(fd)

    def _maintain(self, selector: selectors.BaseSelector) -> bool:
        """Start workers for queued calls; finish closing. Returns True to exit."""
        while True:
            with self._lock:
                if self._state is not PoolState.OPEN:
                    if self._workers:
                        return False
                    self._state = PoolState.CLOSED
                    waiters, self._closed_waiters = self._closed_waiters, []
                    for waiter in waiters:
                        complete_waiter(waiter)
                    return True
                if len(self._workers) >= self._max_workers:
                    return False
                call = self._next_pending()
                if call is None:
                    return False
                worker = ProcessWorker(None)
                self._workers.append(worker)
                self._assign(worker, call)
            self._spawn(worker, call, selector)

    def _spawn(
        self, worker: ProcessWorker, call: ProcessCall, selector: selectors.BaseSelector
    ) -> None:
        try:
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            received = self._ctx.RawValue(ctypes.c_uint64, 0)
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(
                    child_conn,
                    os.getpid(),
                    self._init,
                    self._max_tasks,
                    self._pdeathsig,
                    received,
                ),
                name=f"offloop-process-{self._name}",
            )
            process.start()
        except BaseException as exc:
            with self._lock:
                self._workers.remove(worker)
                self._finish(worker, call, ok=False)
            call._error = exc
            call._channel.post(call)
            return
        # Without the parent's copy of the child's end, the worker's death
        # shows as end-of-file on ours.
        child_conn.close()
        lsock = socket.socket(fileno=os.dup(parent_conn.fileno()))
        # Made while socket.setdefaulttimeout() is in force, it would have a
        # timeout, and so make the pipe non-blocking, for conn too: the
        # manager's reads of a reply would fail half-way. Loops read it
        # without blocking either way (MSG_DONTWAIT).
        lsock.setblocking(True)
        with self._lock:
            worker.process = process
            worker.conn = parent_conn
            worker.lsock = lsock
            worker.pid = process.pid
            worker.received = received
            worker.reader = MANAGER  # its first message, and its first call's reply
            worker.mwatch = True
            kill = worker.doomed
        selector.register(parent_conn.fileno(), selectors.EVENT_READ, (worker, True))
        selector.register(process.sentinel, selectors.EVENT_READ, (worker, False))
        if kill:
            # kill_on_cancel or aclose's timeout fired while the process started.
            with contextlib.suppress(OSError, ValueError):
                process.kill()
        # Else the call is sent once the worker says it is ready (_start_first).

    def _finish(
        self, worker: ProcessWorker, call: ProcessCall, *, ok: bool, count: bool = True
    ) -> None:
        # Under _lock: the call left its worker, with a result or not.
        worker.call = None
        call._worker = None
        self._settle(call, worker.assigned, ok=ok, count=count)

    def _settle(self, call: ProcessCall, assigned: float, *, ok: bool, count: bool = True) -> None:
        # Under _lock: the counts of a call detached from its worker.
        call._payload = None  # it may not have been sent (start-up failed, worker died)
        self._running -= 1
        if call._phase is ABANDONED:
            self._abandoned -= 1
        if not count:
            pass
        elif ok:
            self._completed += 1
        else:
            self._failed += 1
        if count:
            ran = time.monotonic() - assigned
            self._call_counts[bisect_left(CALL_BUCKETS, ran)] += 1
            self._call_seconds += ran
            # A call sent again after its worker died waited until its last hand-over.
            waited = assigned - call._submitted
            self._wait_counts[bisect_left(CALL_BUCKETS, waited)] += 1
            self._wait_seconds += waited
        call._phase = DONE

    def _on_reply(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        conn = worker.conn
        if conn is None:
            return  # its exit, handled earlier in the same batch, closed the pipe
        if worker.reader is not MANAGER:
            with self._lock:
                self._unwatch_pipe(worker, selector)
            return  # cannot happen: the manager stops watching before it lets go
        try:
            prefix = worker.prefix
            if prefix is None:
                data = conn.recv_bytes()
            else:
                worker.prefix = None
                data = read_rest(conn, prefix)
        except (EOFError, OSError):
            # The process is exiting; its sentinel reports how.
            self._drop_pipe(worker, selector)
            return
        if not data:
            worker.ready = True  # its start-up is over
            self._start_first(worker, selector)
            return
        call = worker.call
        if call is None:
            return  # cannot happen: a worker only speaks when spoken to
        ok, outcome = decode_reply(data, call.fn, self._run_name)
        count = True
        if not ok and isinstance(outcome, InitFailure):
            outcome = self._init_failure(worker, call, outcome)
            worker.doomed = True  # it exits after this reply
            # A call cancelled while its worker started never ran: counted as cancelled only.
            count = call._phase is not ABANDONED
        with self._lock:
            self._finish(worker, call, ok=ok, count=count)
            worker.tasks += 1
            if self._max_tasks is not None and worker.tasks >= self._max_tasks:
                worker.doomed = True  # exits on its own after this reply
            following, stop = self._free(worker)
            if following is None:
                # Idle (or exiting): a loop may take it and read its replies.
                worker.reader = None
                self._unwatch_pipe(worker, selector)
            if following is not None:
                self._send(worker, following)
            elif stop:
                ask_to_exit(worker)
        if ok:
            call._value = outcome
        else:
            call._error = outcome
        call._channel.post(call)

    def _free(self, worker: ProcessWorker) -> tuple[ProcessCall | None, bool]:
        """Under _lock: give a worker whose call is over its next call, or make it idle.

        Returns the call to send it, and whether to tell it to stop.
        """
        if worker.doomed:
            return None, False
        if self._state is not PoolState.OPEN or (
            len(self._workers) > self._max_workers and self._live_workers() > self._max_workers
        ):
            # Closing, or max_workers was lowered below the processes alive.
            worker.doomed = True
            return None, True
        following = self._next_pending()
        if following is not None:
            self._assign(worker, following)
        else:
            self._idle.append(worker)
        return following, False

    def _live_workers(self) -> int:
        """Under _lock: the processes that will take more calls (not told to exit)."""
        return sum(1 for w in self._workers if not w.doomed)

    def _start_first(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        # The first call waits until the worker is ready rather than in its
        # pipe: one cancelled while the worker started (a slow initializer)
        # is then never run, like any call that was still queued.
        call = worker.call
        if call is None:
            return
        with self._lock:
            if call._phase is not ABANDONED:
                following: ProcessCall | None = call
                stop = False
            else:
                self._finish(worker, call, ok=False, count=False)  # counted as cancelled
                worker.sent -= 1  # assigned, never written: not a call the worker may take
                following, stop = self._free(worker)
                if following is None:
                    worker.reader = None
                    self._unwatch_pipe(worker, selector)
            if following is not None:
                self._send(worker, following)
            elif stop:
                ask_to_exit(worker)

    def _init_failure(
        self, worker: ProcessWorker, call: ProcessCall, failure: InitFailure
    ) -> WorkerCrashed:
        error = WorkerCrashed(
            f"A new worker process (pid {worker.pid}) of {self._where} could not start: its "
            f"initializer {failure.summary}. The call of {describe(call.fn)} it was started "
            f"for did not run; fix the initializer (the next call starts another worker).",
            pid=worker.pid,
        )
        cause: BaseException = RemoteTraceback(failure.tb, "the worker process")
        if failure.exc is not None:
            failure.exc.__cause__ = cause
            cause = failure.exc
        error.__cause__ = cause
        return error

    def _unwatch_pipe(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        # Under _lock, on the manager thread: before a worker is idle, since
        # run() may then make a loop its reader.
        if worker.mwatch and worker.conn is not None:
            selector.unregister(worker.conn.fileno())
        worker.mwatch = False

    def _drop_pipe(self, worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        conn = worker.conn
        if conn is None:
            return
        with self._lock:  # see _dup_pipe
            self._unwatch_pipe(worker, selector)
            worker.conn = None
        conn.close()

"""Process pools whose workers can die without taking the pool with them.

``concurrent.futures.ProcessPoolExecutor`` marks itself broken for good when
one worker dies. Here the parent owns each worker: a process with its own
duplex pipe, and a record of the one call it runs. A worker that dies fails
exactly that call with :class:`WorkerCrashed` and is replaced.

Threads and wake-ups, per pool: one manager thread, named
``offloop-process-<pool>``, waits (epoll) on every worker's process sentinel,
and on the pipes of the workers whose replies it reads. ``run()`` writes a
small call straight to an idle worker's pipe from the event loop's thread, and
that loop reads the reply itself (``loopread.py``): a round trip costs two pipe
writes and two wake-ups, the worker's and the loop's. The manager reads the
rest (large replies, queued calls it hands out, loops without ``add_reader``)
and completes those futures through the loop's batching channel (one
``call_soon_threadsafe`` per burst). The stdlib pool adds a feeder thread and
a management thread hop on each side. A large call (over 64 KiB pickled) would
block whoever writes it until the worker has read it, so a second thread,
``offloop-process-<pool>-writer``, writes those (see ``writer.py``).
The manager thread also starts every worker, which matters on Linux: the
parent-death signal is tied to the thread that forked the child.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from typing import Any, Final, ParamSpec, TypeVar, final

from .._core.cpus import available_cpus
from .._core.errors import PoolClosedError
from .._core.offload import ABANDONED, QUEUED, RUNNING, SKIPPED, OffloadFuture, new_call
from .._core.offload import running_loop as _running_loop
from .._core.poolbase import (
    PoolContext,
    PoolState,
    complete_waiter,
    refuse_blocking_close,
)
from .._core.poolexecutor import PoolExecutorView, shut_views_of
from .._core.registry import pools_of, register
from .._core.validate import (
    check_bool,
    check_close_timeout,
    check_positive_int,
    check_sync_callable,
    check_thread_name,
    describe,
)
from .manager import manage, pool_dropped
from .message import OutOfBandCall, detach
from .options import check_initializer
from .pickling import encode_call, main_reaches_children
from .records import ProcessCall, ProcessPoolStatistics, ask_to_exit
from .workers import WorkerSet
from .writer import LARGE_PAYLOAD, Payload

__all__ = ["ProcessPool"]

P = ParamSpec("P")
R = TypeVar("R")

#: Start method used unless ``mp_context`` says otherwise. "fork" copies a
#: process that runs threads (the event loop's, the pool's manager), which can
#: deadlock the child on a lock some thread held; "forkserver" keeps a server
#: process alive for the rest of the program. "spawn" starts a fresh
#: interpreter: slower to start (it imports the program again), but safe everywhere.
DEFAULT_START_METHOD: Final = "spawn"

#: Seconds interpreter exit waits for the pools' killed workers to be reaped.
_EXIT_WAIT: Final = 2.0

#: Seconds aclose() gives exited workers to be reaped, after any kill.
_REAP_TIMEOUT: Final = 10.0

_pool_numbers: Final = iter(range(1, 1 << 62))


@final
class ProcessPool(WorkerSet, PoolContext):
    """A pool of worker processes for CPU-bound functions, healing from crashes.

    ``await pool.run(fn, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` in one
    of at most ``max_workers`` processes, so CPU-bound work neither holds the
    GIL of the event loop's process nor delays the loop. Processes start on
    demand and are reused. Functions, arguments and results are pickled:
    with the ``offloop[process]`` extra (cloudpickle) lambdas and closures work.

    A worker that dies while running a call (a segfault, ``os._exit``, the OOM
    killer) fails that call alone with :class:`WorkerCrashed`; calls in other
    workers finish, and the pool starts a new worker for the next call.

    Large arguments do not hold up the event loop: ``run()`` pickles the call,
    and a call over 64 KiB pickled is written to its worker by the pool's
    writer thread, however long the worker takes to read it.

    Close a pool when done with it: ``async with ProcessPool(...) as pool:``,
    ``await pool.aclose()`` or ``pool.close()``. A pool that started workers
    and is dropped unclosed (no reference left to it, and no call in flight:
    a call's future keeps its pool alive until the call is over) is stopped
    when it is garbage collected: a :class:`ResourceWarning` names it, its
    idle workers are asked to exit and killed if they have not within 2 s,
    and its threads exit. A pool that never started a worker holds no
    process, thread or pipe, and is collected silently. A pool still open at
    interpreter exit has its workers killed by an exit hook, without a warning.

    Args:
        max_workers: the most processes at once (default: the CPUs this process may
            run on, its CPU affinity; a CPU quota is not seen).
        kill_on_cancel: when the awaiting task is cancelled (or a
            ``wait_for`` times out), kill the worker running the call and start
            a new one. Default ``False``: the call is abandoned, the worker
            finishes it and its result is dropped.
        max_tasks_per_worker: replace each worker after this many calls (frees
            memory that leaky code keeps). Default: never.
        initializer: called as ``initializer(*initargs)`` once in each new
            worker before its first call. If it raises, the call that worker was
            started for fails with :class:`WorkerCrashed`.
        initargs: arguments for ``initializer``.
        mp_context: a :mod:`multiprocessing` context or start method name.
            Default ``"spawn"``: a fresh interpreter per worker, safe with
            threads. With spawn, a script must guard its entry point with
            ``if __name__ == "__main__":``.
        name: used in the manager thread's name, ``repr`` and messages.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: ``max_workers`` or ``max_tasks_per_worker`` is below 1, or
            ``mp_context`` names an unknown start method.
    """

    _kind = "process"  # the kind label of its /metrics series

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        kill_on_cancel: bool = False,
        max_tasks_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[Any] = (),
        mp_context: BaseContext | str | None = None,
        name: str | None = None,
    ) -> None:
        check_positive_int(max_workers, "ProcessPool(max_workers=...)")
        check_positive_int(max_tasks_per_worker, "ProcessPool(max_tasks_per_worker=...)")
        check_thread_name(name, "ProcessPool")
        check_bool(
            kill_on_cancel,
            "ProcessPool(kill_on_cancel=...)",
            "kill a call's worker process when its awaiter is cancelled",
        )
        initargs = check_initializer(initializer, initargs)
        if mp_context is None or isinstance(mp_context, str):
            method = mp_context or DEFAULT_START_METHOD
            try:
                mp_context = multiprocessing.get_context(method)
            except ValueError:
                raise ValueError(
                    f"ProcessPool(mp_context=...) got the unknown start method {method!r}; "
                    f"use one of {multiprocessing.get_all_start_methods()}."
                ) from None
        elif not isinstance(mp_context, BaseContext):
            raise TypeError(
                f"ProcessPool(mp_context=...) must be a multiprocessing context (e.g. "
                f"multiprocessing.get_context('spawn')) or a start method name, got "
                f"{describe(mp_context)}."
            )
        # Cloudpickle sends __main__'s functions by value, slowly; by
        # reference is enough when the workers import __main__ themselves. The
        # initializer too: by value it would set globals of a copy of __main__,
        # not the ones the calls see.
        main_by_value = not main_reaches_children(mp_context.get_start_method())
        init = None
        if initializer is not None:
            init = encode_call(
                initializer,
                initargs,
                {},
                "ProcessPool(initializer=...)",
                main_by_value=main_by_value,
            )
        super().__init__(
            name or f"pool{next(_pool_numbers)}",
            max_workers or available_cpus(),
            mp_context,
            init,
            max_tasks_per_worker,
        )
        self._main_by_value = main_by_value
        self._kill_on_cancel = kill_on_cancel
        register(self)

    # -- public API ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The pool's name, as used in its manager thread's name."""
        return self._name

    @property
    def max_workers(self) -> int:
        """The most processes this pool runs at once; settable while it runs.

        Raising it starts processes for queued calls at once. Lowering it
        asks idle processes above it to exit now, and busy ones as they end
        their call; a running call is never interrupted.

        Raises:
            TypeError, ValueError: (on set) not a positive int.
        """
        return self._max_workers

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        check_positive_int(value, "ProcessPool.max_workers = ...", allow_none=False)
        with self._lock:
            self._max_workers = value
            surplus = self._live_workers() - value
            while surplus > 0 and self._idle:
                worker = self._idle.pop()
                worker.doomed = True
                ask_to_exit(worker)  # under the lock: see send_to
                surplus -= 1
        self._wake()  # the manager starts processes for queued calls (_maintain)

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
        """Run ``fn(*args, **kwargs)`` in a worker process; await the result.

        The call is pickled and queued at once, and the returned future
        resolves to its result (``await`` it, or pass it to ``asyncio.gather``,
        ``asyncio.wait_for`` or ``asyncio.create_task``). Exceptions raised in
        the worker keep their type; the worker's traceback is their
        ``__cause__``. Context variables are not carried to the worker.

        Raises:
            TypeError: ``fn`` is not callable, or is a coroutine or generator function.
            NotPicklableError: the function or an argument cannot be pickled
                (raised here), or the result cannot (raised by the await).
            WorkerCrashed: (by the await) the worker died while running the call.
            RuntimeError: no event loop is running in this thread.
            PoolClosedError: the pool is closing or closed.
        """
        check_sync_callable(fn, self._run_name, "offloop.to_loop()")
        loop = _running_loop(self._run_name)
        # Big bytes arguments are sent as they are, not copied into the pickle
        # on this (the event loop's) thread: see message.py.
        detached = detach(args, kwargs, LARGE_PAYLOAD) if args or kwargs else None
        send_args, send_kwargs = (args, kwargs) if detached is None else detached[:2]
        pickled = encode_call(
            fn, send_args, send_kwargs, self._run_name, main_by_value=self._main_by_value
        )
        payload: Payload = pickled if detached is None else OutOfBandCall(pickled, detached[2])
        large = detached is not None or len(pickled) > LARGE_PAYLOAD  # not is_small(payload)
        call = new_call(self, fn, (), {}, loop, ProcessCall, carry_context=False)
        call._payload = payload
        call._worker = None
        call._requeued = False
        fd = None
        wake = False
        with self._lock:
            if self._state is not PoolState.OPEN:
                raise PoolClosedError(
                    f"{self._describe()} is {self._state.value} and takes no new calls; "
                    f"create a new ProcessPool or use offloop.to_process()."
                )
            idle = self._idle
            if not idle:
                worker = None
            elif idle[-1].watcher is loop:  # the usual case, _take_idle's first choice
                worker = idle.pop()
            else:
                worker = self._take_idle(loop)
            if worker is not None:
                self._assign(worker, call)
                # This loop reads the reply itself if it can (see loopread.py);
                # not for a call completed off the loop (an executor view's),
                # whose submitter may be blocking this very loop on its result.
                if call._sink is not None:
                    wake = self._to_manager(worker)
                elif worker.watcher is loop:  # it watches the pipe already
                    worker.reader = loop
                else:
                    wake = self._read_on_loop(worker, loop)
                if large:
                    fd = self._dup_pipe(worker)
                    if fd is not None:  # else kept: the manager queues it again
                        call._payload = None
                else:
                    # Under _lock, like _dup_pipe: the manager detaches a dead
                    # worker's pipe under it before closing it, so this write
                    # cannot land on a closed descriptor that was reused. An
                    # idle worker's pipe is empty and takes a small call whole.
                    self._send(worker, call)
            else:
                self._queued += 1
                self._pending.append(call)
                if self._manager is None:
                    self._start_manager()
        if worker is None or wake:
            self._wake()
        if worker is not None and large:
            self._send_later(fd, payload)
        return call

    def executor(self) -> PoolExecutorView:
        """A ``concurrent.futures.Executor`` whose calls run in this pool (``submit``, ``map``).

        Usable with ``loop.set_default_executor()`` (then ``asyncio.to_thread``
        sends its functions here: they must pickle) and by libraries taking
        ``executor=``. ``shutdown()`` leaves the pool open: close it yourself
        (which shuts its views down too).
        """
        return PoolExecutorView(self)

    def statistics(self) -> ProcessPoolStatistics:
        """A snapshot of the pool's counters.

        Keys: ``state``, ``max_workers``, ``processes`` (alive or starting),
        ``idle``, ``running`` (including abandoned calls), ``abandoned``
        (cancelled by their awaiter, still running), ``queued``, ``completed``,
        ``failed`` (raised, or lost to a crash), ``cancelled``, ``crashed``
        (workers that died while running a call).

        As in :meth:`ThreadPool.statistics`, ``cancelled`` counts awaiters
        cancelled, and ``completed`` and ``failed`` count functions that
        returned or raised: an abandoned call whose function later returns is
        counted in both ``cancelled`` and ``completed`` (its worker did the
        whole work; nobody used the result). A cancelled call that never ran,
        or whose worker was killed on cancel, is counted as ``cancelled`` only.
        """
        with self._lock:
            return {
                "state": self._state.value,
                "max_workers": self._max_workers,
                "processes": len(self._workers),
                "idle": len(self._idle),
                "running": self._running,
                "abandoned": self._abandoned,
                "queued": self._queued,
                "completed": self._completed,
                "failed": self._failed,
                "cancelled": self._cancelled,
                "crashed": self._crashed,
            }

    async def aclose(self, *, timeout: float | None = None) -> None:
        """Close the pool and wait until every worker process has exited.

        New calls are refused with :class:`PoolClosedError`; queued calls are
        not started (their awaiters get ``PoolClosedError``). Running calls are
        waited for, up to ``timeout`` seconds (``None``: as long as they take);
        then their workers are killed and their awaiters get
        ``PoolClosedError``. Idle workers exit at once. Closing twice is
        allowed; the second call waits like the first.
        """
        timeout = check_close_timeout(timeout, "ProcessPool.aclose")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._begin_close(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            self._kill_all()
            await asyncio.wait_for(asyncio.shield(waiter), _REAP_TIMEOUT)
        self._join_manager()

    def close(self, *, timeout: float | None = None) -> None:
        """Close the pool from sync code (not from a running loop's thread).

        Same semantics as :meth:`aclose`, blocking the calling thread until
        every worker process has exited.

        Raises:
            WouldDeadlockError: called on a thread whose event loop is running;
                use ``await pool.aclose()`` there.
        """
        timeout = check_close_timeout(timeout, "ProcessPool.close")
        refuse_blocking_close(self)
        done = threading.Event()
        self._begin_close(done)
        if not done.wait(timeout):
            self._kill_all()
            done.wait(_REAP_TIMEOUT)
        self._join_manager()

    def __repr__(self) -> str:
        # Without the lock, as ThreadPool's: see there.
        return self._describe()

    def _cancel(self, call: OffloadFuture[Any]) -> bool:
        """Apply the cancel policy when a call's future is cancelled."""
        call.token.set("cancelled")
        victim = None
        with self._lock:
            if call._phase is QUEUED:
                call._phase = SKIPPED
                if isinstance(call, ProcessCall):  # it stays queued until a worker frees up
                    call._payload = None
                self._queued -= 1
                self._cancelled += 1
                return True
            if call._phase is not RUNNING:
                return True
            # Once: the phase is no longer RUNNING after this. Not by whether
            # the token was set already: the close sets it too.
            self._cancelled += 1
            call._phase = ABANDONED
            self._abandoned += 1
            worker = call._worker  # type: ignore[attr-defined]
            wake = False
            if worker is not None:
                watcher = worker.watcher
                if watcher is not None and worker.reader is watcher:
                    # Nobody awaits the call now: its loop may stop or close
                    # before the reply comes, so the manager reads it.
                    wake = self._to_manager(worker)
                    here = asyncio._get_running_loop()
                    if here is not None and here is watcher:
                        self._unwatch(worker, here)
                if self._kill_on_cancel:
                    worker.doomed = True
                    victim = worker.process
        if wake:
            self._wake()
        if victim is not None:
            with contextlib.suppress(OSError, ValueError):
                victim.kill()
        return True

    # -- lifecycle -------------------------------------------------------------

    def _start_manager(self) -> None:
        # Under _lock, on the first call that needs a worker.
        self._wake_fds = _nonblocking_pipe()
        # The finalizer's own pipe: see manager.py.
        drop_fds = _nonblocking_pipe()
        finalizer = weakref.finalize(self, pool_dropped, drop_fds[1], self._where, self._workers)
        # A pool still open at exit is the exit hook's (_stop_workers_at_exit), not the finalizer's.
        finalizer.atexit = False
        self._finalizer = finalizer
        # The thread gets no strong reference to the pool: it must not keep it alive.
        self._manager = threading.Thread(
            target=manage,
            args=(
                weakref.ref(self),
                self._wake_fds,
                drop_fds,
                finalizer,
                self._writer,
            ),
            name=f"offloop-process-{self._name}",
            daemon=True,
        )
        self._manager.start()

    def _wake(self) -> None:
        # Under the lock: the manager closes the pipe under it when it exits,
        # and a write to a closed (maybe reused) descriptor must not happen.
        with self._lock:
            fds = self._wake_fds
            if fds is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(fds[1], b"\0")

    def _begin_close(self, waiter: asyncio.Future[None] | threading.Event) -> None:
        shut_views_of(self)  # their loop threads end with the pool
        skipped: list[ProcessCall] = []
        running: list[ProcessCall] = []
        with self._lock:
            if self._state is PoolState.OPEN:
                self._state = PoolState.CLOSING
                while (call := self._next_pending()) is not None:
                    call._phase = SKIPPED
                    call._payload = None
                    self._cancelled += 1
                    call._error = PoolClosedError(
                        f"{self._describe()} closed before this call of {describe(call.fn)} "
                        f"started."
                    )
                    skipped.append(call)
                stopping, self._idle = self._idle, []
                for worker in stopping:
                    worker.doomed = True
                    ask_to_exit(worker)  # under the lock: see send_to
                running = [w.call for w in self._workers if w.call is not None]
            if self._state is PoolState.CLOSED or self._manager is None:
                self._state = PoolState.CLOSED
                complete_waiter(waiter)
            else:
                self._closed_waiters.append(waiter)
        for call in skipped:
            call._channel.post(call)
        # Outside the lock: token callbacks are user code that may look at the pool.
        for call in running:
            call.token.set("pool closing")
        self._wake()

    def _kill_all(self) -> None:
        with self._lock:
            self._killed_all = True
            victims = [w.process for w in self._workers if w.process is not None]
            for worker in self._workers:
                worker.doomed = True
        for process in victims:
            with contextlib.suppress(OSError, ValueError):
                process.kill()

    def _join_manager(self) -> None:
        manager = self._manager
        if manager is not None and manager is not threading.current_thread():
            # It has completed the waiters and only returns now: microseconds.
            manager.join()


def _disown_workers_after_fork() -> None:
    for pool in pools_of(ProcessPool):
        pool._disown_workers()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_disown_workers_after_fork)


def _nonblocking_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


@atexit.register
def _stop_workers_at_exit() -> None:
    # Runs before multiprocessing's own exit hook (registered earlier), which
    # would otherwise wait for busy workers forever. Each pool closes as
    # close(timeout=0) would: its workers are killed, and its manager thread
    # reaps them and ends. Reaping them here too would race that thread: of
    # two threads waiting for one child, the one that lost saw it gone yet
    # "still running" (Process.close) and failed the pool with an ERROR.
    closing: list[tuple[ProcessPool, threading.Event]] = []
    for pool in pools_of(ProcessPool):
        if pool._finalizer is not None:
            pool._finalizer.detach()  # stopped here, not warned about at teardown
        closed = threading.Event()
        with contextlib.suppress(Exception):  # never fail interpreter exit over a pool
            pool._begin_close(closed)
            pool._kill_all()
            closing.append((pool, closed))
    deadline = time.monotonic() + _EXIT_WAIT
    for pool, closed in closing:
        if closed.wait(max(0.0, deadline - time.monotonic())):
            manager = pool._manager
            if manager is not None:
                # It completed the waiters and only returns now.
                manager.join(max(0.0, deadline - time.monotonic()))

"""The manager thread of a ProcessPool, and what happens when an open pool is dropped.

The manager thread must not keep its pool alive: a pool that its user forgot
to close and dropped would otherwise live, with its worker processes and
threads, until the interpreter exits. So the thread holds the pool only by a
weak reference while it waits, and takes a strong one for each batch of
events (the pool's methods do the work: ``WorkerSet._on_events``). A worker
running a call keeps the pool alive through that call (``worker.call._owner``),
so a dropped pool's calls in flight finish, as does anything awaiting them.

When the pool is collected unclosed, :func:`pool_dropped` (a
``weakref.finalize`` callback) runs on whichever thread dropped the last
reference: maybe one holding any lock, the pool's included, maybe the manager
thread itself. It takes no lock and blocks on nothing: it writes one byte to
the manager's drop pipe and warns (``ResourceWarning``). The manager thread
then stops the workers it still has, each idle by then, and exits.

The drop pipe is the finalizer's alone, so its one byte always fits; the
manager closes it only once that byte arrived, so the finalizer never writes
to a closed (maybe reused) descriptor.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import time
import warnings
import weakref
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final

from .._core.spin import SpinTuner, yield_cpu
from .records import close_lsock
from .writer import PayloadWriter

if TYPE_CHECKING:
    from .records import ProcessWorker
    from .workers import WorkerSet

__all__ = ["manage", "pool_dropped"]

#: Seconds a dropped pool's workers get to exit when asked, before they are killed.
STOP_GRACE: Final = 2.0
#: Seconds the manager polls for its next event before it sleeps. A reply
#: that arrives while it still polls costs no wake-up of this thread: in a
#: chain of calls the manager reads (queued calls it hands out, replies a
#: loop cannot read, see loopread.py) that is one wake-up of two. Long enough
#: to span the caller's turn and the worker's; short enough to be nothing
#: beside a call. Used where that pays: each manager measures it (_core/spin.py).
SPIN_WINDOW: Final = 100e-6
#: Seconds to wait for a killed worker to be reaped, and for the finalizer's byte.
_REAP_WAIT: Final = 5.0


def pool_dropped(drop_fd: int, where: str, workers: list[ProcessWorker]) -> None:
    """The finalizer of an open pool that was garbage collected: wake its manager, warn."""
    # Takes no lock and blocks on nothing: it runs on any thread, maybe one holding some lock.
    count = len(workers)
    with contextlib.suppress(OSError):
        os.write(drop_fd, b"\0")
    processes = f"{count} worker process{'es' if count != 1 else ''}"
    warnings.warn(
        f"{where} was garbage collected without being closed; its manager thread and "
        f"{processes} are being stopped now. Close a pool when done with it: "
        f"'async with ProcessPool(...) as pool:', or 'await pool.aclose()' "
        f"('pool.close()' in sync code).",
        ResourceWarning,
        # Past weakref.finalize: where the last reference went (the user's line, the
        # event loop ending the step that held the last call, or gc.collect()).
        stacklevel=3,
    )


def manage(
    pool_ref: weakref.ref[WorkerSet],
    wake_fds: tuple[int, int],
    drop_fds: tuple[int, int],
    finalizer: weakref.finalize[..., Any],
    writer: PayloadWriter,
) -> None:
    """The manager thread: serve the pool until it closes; stop its workers if it is dropped."""
    selector = selectors.DefaultSelector()
    selector.register(wake_fds[0], selectors.EVENT_READ, None)
    selector.register(drop_fds[0], selectors.EVENT_READ, None)
    pool: WorkerSet | None = None
    polling = SpinTuner(SPIN_WINDOW)
    try:
        while True:
            events = _poll_then_wait(selector, polling)
            pool = pool_ref()
            if pool is None:
                break
            if pool._on_events(events, selector):
                return
            # Nothing on this thread may hold the pool while it waits.
            pool = None
            del events
        _stop_workers(selector)
        with contextlib.suppress(OSError):
            os.close(wake_fds[0])
            os.close(wake_fds[1])
        if _wait_readable(drop_fds[0], _REAP_WAIT):
            for fd in drop_fds:
                os.close(fd)
        # Else the finalizer never ran (interpreter shutdown): its pipe stays open.
    except BaseException as exc:
        # A bug, or a failure of this process (MemoryError): without this
        # thread nothing would ever complete a call or close the pool.
        if pool is None:
            pool = pool_ref()
            if pool is None:
                raise
        pool._abort(exc)
    finally:
        selector.close()
        if pool is not None:
            # Closed (or aborted), not dropped: the finalizer must never run,
            # and the wake pipe is closed under the pool's lock (see _wake).
            finalizer.detach()
            pool._close_wake_pipe()
            for fd in drop_fds:
                os.close(fd)
        # Every worker is gone, so no write is waited for.
        writer.stop()


def _poll_then_wait(
    selector: selectors.BaseSelector, polling: SpinTuner
) -> list[tuple[selectors.SelectorKey, int]]:
    """The next events: polled for :data:`SPIN_WINDOW` where that pays, then waited for."""
    events = selector.select(0)
    if events:
        return events
    window = polling.window
    start = time.monotonic()
    deadline = start + window
    while time.monotonic() < deadline:
        yield_cpu()  # the loop's thread and the worker get the CPU and the GIL
        events = selector.select(0)
        if events:
            break
    else:
        events = selector.select()
    polling.record(time.monotonic() - start, window)
    return events


def _stop_workers(selector: selectors.BaseSelector) -> None:
    """Stop a dropped pool's workers: ask each to exit, kill those that do not, reap all.

    Each is idle or exiting: a worker running a call would have kept the pool alive.
    """
    stopping: dict[int, tuple[ProcessWorker, BaseProcess]] = {}
    for key in selector.get_map().values():
        if key.data is not None:
            worker = key.data[0]
            if worker.process is not None:
                stopping[id(worker)] = worker, worker.process
    for worker, _ in stopping.values():
        # Through conn, which only this thread closes: a loop that watches
        # the worker may close lsock (see loopread._readable).
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.conn.send_bytes(b"")  # type: ignore[union-attr]
    running = {process.sentinel: process for _, process in stopping.values()}
    deadline = time.monotonic() + STOP_GRACE
    while running and (left := deadline - time.monotonic()) > 0:
        for sentinel in wait(list(running), left):
            del running[sentinel]  # type: ignore[arg-type]
    for process in running.values():
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for worker, process in stopping.values():
        with contextlib.suppress(OSError, ValueError):
            process.join(_REAP_WAIT)
            process.close()
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None
        # A loop that still watches the loops' descriptor of an idle worker
        # closes it itself once the pipe ends (see loopread._readable): a
        # descriptor number in a loop's selector must not be reused.
        watcher = worker.watcher
        if watcher is None or watcher.is_closed():
            close_lsock(worker)


def _wait_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))

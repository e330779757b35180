"""The records of a ProcessPool: its call futures, its workers, its statistics.

Shared by the modules that run the pool (``workers.py``, ``exits.py``,
``loopread.py``, ``pool.py``); every field of a worker is guarded by the
pool's lock unless its comment says otherwise.
"""

from __future__ import annotations

import asyncio
import socket
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from .._core.offload import OffloadFuture
from .._core.poolbase import CallCounters
from .writer import Payload, send_small

__all__ = [
    "MANAGER",
    "ProcessCall",
    "ProcessPoolStatistics",
    "ProcessWorker",
    "ask_to_exit",
    "send_to",
]


class _Manager:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MANAGER"


#: ``ProcessWorker.reader`` when the manager thread reads the worker's replies.
MANAGER: Final = _Manager()


class ProcessPoolStatistics(CallCounters):
    """What :meth:`ProcessPool.statistics` returns."""

    processes: int
    crashed: int


class ProcessCall(OffloadFuture[Any]):
    # The future of a process call: the shared OffloadFuture plus the pickled
    # request and the worker running it.
    __slots__ = ("_payload", "_requeued", "_worker")

    # A small call's payload stays until the call is over: if its worker dies
    # before taking it from the pipe, it is sent again (once, see _requeue).
    _payload: Payload | None
    _worker: ProcessWorker | None
    _requeued: bool


class ProcessWorker:
    """One worker process, its pipe, and the call it runs (guarded by the pool's lock)."""

    __slots__ = (
        "assigned",
        "call",
        "conn",
        "dead",
        "doomed",
        "lsock",
        "mwatch",
        "pid",
        "prefix",
        "process",
        "reader",
        "ready",
        "received",
        "sent",
        "tasks",
        "watcher",
    )

    def __init__(self, call: ProcessCall | None) -> None:
        self.call = call
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.tasks = 0
        # Doomed: must not get another call (killed, retiring after
        # max_tasks_per_worker, or told to stop). Dead: its process exited.
        self.doomed = False
        self.dead = False
        # Ready: it said so once its start-up (imports, initializer) was over.
        self.ready = False
        # Calls given to it, and (shared memory the worker writes) calls it
        # took from its pipe: a call it never took did not start.
        self.sent = 0
        self.assigned = 0.0  # monotonic, when it was handed its current call
        self.received: Any = None
        # Who reads the reply to its current call: MANAGER, the event loop
        # of the call (see loopread.py), or None while it runs no call.
        self.reader: object = None
        # The event loop that watches lsock with add_reader, or None. It
        # stays set while the worker is idle, so that a loop's next call to
        # this worker costs no registration; only that loop removes it.
        self.watcher: asyncio.AbstractEventLoop | None = None
        # A second descriptor of the worker's end of the pipe, for loops to
        # watch and read: the manager may close conn (the worker died) while
        # a loop still has this one registered, and a closed number reused
        # by another file must never be in a loop's selector. Closed once
        # no loop watches it (or that loop is closed).
        self.lsock: socket.socket | None = None
        # Manager thread only: conn is registered in the manager's selector.
        self.mwatch = False
        # The first bytes of a reply a loop read but could not finish
        # (loopread.py): the manager reads the rest.
        self.prefix: bytes | None = None


def send_to(worker: ProcessWorker, message: bytes) -> None:
    """Write a small message to a worker; nothing if it died (the manager sees to that).

    Under the pool's lock, which ``lsock`` is closed under while the pool
    lives: the write cannot land on a closed descriptor that was reused.
    Through ``lsock`` (see :func:`~offloop._process.writer.send_small`): to a
    worker that died unnoticed, the write fails with EPIPE instead of raising
    SIGPIPE. A small message to a worker that waits for one (idle, or done
    with its call) never blocks.
    """
    sock = worker.lsock
    if sock is None:
        return  # its process exited
    try:  # noqa: SIM105 - hot path: try/except costs less than contextlib.suppress
        send_small(sock, message)
    except OSError:
        pass


def ask_to_exit(worker: ProcessWorker) -> None:
    """Ask an idle worker to exit: an empty message (its pipe closing does too).

    Under the pool's lock: see :func:`send_to`.
    """
    send_to(worker, b"")


def close_lsock(worker: ProcessWorker) -> None:
    """Close the loops' descriptor of a worker's pipe (no loop watches it)."""
    sock, worker.lsock = worker.lsock, None
    if sock is not None:
        sock.close()

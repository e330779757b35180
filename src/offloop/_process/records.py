"""The records a ProcessPool keeps: one per call, one per worker process, and its statistics.

Both halves of the pool (``workers.py``, the manager thread's; ``pool.py``,
the public API's) read and write them under the pool's lock.
"""

from __future__ import annotations

import contextlib
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .._core.offload import OffloadFuture
from .._core.poolbase import CallCounters
from .writer import Payload

__all__ = ["ProcessCall", "ProcessPoolStatistics", "ProcessWorker", "ask_to_exit"]


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
        "pid",
        "process",
        "ready",
        "received",
        "sent",
        "tasks",
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


def ask_to_exit(worker: ProcessWorker) -> None:
    """Ask an idle worker to exit: an empty message (its pipe closing does too)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        worker.conn.send_bytes(b"")  # type: ignore[union-attr]

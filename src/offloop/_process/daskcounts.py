"""What a DaskPool counts: its calls by outcome, and how long they waited and took.

:class:`DaskCounters` is the half of :class:`~offloop.DaskPool` that
``statistics()``, ``call_durations()`` and ``queue_waits()`` read, the same
reports as the local pools give (so ``/metrics`` shows every pool kind the
same way). ``dask.py`` updates the counters, under the pool's lock, as calls
are taken, handed to the cluster and finished.
"""

from __future__ import annotations

import threading
from time import monotonic
from typing import Any, TypedDict

from .._core.latency import CallHistogram, bucket, histogram_snapshot, new_counts
from .._core.offload import OffloadFuture
from .._core.poolbase import PoolState

__all__ = ["DaskCounters", "DaskPoolStatistics"]


class DaskPoolStatistics(TypedDict):
    """What :meth:`DaskPool.statistics` returns."""

    state: str
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class DaskCounters:
    """The counters and histograms of a DaskPool (all under ``_lock``)."""

    _lock: threading.Lock
    _state: PoolState

    def _init_counters(self) -> None:
        # _running: calls taken by run() and not over; _on_cluster of them
        # were handed to the client (client.submit), _skipped were cancelled
        # before that (their task on the client's loop has yet to drop
        # them), the rest are queued.
        self._running = 0
        self._on_cluster = 0
        self._skipped = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        # Histograms of the calls that reached the cluster and ended (see
        # call_durations and queue_waits).
        self._call_counts = new_counts()
        self._call_seconds = 0.0
        self._wait_counts = new_counts()
        self._wait_seconds = 0.0

    def _record(self, call: OffloadFuture[Any], sent: float) -> None:
        # Under _lock: a call handed to the client at ``sent`` (monotonic) ended.
        ran = monotonic() - sent
        self._call_counts[bucket(ran)] += 1
        self._call_seconds += ran
        waited = sent - call._submitted
        self._wait_counts[bucket(waited)] += 1
        self._wait_seconds += waited

    def statistics(self) -> DaskPoolStatistics:
        """Counters of this pool's calls.

        Keys: ``state``, ``queued`` (taken by :meth:`run`, not yet handed to
        the cluster: waiting for the client's loop, its connection or a
        scatter), ``running`` (handed to the cluster: waiting in the
        scheduler or running on a worker), ``completed``, ``failed``,
        ``cancelled``. As in the local pools, ``completed`` and ``failed``
        count calls whose outcome came back; a cancelled call is counted as
        ``cancelled`` only.
        """
        with self._lock:
            return {
                "state": self._state.value,
                "queued": self._running - self._on_cluster - self._skipped,
                "running": self._on_cluster,
                "completed": self._completed,
                "failed": self._failed,
                "cancelled": self._cancelled,
            }

    def call_durations(self) -> CallHistogram:
        """A histogram of how long calls took on the cluster.

        From handing the call to the client (``client.submit``) to its
        outcome coming back: the scheduler's queue, the transfers and the
        run on a worker (the client cannot tell them apart). Calls that
        reached the cluster and completed or failed; same shape as
        :meth:`ThreadPool.call_durations`.
        """
        with self._lock:
            counts, total = list(self._call_counts), self._call_seconds
        return histogram_snapshot(counts, total)

    def queue_waits(self) -> CallHistogram:
        """A histogram of how long calls waited from :meth:`run` until handed to the client.

        The trip to the client's loop, its connection on the first call and
        scattering; the same calls as :meth:`call_durations`.
        """
        with self._lock:
            counts, total = list(self._wait_counts), self._wait_seconds
        return histogram_snapshot(counts, total)

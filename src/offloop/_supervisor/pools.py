"""``offloop.pools()``: every open pool of the process, for reports of one's own."""

from __future__ import annotations

from typing import cast

from .._core.registry import live_pools
from .._process.dask import DaskPool
from .._process.pool import ProcessPool
from .._threads.pool import ThreadPool

__all__ = ["pools"]


def pools() -> list[ThreadPool | ProcessPool | DaskPool]:
    """Every open pool of this process: the ones ``/metrics`` reports.

    ``ThreadPool``, ``ProcessPool`` and ``DaskPool`` instances that are not
    closed, the default pools included once used, ordered by kind (``dask``,
    ``process``, ``thread``) then name. For an exporter of your own
    (``prometheus_client``, OpenTelemetry), read each one's ``name``,
    ``statistics()``, ``call_durations()`` and ``queue_waits()``. The list
    is a snapshot; the pools are held weakly elsewhere, so a pool nobody
    references still leaves it when it is garbage collected.

    Example::

        for pool in offloop.pools():
            print(pool.name, pool.statistics()["queued"])
    """
    return cast("list[ThreadPool | ProcessPool | DaskPool]", live_pools())

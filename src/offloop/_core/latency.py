"""Fixed-bucket histograms of call durations, recorded by the pools.

A pool records each call's run time (from the moment a worker takes it to the
moment it returns or raises) with :func:`record` while it holds the lock the
completion already takes: one clock read and a bisect into a short tuple, no
allocation. Snapshots are Prometheus-style: cumulative counts per upper bound,
the sum and the count.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final, TypedDict

__all__ = ["CALL_BUCKETS", "CallHistogram", "bucket", "histogram_snapshot", "new_counts"]

#: Upper bounds (seconds) of the call run-time buckets; a last ``+Inf`` bucket
#: takes the rest. From tens of microseconds (a tiny offloaded function) to a
#: minute (a slow request or a batch job).
CALL_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    60.0,
)


class CallHistogram(TypedDict):
    """A snapshot of a pool's call run times.

    ``buckets``: (upper bound in seconds, calls that ran at most that long),
    cumulative, the last bound ``inf``; ``sum``: total seconds; ``count``:
    calls recorded (equal to the last bucket's count).
    """

    buckets: list[tuple[float, int]]
    sum: float
    count: int


def new_counts() -> list[int]:
    """Per-bucket (not cumulative) counts, one more than :data:`CALL_BUCKETS` for ``+Inf``."""
    return [0] * (len(CALL_BUCKETS) + 1)


def histogram_snapshot(counts: list[int], total: float) -> CallHistogram:
    """The cumulative snapshot of ``counts`` (as filled by a pool) and their ``total`` seconds."""
    cumulative = 0
    buckets: list[tuple[float, int]] = []
    for bound, count in zip((*CALL_BUCKETS, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return {"buckets": buckets, "sum": total, "count": cumulative}


#: The bucket index of a duration: ``counts[bucket(seconds)] += 1``. Bounds
#: are inclusive (``le``), hence bisect_left.
def bucket(seconds: float, _bounds: tuple[float, ...] = CALL_BUCKETS) -> int:
    """The index in the counts of a call that ran ``seconds``."""
    return bisect_left(_bounds, seconds)

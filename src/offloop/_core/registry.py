"""The live pools of this process, for whoever reports on all of them.

Every pool kind registers each pool it creates (:func:`register`); the pool
is held weakly, so registering never keeps a pool alive. ``/metrics`` reads
:func:`live_pools` to report pools it was never handed (the default ones
included), and the pool kinds find their own pools here for fork and exit
handling (:func:`pools_of`). The middle layers cannot import each other, so
the registry lives here, and what it knows of a pool is the
:class:`MeteredPool` protocol.

Pool names are free: a program may open several pools under one name (one
per request, say). A report needs one series per pool, so each pool gets a
*label* when it registers (:func:`label_of`): its name, or, while an open
pool of its kind already holds that, the name with ``#2``, ``#3``... (the
lowest free). A label stays with its pool for the pool's life, so a series
never switches pools; a closed pool's label is free for the next one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any, Final, Protocol, TypeVar

from .latency import CallHistogram

__all__ = ["MeteredPool", "label_of", "live_pools", "pools_of", "register"]


class MeteredPool(Protocol):
    """What a registered pool offers a report: its name, kind, counters and histograms."""

    #: The kind of pool, the ``kind`` label of its series: ``thread``, ``process``, ``dask``.
    _kind: str

    @property
    def name(self) -> str:
        """The pool's name, unique per kind for the pools a program names itself."""
        ...

    def statistics(self) -> Mapping[str, Any]:
        """The pool's counters: ``state`` and ints (see ``poolbase.CallCounters``)."""
        ...

    def call_durations(self) -> CallHistogram:
        """How long calls ran (see each pool's method for where the clock starts)."""
        ...

    def queue_waits(self) -> CallHistogram:
        """How long calls waited between ``run()`` and the start of their run."""
        ...


_P = TypeVar("_P")

_pools: Final[weakref.WeakSet[Any]] = weakref.WeakSet()
_labels: Final[weakref.WeakKeyDictionary[Any, str]] = weakref.WeakKeyDictionary()
# Two pools created at once in two threads must not take the same label.
_lock: Final = threading.Lock()


def register(pool: MeteredPool) -> None:
    """Add ``pool`` to the registry, weakly held, for as long as it lives, and label it."""
    with _lock:
        # Every label of an open pool of this kind, not only those of this name:
        # a pool named "db#2" by its program holds that label as well.
        taken = {label_of(p) for p in live_pools() if p._kind == pool._kind}
        label, number = pool.name, 1
        while label in taken:
            number += 1
            label = f"{pool.name}#{number}"
        _labels[pool] = label
        _pools.add(pool)


def label_of(pool: MeteredPool) -> str:
    """The ``pool`` label of ``pool``'s series: unique among the open pools of its kind."""
    return _labels.get(pool, pool.name)


def live_pools() -> list[MeteredPool]:
    """Every pool of this process that is not closed, by kind then name (then label)."""
    found = [p for p in list(_pools) if p.statistics()["state"] != "closed"]
    found.sort(key=lambda p: (p._kind, p.name, label_of(p)))
    return found


def pools_of(kind: type[_P]) -> list[_P]:
    """Every registered pool that is an instance of ``kind``, closed ones included."""
    return [p for p in list(_pools) if isinstance(p, kind)]

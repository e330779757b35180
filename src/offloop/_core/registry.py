"""The live pools of this process, for whoever reports on all of them.

Every pool kind registers each pool it creates (:func:`register`); the pool
is held weakly, so registering never keeps a pool alive. ``/metrics`` reads
:func:`live_pools` to report pools it was never handed (the default ones
included), and the pool kinds find their own pools here for fork and exit
handling (:func:`pools_of`). The middle layers cannot import each other, so
the registry lives here, and what it knows of a pool is the
:class:`MeteredPool` protocol.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Final, Protocol, TypeVar

from .latency import CallHistogram

__all__ = ["MeteredPool", "live_pools", "pools_of", "register"]


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


def register(pool: MeteredPool) -> None:
    """Add ``pool`` to the registry, weakly held, for as long as it lives."""
    _pools.add(pool)


def live_pools() -> list[MeteredPool]:
    """Every pool of this process that is not closed, by kind then name."""
    found = [p for p in list(_pools) if p.statistics()["state"] != "closed"]
    found.sort(key=lambda p: (p._kind, p.name))
    return found


def pools_of(kind: type[_P]) -> list[_P]:
    """Every registered pool that is an instance of ``kind``, closed ones included."""
    return [p for p in list(_pools) if isinstance(p, kind)]

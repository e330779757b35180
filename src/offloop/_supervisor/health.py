"""The supervisor's view of its own loop: how late it runs, and the last blocks the detector saw.

:class:`LoopHealth` runs a timer on the supervisor's loop every
:data:`TICK` seconds and records how late each one fired. That gives:

- the liveness of ``/healthz``: a loop that has not run its timer for longer
  than the probe's threshold (it is blocked right now, or it just came back
  from such a block) is not alive. A probe sent during the block gets no
  answer at all (the status server is on that loop), and one answered just
  after it gets 503, never a 200 that hides the block;
- the lag percentiles (p50/p99 over the last :data:`WINDOW` seconds) of the
  status JSON and the live table, and the lag histogram of ``/metrics``.

A timer callback, not a task: it costs one ``call_at`` per tick and leaves
nothing for a leak check or a cancellation to find. Every reader may be on
another thread (the live table draws from its own): they copy before reading.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .._detect.report import BlockEvent

__all__ = ["LAG_BUCKETS", "TICK", "WINDOW", "LoopHealth"]

#: Seconds between two of the timer's runs: a block shows within one tick.
TICK: Final = 0.1
#: Seconds of ticks the percentiles are computed over.
WINDOW: Final = 60.0
#: How many of the detector's blocks the status keeps (the most recent ones).
LAST_BLOCKS: Final = 10
#: Upper bounds (seconds) of the loop-lag histogram's buckets, ``+Inf`` aside.
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopHealth:
    """Lag samples of the supervisor's loop and the detector's last blocks."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._last_lag = 0.0
        self._samples: collections.deque[float] = collections.deque(maxlen=int(WINDOW / TICK))
        self._buckets = [0] * (len(LAG_BUCKETS) + 1)
        self._sum = 0.0
        self._blocks: collections.deque[tuple[float, BlockEvent]] = collections.deque(
            maxlen=LAST_BLOCKS
        )

    # -- on the loop ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start ticking on ``loop`` (call it from the loop's thread)."""
        self._loop = loop
        self._due = loop.time() + TICK
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        """Stop ticking; the figures stay readable."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self._last_lag = lag
        self._samples.append(lag)
        self._sum += lag
        self._buckets[_bucket(lag)] += 1
        # From now, not from the due time: a long block counts once, not as
        # a burst of late ticks catching up.
        self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)

    def unresponsive_for(self) -> float:
        """Seconds the loop was unresponsive, as seen from the loop just now.

        How overdue the timer is (the loop is only now getting round to it)
        or how late it last fired, whichever is more: both are zero on a loop
        that keeps up. Call it on the loop.
        """
        if self._loop is None or self._handle is None:
            return 0.0
        return max(self._loop.time() - self._due, self._last_lag)

    # -- the detector's blocks (from its monitor thread) ------------------------------------

    def record_block(self, event: BlockEvent) -> None:
        """The supervisor detector's ``on_block``: keep the event, then log it as usual."""
        from .._detect.report import log_block

        if not event.ongoing:
            self._blocks.append((time.time(), event))
        log_block(event)

    # -- from any thread ----------------------------------------------------------------------

    def lag(self) -> dict[str, Any]:
        """The lag over the window, JSON-ready: p50, p99 and max in ms, and the sample count."""
        samples = sorted(list(self._samples))
        if not samples:
            return {
                "p50_ms": None,
                "p99_ms": None,
                "max_ms": None,
                "samples": 0,
                "window_s": WINDOW,
            }

        def pick(q: float) -> float:
            return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3, 3)

        return {
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "max_ms": round(samples[-1] * 1e3, 3),
            "samples": len(samples),
            "window_s": WINDOW,
        }

    def histogram(self) -> tuple[list[int], float]:
        """The lag histogram since the start: per-bucket counts (``+Inf`` last) and the sum."""
        return list(self._buckets), self._sum

    def last_blocks(self) -> list[dict[str, Any]]:
        """The detector's most recent finished blocks, newest last, JSON-ready."""
        return [
            {
                "at": at,
                "file": e.file,
                "line": e.line,
                "function": e.function,
                "duration_ms": round(e.duration_ms, 3),
            }
            for at, e in list(self._blocks)
        ]


def _bucket(value: float) -> int:
    for i, bound in enumerate(LAG_BUCKETS):
        if value <= bound:
            return i
    return len(LAG_BUCKETS)

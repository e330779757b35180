"""The blocking detector at its limits: the GIL, threads, long blocks, bad input.

Every block lasts ten times the threshold or waits for the detector itself, so
the assertions are about what was reported, with wide margins on durations.
"""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path

from offloop import BlockEvent, detect_blocking
from tests.helpers import bounded

HERE = Path(__file__)
THRESHOLD = 0.05
BLOCK = 10 * THRESHOLD

# A PyDLL call keeps the GIL for its whole duration, like a C extension that
# never releases it (sorted() of a big list, json.loads of a huge string).
_GIL_HOLDING_LIBC = ctypes.PyDLL(None)


def line_of(marker: str, path: Path = HERE) -> int:
    """The line of ``path`` that ends with the comment ``# <marker>``."""
    lines = path.read_text().splitlines()
    hits = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times in {path}"
    return hits[0]


def hold_the_gil(seconds: float) -> None:
    _GIL_HOLDING_LIBC.usleep(int(seconds * 1e6))  # BLOCK:gil


# -- blocks that hold the GIL --------------------------------------------------------------


@bounded(20)
async def test_a_block_that_holds_the_gil_is_reported_with_its_duration() -> None:
    events: list[BlockEvent] = []
    async with detect_blocking(threshold=THRESHOLD, on_block=events.append) as det:
        # Let a heartbeat come and go first: the monitor then has nothing
        # outstanding when the block starts, and can only see it afterwards.
        await asyncio.sleep(2 * THRESHOLD)
        hold_the_gil(BLOCK)
        await asyncio.sleep(0)
    assert [e.ongoing for e in events] == [False], events
    (event,) = events
    # Measured from when the monitor was due, so short by at most an interval
    # (here a quarter of the margin allowed).
    assert event.duration_ms >= (BLOCK - 4 * det.interval) * 1e3
    assert event.duration_ms < 20 * BLOCK * 1e3
    # Attribution is a glimpse taken as the call returns: the line of the call
    # (or, had the loop already moved on, nothing rather than a wrong line).
    assert (event.function, event.line) in {
        ("hold_the_gil", line_of("BLOCK:gil")),
        ("<unknown>", 0),
    }
    assert det.blocks == 1

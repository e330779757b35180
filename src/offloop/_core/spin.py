"""Polling for a hand-over between threads, and measuring whether it pays.

Every hand-over between threads (a worker taking its next call, a caller
waiting for a loop thread's reply, a loop thread or a process pool's manager
waiting for its next event) may poll briefly before it sleeps: a thread that
is still polling when the other side answers takes the answer without paying
for a wake-up. Each turn of such a poll calls :func:`yield_cpu`, so the other
side gets the CPU and the GIL.

But each turn also takes the GIL back, just when the other side may need it
to answer (the loop's thread, to take a result and make the next call, or to
run the coroutine a caller waits for): where wake-ups are cheap, polling
slows the other side down more than it saves. Which one wins depends on the
machine (its scheduler, its virtualisation) and on the load, so each place
that polls measures it with a :class:`SpinTuner`.

What a tuner measures is the *gap*: the time from starting to wait to having
the answer, which is the other side's turnaround (slower while a poll takes
the GIL) plus the wake-up (none when the poll catches the answer). A gap
longer than :data:`GAP_LIMIT` counts as that limit: a waiter whose answers
come late (a caller that does other work between its calls, a loop that
waits for the network) makes no round trip, and its long gaps must not
outweigh the short ones. They still count: where a wake-up alone takes longer
than the limit, only the mode without the poll makes long gaps, which must
weigh against it; and a waiter whose gaps are all long ties both modes, so it
stops polling, which could not catch its answers anyway. The tuner
alternates short turns with and without the poll until it has
:data:`SAMPLES` gaps of each, keeps the mode with the lower median for the
next :data:`SETTLE` gaps, then measures again. Turns are interleaved so
that a machine that gets busier or quieter meanwhile affects both modes alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from statistics import median
from typing import Final

__all__ = ["GAP_LIMIT", "SAMPLES", "SETTLE", "TURN", "SpinTuner", "poll_lock", "yield_cpu"]

#: Give up the CPU (and with it the GIL) for one scheduling turn.
yield_cpu: Final[Callable[[], object]] = getattr(os, "sched_yield", lambda: time.sleep(0))

_monotonic: Final = time.monotonic


def poll_lock(acquire: Callable[[bool], bool], deadline: float) -> bool:
    """Poll a lock (its ``acquire``) until ``deadline`` (monotonic); whether it was taken.

    A thread still polling when the other side releases the lock takes it
    without a futex sleep and wake-up; each turn yields the CPU and the GIL,
    and the deadline bounds the CPU spent. Once it passes, the lock has been
    tried once more at least: a deadline already past is a single try.
    """
    while not acquire(False):
        if _monotonic() > deadline:
            return False
        yield_cpu()
    return True


#: Gaps (seconds from starting to wait to the answer) longer than this count
#: as this long: they are not round trips (see the module docs).
GAP_LIMIT: Final = 0.001

#: Gaps in a row measured in one mode before switching to the other.
TURN: Final = 8

#: Gaps of each mode that decide between them.
SAMPLES: Final = 64

#: Gaps measured in the chosen mode before the next comparison.
SETTLE: Final = 4096

#: How much lower the polling mode's median gap must be to be chosen: the
#: poll burns CPU that other threads and processes could use.
MARGIN: Final = 0.97


class SpinTuner:
    """One place's choice of whether to poll before sleeping, and the measurements behind it.

    ``window`` is what the waiting thread reads before it waits (seconds of
    polling; 0: none). :meth:`record` takes the gap it measured and the
    window it used. Callers on several threads may share a tuner without a
    lock: a race loses a gap or repeats a decision, never more.
    """

    __slots__ = ("_gaps", "_left", "_poll", "_settled", "window")

    def __init__(self, window: float) -> None:
        self._poll = window
        #: The poll window in use now (seconds; 0: no poll).
        self.window = window
        # Gaps measured without and with the poll, in this comparison.
        self._gaps: tuple[list[float], list[float]] = ([], [])
        # Gaps left in the current turn (while comparing).
        self._left = TURN
        # Gaps left before the next comparison; 0: comparing now.
        self._settled = 0

    def record(self, gap: float, window: float) -> None:
        """Count one gap, measured with the poll window ``window``."""
        if window != self.window:
            return  # measured in a mode that has ended
        gap = min(gap, GAP_LIMIT)  # see the module docs
        if self._settled > 0:
            self._settled -= 1
            if self._settled <= 0:
                self._left = TURN  # compare again, starting in the current mode
            return
        self._gaps[window > 0].append(gap)
        self._left -= 1
        if self._left > 0:
            return
        self._left = TURN
        off, on = self._gaps
        if len(off) >= SAMPLES and len(on) >= SAMPLES:
            # New lists, not these cleared: another caller that counted the
            # last gap too may be taking their medians (see the class docs).
            self._gaps = ([], [])
            self.window = self._poll if median(on) < MARGIN * median(off) else 0.0
            self._settled = SETTLE
            return
        self.window = 0.0 if window else self._poll

    def __repr__(self) -> str:
        mode = "polling" if self.window else "not polling"
        state = f"for {self._settled} more gaps" if self._settled > 0 else "comparing"
        return f"<SpinTuner {mode}, {state}>"

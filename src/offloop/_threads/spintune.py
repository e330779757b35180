"""Whether a pool's idle threads poll for their next call before they sleep: measured.

A worker that has just posted its result can poll for the next call for a
moment (:data:`SPIN_WINDOW`) instead of going to sleep at once. If the next
call of a sequential ``await`` loop arrives meanwhile, the worker takes it
without a wake-up, which on some machines costs more than all the rest of a
round trip. But each turn of the poll gives the GIL away and takes it back,
and the loop's thread needs the GIL at that very moment to take the result
and make the next call: where wake-ups are cheap, the poll slows the loop
down more than it saves. Which one wins depends on the machine (its
scheduler, its virtualisation) and on the load, so the pool measures it.

What it measures is the time from a worker going idle to it taking its next
call: the loop's turnaround (slower while a poll takes the GIL) plus the
wake-up (none when the poll catches the call). A gap longer than
:data:`GAP_LIMIT` counts as that limit: a caller that does other work between
its calls makes no sequential round trip, and its long gaps must not outweigh
the short ones. They still count: where a wake-up alone takes longer than the
limit, only the mode without the poll makes long gaps, which must weigh
against it; and a caller whose gaps are all long ties both modes, so the pool
stops polling, which could not catch its calls anyway. :class:`SpinTuner`
alternates short turns with and without the poll until it has
:data:`SAMPLES` gaps of each, keeps the mode with the lower median for the
next :data:`SETTLE` gaps, then measures again. Turns are interleaved so that
a machine that gets busier or quieter meanwhile affects both modes alike.
"""

from __future__ import annotations

from statistics import median
from typing import Final

__all__ = ["GAP_LIMIT", "SAMPLES", "SETTLE", "SPIN_WINDOW", "TURN", "SpinTuner"]

#: Seconds an idle worker polls for its next call before it sleeps, when
#: polling pays (see the module docs). Each turn yields the CPU and the GIL,
#: and the window is short enough that an idle pool costs nothing measurable.
SPIN_WINDOW: Final = 50e-6

#: Gaps (seconds from going idle to the next call) longer than this count as
#: this long: they are not sequential round trips (see the module docs).
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
    """One pool's choice of whether idle workers poll, and the measurements behind it.

    ``window`` is read by each worker as it goes idle; :meth:`record` is
    called under the pool's lock with the gap the worker measured and the
    window it used.
    """

    __slots__ = ("_gaps", "_left", "_settled", "window")

    def __init__(self) -> None:
        #: The poll window idle workers use now (seconds; 0: no poll).
        self.window = SPIN_WINDOW
        # Gaps measured without and with the poll, in this comparison.
        self._gaps: tuple[list[float], list[float]] = ([], [])
        # Gaps left in the current turn (while comparing).
        self._left = TURN
        # Gaps left before the next comparison; 0: comparing now.
        self._settled = 0

    def record(self, gap: float, window: float) -> None:
        """Count one worker's gap between going idle and its next call."""
        if window != self.window:
            return  # measured in a mode that has ended
        gap = min(gap, GAP_LIMIT)  # see the module docs
        if self._settled:
            self._settled -= 1
            if not self._settled:
                self._left = TURN  # compare again, starting in the current mode
            return
        gaps = self._gaps[window > 0]
        gaps.append(gap)
        self._left -= 1
        if self._left:
            return
        off, on = self._gaps
        if len(off) >= SAMPLES and len(on) >= SAMPLES:
            self.window = SPIN_WINDOW if median(on) < MARGIN * median(off) else 0.0
            off.clear()
            on.clear()
            self._settled = SETTLE
            return
        self.window = 0.0 if window else SPIN_WINDOW
        self._left = TURN

    def __repr__(self) -> str:
        mode = "polling" if self.window else "not polling"
        state = f"for {self._settled} more gaps" if self._settled else "comparing"
        return f"<SpinTuner {mode}, {state}>"

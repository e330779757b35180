"""The GIL as a resource of its own: at most one call known to hold it runs at a time.

Pure-Python calls share one GIL, so running several at once finishes them no
sooner, and each one more is one more thread the event loop's thread queues
behind for the GIL. Calls that compute in C code that releases the GIL
(zlib, hashlib) do run in parallel, and still get all of ``cpu_slots``.

A pool tells the two apart by the busy share of a computing call (see
``Worker.share``): a thread that waits for a core counts as busy, so a call
in C code shows a share near 1 however many run, while a call that waits for
the GIL sleeps in a futex and shows well under 1, but only while another
call computes beside it (alone, a Python call shows near 1 too, and teaches
nothing). A function seen contending is remembered (:class:`GilMemory`, by
code object, like ``WaitMemory``); a pending call of such a function is
dispatched only while no call known to hold the GIL computes or is on its
way (the pool's ``_gil_calls``). A call of it seen asleep in I/O or a timer
makes it forgotten again, so a function that sleeps, runs C or runs Python
by turns is not kept to one call at a time. A high share of one call does
not: a Python thread may keep the GIL for several switch intervals while the
others starve, and would look like C code.

Probes: once per :data:`PROBE_PERIOD` a held-back call of a known function
starts anyway, beside the one that runs. If two or more of its calls then
compute at once, each with a share of :data:`FREE_SHARE` or more, they do not
share one GIL (calls that do cannot all get more than half of the time), and
the function is forgotten. So a function taken for GIL-bound by mistake (C
code whose calls also waited on a lock the others held, say) gets all of
``cpu_slots`` back within about a probe period, at the cost of two
GIL-bound calls running together for one call's time now and then.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Final

from .workers import MAX_REMEMBERED, _key

if TYPE_CHECKING:
    from .._core.offload import OffloadFuture
    from .workers import Worker

__all__ = [
    "CONTENDED",
    "FREE",
    "FREE_SHARE",
    "GIL_AFTER",
    "GIL_ENABLED",
    "GIL_SCAN",
    "GIL_SHARE",
    "PROBE_PERIOD",
    "GilMemory",
    "judge_gil",
    "learn_gil",
]

#: Whether this interpreter has a GIL at all (free-threaded builds of 3.13+ may not).
GIL_ENABLED: Final = bool(getattr(sys, "_is_gil_enabled", lambda: True)())

#: Below this busy share, a computing call beside another one waits for the GIL.
GIL_SHARE: Final = 0.5

#: How many measured calls of a function in a row must have waited for the
#: GIL before its calls are held to one at a time (see GilMemory).
GIL_AFTER: Final = 2

#: At or above this busy share, each of two or more calls of one function
#: computing at once runs without waiting for the GIL (see Probes above).
FREE_SHARE: Final = 0.75

#: Seconds between probes of a function known to hold the GIL (see above).
PROBE_PERIOD: Final = 1.0

#: Worker.gil_seen: the call was seen waiting for the GIL / running without it.
CONTENDED: Final = 1
FREE: Final = 2

#: How far down the pending calls a pool looks for one it may dispatch while
#: a GIL-holding call runs: a bound on the work done under the lock.
GIL_SCAN: Final = 32


class GilMemory(dict[object, int]):
    """Which functions hold the GIL: for each (by code object), its last calls that waited for it.

    A call seen waiting for the GIL at any time of its run counts; a call
    seen asleep in I/O or a timer (and never waiting for the GIL), or a
    probe that finds its calls running free beside each other, resets the
    count. Only a run of
    :data:`GIL_AFTER` makes the function's calls wait for each other, so a
    function that sleeps, runs C or runs Python by turns (a handler that
    fetches, then parses) is rarely held to one call at a time. Under the
    pool's lock; a dict, so that the hot path's "is anything known?" is a
    C-level truth test.
    """

    __slots__ = ("probe_at",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: When the next probe of each known function may start (monotonic).
        self.probe_at: dict[object, float] = {}

    def holds(self, fn: object) -> bool:
        """Whether ``fn``'s last :data:`GIL_AFTER` measured calls waited for the GIL."""
        return self.get(_key(fn), 0) >= GIL_AFTER

    def bound(self) -> int:
        """How many functions are known to hold the GIL."""
        return sum(1 for count in self.values() if count >= GIL_AFTER)

    def probe(self, fn: object, now: float) -> bool:
        """Whether a held-back call of ``fn`` may start now as a probe (see the module docs).

        The first time a call of ``fn`` is held back starts the clock.
        """
        code = _key(fn)
        at = self.probe_at.get(code)
        if at is not None and now < at:
            return False
        self.probe_at[code] = now + PROBE_PERIOD
        return at is not None

    def forget(self, code: object) -> None:
        """Forget what is known of the function with this key."""
        self.pop(code, None)
        self.probe_at.pop(code, None)

    def remember(self, call: OffloadFuture[Any] | None, holds: bool) -> None:
        """Count a measured call of ``call``'s function."""
        code = _key(call.fn) if call is not None else None
        if code is None:
            return
        if holds:
            if len(self) >= MAX_REMEMBERED and code not in self:
                self.clear()  # a bound, not a cache policy: rarely reached
                self.probe_at.clear()
            self[code] = min(self.get(code, 0) + 1, GIL_AFTER)
        else:
            self.forget(code)


def judge_gil(
    workers: list[Worker],
    gil_calls: set[OffloadFuture[Any]],
    memory: GilMemory,
    now: float,
    floor: float,
) -> None:
    """Mark the calls of ``workers`` that wait for the GIL, or run (or wait) without it.

    Under the pool's lock, after the pool's check has measured them. A call
    seen waiting for the GIL joins ``gil_calls`` at once, so that no call of
    a function known to hold it starts beside it. A call of such a function
    that waits asleep in I/O or a timer is marked as running without it: a
    call that waits in a futex may be waiting for the GIL itself (a thread
    starved of it looks blocked), and tells nothing.

    ``floor``: the least share a call waiting for the GIL gets, half its fair
    share among the computing calls the pool allows and the loop's thread.
    A call under it that the pool's check still took as computing (its
    threshold falls with the calls running, so among forty calls blocked in
    a lock a few look computing) waits for something other than the GIL.
    """
    computing = 0
    measured: list[Worker] = []
    for w in workers:
        if w.call is None:
            continue
        if w.waiting:
            if memory and memory.holds(w.call.fn) and w.sleeps_outside_futex(now):
                w.gil_seen, w.gil_at = FREE, w.started
            continue
        computing += 1
        if w.share >= 0 and w.seen == w.started:
            measured.append(w)
    if computing < 2:
        return  # a call alone shows a share near 1 whatever it runs
    # The measured calls of each known function: two or more computing at
    # once (a probe) that all ran without waiting for the GIL: it is forgotten.
    known: dict[object, list[Worker]] = {}
    for w in measured:
        call = w.call
        assert call is not None
        # A call in C code may wait a switch interval for the GIL when it
        # returns to Python, which lowers its share for a window: it must
        # also be found asleep in a futex, where GIL waits are.
        if floor <= w.share < GIL_SHARE and w.sleeps_in_futex():
            if w.gil_at != w.started or w.gil_seen != CONTENDED:
                # Counted at once, not when it ends: a function is known to
                # hold the GIL while its first calls still contend for it.
                memory.remember(call, True)
                w.gil_seen, w.gil_at = CONTENDED, w.started
            gil_calls.add(call)
        if memory and memory.holds(call.fn):
            known.setdefault(_key(call.fn), []).append(w)
    for code, calls in known.items():
        if len(calls) >= 2 and all(w.share >= FREE_SHARE for w in calls):
            memory.forget(code)
            for w in calls:
                gil_calls.discard(w.call)


def learn_gil(worker: Worker, call: OffloadFuture[Any], memory: GilMemory) -> None:
    """Count the call that ``worker`` just ended in ``memory`` (under the pool's lock)."""
    if worker.gil_at == worker.started:
        if worker.gil_seen != CONTENDED:  # a contended call was counted by judge_gil
            memory.remember(call, False)
    elif memory and worker.in_io and worker.io_read >= worker.started:
        memory.remember(call, False)  # seen asleep in I/O or a timer

"""The GIL as a resource of its own: one call of a function known to hold it runs at a time.

Pure-Python calls share one GIL, so running several at once finishes them no
sooner, and each one more is one more thread the event loop's thread queues
behind for the GIL. Calls that compute in C code that releases the GIL
(zlib, hashlib) do run in parallel, and still get all of ``cpu_slots``.

Learning. A pool tells the two apart by the busy share of a computing call
(see ``Worker.share``): a thread that waits for a core counts as busy, so a
call in C code shows a share near 1 however many run, while a call that
waits for the GIL sleeps in a futex and shows well under 1, but only while
another call computes beside it (alone, a Python call shows near 1 too, and
teaches nothing). A wait on a lock, a queue or a future is a futex sleep
too, so a call counts as contending only while the loop's thread waited as
well: the pool's check ran late while the loop's thread hardly ran (it
waited for the GIL, not on work of its own). A GIL nobody fights over is not
worth gating. Two calls in a row seen contending make the function known
(:class:`GilMemory`, by code object, like ``WaitMemory``). Measurements come
from the pool's check, which runs only while calls are pending, and from
Linux's ``/proc``: elsewhere nothing is learnt.

The gate. The pool's ``_gil_calls`` holds the calls of known functions that
compute or are on their way to a thread; while it is not empty a pending
call of a known function waits, and calls of other functions go past it
(looking at most :data:`GIL_SCAN` calls down the queue). A call leaves it
when it ends, when the pool's check finds it waiting (a lock, I/O, a nested
offload of its own function: it holds no GIL then), and for good once it has
run :data:`HOLD_LIMIT`, so that a long call (a background job, an abandoned
runaway) does not keep the others waiting for its whole run; a call that
computes again after a wait goes back in.

Forgetting. A call of a known function seen asleep in I/O or a timer makes
it forgotten when the call ends. So does, at once, a call that computes
alone under half the time while the loop keeps time and the process uses
under :data:`CROWDED` of a CPU: the GIL is free for the taking, so the call
waits for something else. A high share of one call beside others does not:
a Python thread may keep the GIL for several switch intervals while the
others starve, and would look like C code. Probes do: once per
:data:`PROBE_PERIOD` one held-back call of a known function starts anyway,
beside the one that runs (one probe at a time). If two or more of its calls
then compute side by side for :data:`FREE_SPAN` with more than
:data:`PAIR_CPU` seconds of CPU per second between them (time running, read
from each thread's CPU clock, not time waiting for a core), they do not
share one GIL, and the function is forgotten. So a function taken for
GIL-bound by mistake gets all of ``cpu_slots`` back within about a probe
period (for calls long enough to be measured side by side), at the cost of
two GIL-bound calls running together now and then.
"""

from __future__ import annotations

import sys
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from .._core.offload import QUEUED
from .workers import RunMemory, _key

if TYPE_CHECKING:
    from .._core.offload import OffloadFuture
    from .workers import Worker

__all__ = [
    "CONTENDED",
    "CROWDED",
    "FREE",
    "FREE_SPAN",
    "GIL_AFTER",
    "GIL_ENABLED",
    "GIL_SCAN",
    "GIL_SHARE",
    "HOLD_LIMIT",
    "PAIR_CPU",
    "PROBE_PERIOD",
    "GilClocks",
    "GilMemory",
    "GilSigns",
    "judge_gil",
    "learn_gil",
    "may_probe",
]

#: Whether this interpreter has a GIL at all (free-threaded builds of 3.13+ may not).
GIL_ENABLED: Final = bool(getattr(sys, "_is_gil_enabled", lambda: True)())

#: Below this busy share, a computing call beside another one waits for the GIL.
GIL_SHARE: Final = 0.5

#: How many measured calls of a function in a row must have waited for the
#: GIL before its calls are held to one at a time (see GilMemory).
GIL_AFTER: Final = 2

#: Above this sum of CPU shares (time running, not waiting for a core),
#: calls of one function computing side by side run free of the GIL: calls
#: that share it cannot sum to more than 1 however loaded the machine is.
PAIR_CPU: Final = 1.25

#: At or above this share of a CPU used by the whole process since the
#: pool's previous check, something else than a lone call computes.
CROWDED: Final = 0.75

#: Seconds between probes of a function known to hold the GIL (see above).
PROBE_PERIOD: Final = 1.0

#: Seconds of readings that tell whether a call runs free of the GIL: two
#: switch intervals, as CPython may leave the GIL with one thread for a
#: switch interval while the others wait.
FREE_SPAN: Final = 0.01

#: Seconds a call of a known function holds the others back at most: past
#: that, a long call (a background job, an abandoned runaway) lets the
#: next one start, rather than keep them waiting for its whole run.
HOLD_LIMIT: Final = PROBE_PERIOD

#: Worker.gil_seen: the call was seen waiting for the GIL / running without it.
CONTENDED: Final = 1
FREE: Final = 2

#: How far down the pending calls a pool looks for one it may dispatch while
#: a GIL-holding call runs: a bound on the work done under the lock.
GIL_SCAN: Final = 32


class GilMemory(RunMemory):
    """Which functions hold the GIL: for each (by code object), its last calls that waited for it.

    A call seen waiting for the GIL at any time of its run counts; a call
    seen asleep in I/O or a timer (and never waiting for the GIL), or a
    probe that finds its calls running free beside each other, resets the
    count. Only a run of :data:`GIL_AFTER` makes the function's calls wait
    for each other, so a function that sleeps, runs C or runs Python by
    turns (a handler that fetches, then parses) is rarely held to one call
    at a time.
    """

    __slots__ = ("probe_at",)
    AFTER = GIL_AFTER

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
        """Forget what is known of the function with this key, its probe clock too."""
        super().forget(code)
        self.probe_at.pop(code, None)

    def clear(self) -> None:
        """Forget every function, and every probe clock."""
        super().clear()
        self.probe_at.clear()


class GilSigns(NamedTuple):
    """What the loop's thread and the process did between two checks of a pool."""

    #: The check ran late while the loop's thread hardly ran: it waited for
    #: the GIL (or a core), not on work of its own.
    waited: bool
    #: The check ran on time and the process used under :data:`CROWDED` of
    #: a CPU: nothing but a lone call could hold the GIL meanwhile.
    calm: bool


class GilClocks(NamedTuple):
    """What a pool's check read as it ran, on its loop's thread (monotonic seconds)."""

    at: float
    #: The loop's thread's CPU time (``time.thread_time()``).
    loop_cpu: float
    #: The whole process's CPU time (``time.process_time()``).
    process_cpu: float

    def since(self, now: GilClocks, *, late: bool) -> GilSigns:
        """What happened from this reading to ``now``; ``late``: the check at ``now`` ran late."""
        span = now.at - self.at
        if span <= 0:
            return GilSigns(waited=False, calm=False)
        loop = (now.loop_cpu - self.loop_cpu) / span
        process = (now.process_cpu - self.process_cpu) / span
        return GilSigns(waited=late and loop < GIL_SHARE, calm=not late and process < CROWDED)


def judge_gil(
    workers: list[Worker],
    gil_calls: set[OffloadFuture[Any]],
    memory: GilMemory,
    now: float,
    floor: float,
    signs: GilSigns,
) -> None:
    """Learn which functions hold the GIL from the calls of ``workers``; keep ``gil_calls``.

    Under the pool's lock, after the pool's check has measured the calls;
    ``signs``: what the loop's thread and the process did since the check
    before.

    - Learning: a computing call beside another one, measured under
      :data:`GIL_SHARE` and asleep in a futex, contends for the GIL, but it
      counts only while the loop's thread waited too (``signs.waited``): a
      call that waits on a lock, a queue or a future sleeps in a futex as
      well, and a GIL nobody fights over is not worth gating.
    - Forgetting: a call of a known function asleep in I/O or a timer is
      marked as running without the GIL (counted when it ends). One that
      computes alone under half the time over :data:`FREE_SPAN` while
      nothing else could hold the GIL (``signs.calm``) waits for something
      else, and the function is forgotten at once; so it is when two or more
      of its calls compute side by side (a probe) for :data:`FREE_SPAN` and
      their CPU shares sum to over :data:`PAIR_CPU`.
    - ``gil_calls``: the calls of known functions that compute, for at most
      :data:`HOLD_LIMIT` each, so that one long call does not hold every
      other known call back for its whole run.

    ``floor``: the least share a call waiting for the GIL gets, half its fair
    share among the computing calls the pool allows and the loop's thread.
    A call under it that the pool's check still took as computing (its
    threshold falls with the calls running, so among forty calls blocked in
    a lock a few look computing) waits for something other than the GIL.
    """
    computing = 0
    measured: list[Worker] = []
    for w in workers:
        call = w.call
        if call is None:
            continue
        if memory and call in gil_calls and now - w.started > HOLD_LIMIT:
            gil_calls.discard(call)
        if w.waiting:
            if memory and memory.holds(call.fn) and w.sleeps_outside_futex(now):
                w.gil_seen, w.gil_at = FREE, w.started
            continue
        computing += 1
        if w.share >= 0 and w.seen == w.started:
            measured.append(w)
    if computing < 2:
        if computing and memory and signs.calm:
            # Nothing else computes and the loop keeps time: the GIL is
            # there for the taking. A known call that still runs under half
            # the time waits for something else.
            for w in measured:
                call = w.call
                assert call is not None
                if (
                    w.share < GIL_SHARE
                    and w.last - w.share_since >= FREE_SPAN
                    and memory.holds(call.fn)
                ):
                    _forget(memory, gil_calls, _key(call.fn))
        return  # otherwise a call alone shows a share near 1 whatever it runs
    if signs.waited:
        for w in measured:
            # A call in C code may wait a switch interval for the GIL when it
            # returns to Python, which lowers its share for a window: it must
            # also be found asleep in a futex, where GIL waits are. Counted
            # at once, not when the call ends: a function is known to hold
            # the GIL while its first calls still contend for it.
            if (
                floor <= w.share < GIL_SHARE
                and (w.gil_at != w.started or w.gil_seen != CONTENDED)
                and w.sleeps_in_futex()
            ):
                memory.remember(w.call, True)
                w.gil_seen, w.gil_at = CONTENDED, w.started
    if not memory:
        return
    known: dict[object, list[Worker]] = {}
    for w in measured:
        call = w.call
        assert call is not None
        if memory.holds(call.fn):
            known.setdefault(_key(call.fn), []).append(w)
            if now - w.started <= HOLD_LIMIT:
                gil_calls.add(call)  # back in, if it waited a while (see _rebalance)
    for code, calls in known.items():
        if len(calls) >= 2 and _run_side_by_side(calls):
            _forget(memory, gil_calls, code)


def _run_side_by_side(calls: list[Worker]) -> bool:
    # Whether these computing calls of one function ran side by side for
    # FREE_SPAN with more CPU between them than one GIL allows. Their CPU
    # clocks are marked together, the first time they are seen together
    # (again whenever one joins), and compared from then on. Each reading
    # takes its own time: reading the clocks holds the GIL, but the check
    # gave it away before (each look at /proc does), maybe for a while.
    at = calls[0].pair_at
    if any(w.pair_at != at or at < w.started for w in calls):
        at = monotonic()
        for w in calls:
            w.pair_cpu, w.pair_at = w.cpu_time(), at
        return False
    now = monotonic()
    if now - at < FREE_SPAN:
        return False
    used = 0.0
    for w in calls:
        cpu, mark = w.cpu_time(), w.pair_cpu
        if cpu is None or mark is None:
            return False
        used += cpu - mark
    return used / (now - at) > PAIR_CPU


def _forget(memory: GilMemory, gil_calls: set[OffloadFuture[Any]], code: object) -> None:
    # The function with this key runs free of the GIL: none of its calls
    # holds the others back any more.
    memory.forget(code)
    for call in [call for call in gil_calls if _key(call.fn) is code]:
        gil_calls.discard(call)


def may_probe(
    memory: GilMemory,
    gil_calls: set[OffloadFuture[Any]],
    workers: list[Worker],
    fn: object,
    now: float,
) -> bool:
    """Whether a held-back call of ``fn`` may start now as a probe (under the pool's lock).

    One probe at a time: not while two calls of ``fn`` compute or are on
    their way to a thread (a call past HOLD_LIMIT no longer holds the others
    back, but still computes).
    """
    code = _key(fn)
    on_way = sum(1 for call in gil_calls if call._phase is QUEUED and _key(call.fn) is code)
    computing = sum(
        1 for w in workers if w.call is not None and not w.waiting and _key(w.call.fn) is code
    )
    if on_way + computing >= 2:
        return False
    return memory.probe(fn, now)


def learn_gil(worker: Worker, call: OffloadFuture[Any], memory: GilMemory) -> None:
    """Count the call that ``worker`` just ended in ``memory`` (under the pool's lock)."""
    if worker.gil_at == worker.started:
        if worker.gil_seen != CONTENDED:  # a contended call was counted by judge_gil
            memory.remember(call, False)
    elif memory and worker.in_io and worker.io_read >= worker.started:
        memory.remember(call, False)  # seen asleep in I/O or a timer

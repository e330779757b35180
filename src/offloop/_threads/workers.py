"""A thread pool's record of each worker thread, and whether its call uses the CPU.

A pool lets at most ``cpu_slots`` calls run at once while they use the CPU;
a call that waits (in I/O, a sleep, a lock, a nested offload) does not count.
This is what keeps the event loop responsive under heavy offload: every
runnable thread competes with the loop's thread for the cores and, for Python
code, for the GIL, so forty busy threads on two cores delay the loop by
dozens of scheduler slices and switch intervals, while forty threads blocked
in ``recv`` cost it nothing.

Whether a call waits is read from the kernel's scheduler statistics of its
thread (Linux's ``/proc/self/task/<tid>/schedstat``): the time it ran plus the
time it sat runnable waiting for a core. A thread blocked in I/O or a lock
adds to neither; a thread that computes adds to one or the other, however
loaded the machine is (CPU time alone would make a thread starved of cores
look idle, and the pool would add threads exactly when the cores are
scarcest). A thread waiting for the GIL sleeps like a blocked one, but it
gets its turn: over a window of several switch intervals each of ``n``
contenders runs for about ``1/n`` of the time, so a call counts as waiting
only below half of that share (:func:`waiting_share`).

Where the kernel offers no such statistics, a call that has run for a growth
period counts as waiting: blocking calls still reach ``max_workers``, but
CPU-bound ones are not held back either.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from types import BuiltinFunctionType, ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final

from .._core.cpus import available_cpus

if TYPE_CHECKING:
    from .._core.offload import OffloadFuture

__all__ = [
    "DEFAULT_CPU_SLOTS",
    "TAKE_QUEUED",
    "WAITING_REREAD",
    "WINDOW",
    "RunMemory",
    "WaitMemory",
    "Worker",
    "waiting_share",
]


#: Default bound on the calls of one pool that run at once while using the
#: CPU: one more than the CPUs this process may use. With exactly one per CPU
#: a core idles whenever a computing call waits for the GIL (C code such as
#: zlib takes it back each time it returns to Python, behind any Python code
#: that holds it) or is between two calls; one more covers those moments.
#: Many more would not finish the work sooner, only make the event loop's
#: thread wait longer for a core and the GIL.
DEFAULT_CPU_SLOTS: Final = available_cpus() + 1

#: Handed to an idle worker (``Worker.hand``) to have it take its next call off
#: the pool's queue: a call dispatched to a thread that then failed to start
#: waits there for whichever thread comes free first.
TAKE_QUEUED: Final = object()

#: Seconds of a call's recent past that decide whether it waits (see Worker.is_waiting).
WINDOW: Final = 0.05

#: Seconds of readings before a call is first judged: a thread that waits for
#: the GIL waits about a switch interval per thread ahead of it, and must not be
#: taken for a blocked one meanwhile.
JUDGE_AFTER: Final = sys.getswitchinterval()

#: Seconds between readings of a call presumed to wait (its function's last
#: calls waited), where others are read every JUDGE_AFTER. A burst of blocking
#: calls has dozens of them, each reading is a system call that hands the GIL
#: away on the loop's thread. One that computes after all is found within
#: about this plus two of the pool's checks from its start (its first reading
#: comes at the first check after GROWTH_PERIOD), about WAITING_REREAD minus
#: JUDGE_AFTER later than other calls. Calls judged waiting by their own
#: readings keep the shorter period: a thread waiting for the GIL can look
#: blocked for a while.
WAITING_REREAD: Final = 0.025

_HAS_CPU_CLOCK: Final = hasattr(time, "pthread_getcpuclockid")
_SCHEDSTAT: Final = "/proc/self/task/{}/schedstat"
_HAS_SCHEDSTAT: Final = os.path.exists(_SCHEDSTAT.format(threading.get_native_id()))
#: Where in the kernel a thread sleeps: a thread waiting for the GIL (or any
#: lock or condition) sleeps in a futex; one in ``time.sleep``, ``recv`` or
#: ``select`` does not.
_WCHAN: Final = "/proc/self/task/{}/wchan"


def waiting_share(running: int) -> float:
    """Below this share of its time running or runnable, a call counts as waiting.

    Half the share each of ``running`` GIL contenders (plus the loop's
    thread) gets, so a Python thread that waits for the GIL is not taken for
    a blocked one; threads blocked in I/O stay far below it.
    """
    return 0.5 / (running + 1)


class Worker:
    """A worker thread, the call it runs now, and what the pool measured of that call.

    ``hand`` and ``wake`` carry a call to it while it is idle: the pool,
    under its lock, takes the worker off its ``_idle`` stack, sets ``hand``
    and releases ``wake``, inline and with no call from the first step to the
    last (an exception from a signal handler in between, Ctrl-C's
    KeyboardInterrupt, would lose the thread). ``call``, ``started``,
    ``thread`` and ``tid`` are set by the worker, and ``waiting`` and
    ``presumed`` too as a call of a function known to wait starts; the rest
    belongs to the pool's rebalancing check. All of it is read and written
    under the pool's lock, but ``hand``, which the worker reads once it has
    acquired ``wake``.
    """

    __slots__ = (
        "base_busy",
        "base_wall",
        "call",
        "clock",
        "fd",
        "gil_at",
        "gil_seen",
        "hand",
        "in_io",
        "io_read",
        "judged",
        "last",
        "launch",
        "pair_at",
        "pair_cpu",
        "presumed",
        "prev_busy",
        "prev_wall",
        "seen",
        "share",
        "share_since",
        "started",
        "thread",
        "tid",
        "waiting",
        "wake",
        "wfd",
    )

    def __init__(self) -> None:
        self.call: OffloadFuture[Any] | None = None
        #: What the pool hands this worker while it is idle (on the pool's
        #: ``_idle`` stack): a call, None (exit) or TAKE_QUEUED. Written
        #: under the pool's lock just before ``wake`` is released.
        self.hand: OffloadFuture[Any] | object | None = None
        #: Held while nothing is handed: the pool releases it with each
        #: hand, the worker acquires it back as it takes the hand. A lock of
        #: its own, so that a call wakes exactly this worker (see pool.py).
        self.wake = threading.Lock()
        self.wake.acquire()
        #: When the current call started (monotonic); it also tells calls apart.
        self.started = 0.0
        self.thread: threading.Thread | None = None
        #: Whether its thread runs: 0 not known yet, 1 it does (set by the
        #: thread as it starts), -1 the pool gave it up (its start failed or
        #: was interrupted first; a thread that runs after all leaves at once).
        #: Under the pool's lock: see ThreadPoolLifecycle._start_thread.
        self.launch = 0
        #: The thread's id in the kernel, set by the thread itself.
        self.tid = 0
        #: The thread's schedstat file, opened on the first look, closed at exit.
        self.fd = -1
        #: ``started`` of the call the readings below belong to.
        self.seen = -1.0
        # Two readings of (busy seconds, wall time): the start of the current
        # window and of the one before (prev_wall < 0: there is none yet).
        self.base_busy = self.base_wall = 0.0
        self.prev_busy = self.prev_wall = 0.0
        #: Whether the current call counts as waiting (holds no CPU slot).
        self.waiting = False
        #: The current call's busy share over its last judged window (busy
        #: seconds per wall second); -1: not judged yet (see gil.py).
        self.share = -1.0
        #: Where that window began (monotonic); -1: not judged yet.
        self.share_since = -1.0
        #: The thread's CPU clock (see cpu_time); -1: not looked up yet.
        self.clock = -1
        #: The thread's CPU time when gil.judge_gil first saw the current
        #: call beside others of its function, and when (-1: not yet).
        self.pair_cpu: float | None = None
        self.pair_at = -1.0
        #: What gil.judge_gil saw of the call that started at ``gil_at``:
        #: 1 waiting for the GIL, 2 running without it, 0 nothing.
        self.gil_seen = 0
        self.gil_at = -1.0
        #: Whether ``waiting`` was measured for the current call, not presumed.
        self.judged = False
        #: Whether the current call was presumed to wait when it started (its
        #: function's last calls waited; see WaitMemory), and not found computing
        #: since. Set only with ``waiting`` and cleared whenever it is, so it implies it.
        self.presumed = False
        #: When the current call's thread was last read (monotonic).
        self.last = 0.0
        #: The thread's wchan file (see sleeps_outside_futex), opened on first use.
        self.wfd = -1
        #: The last answer of sleeps_outside_futex, and when it was read.
        self.in_io = False
        self.io_read = -1.0

    def busy(self) -> float | None:
        """Seconds the thread has run or waited for a core; None where unknown."""
        if not _HAS_SCHEDSTAT or not self.tid:
            return None
        try:
            if self.fd < 0:
                self.fd = os.open(_SCHEDSTAT.format(self.tid), os.O_RDONLY | os.O_CLOEXEC)
            fields = os.pread(self.fd, 64, 0).split()
            return (int(fields[0]) + int(fields[1])) * 1e-9
        except (OSError, ValueError, IndexError):
            return None

    def sleeps_outside_futex(self, now: float) -> bool:
        """Whether the thread sleeps in the kernel somewhere other than a futex.

        Such a thread waits for I/O or a timer, not for the GIL (which is a
        futex wait, like any lock's), so its call surely holds no CPU. Read
        at most once per JUDGE_AFTER during a call; False where unknown.
        """
        if self.io_read >= self.started and now - self.io_read < JUDGE_AFTER:
            return self.in_io  # read during this call, and recently
        self.io_read = now
        where = self._wchan()
        # "0" or empty: running, or hidden by the kernel's settings.
        self.in_io = where is not None and where not in (b"", b"0") and b"futex" not in where
        return self.in_io

    def _wchan(self) -> bytes | None:
        # Where in the kernel the thread sleeps now; None where unknown.
        if not _HAS_SCHEDSTAT or not self.tid:
            return None
        try:
            if self.wfd < 0:
                self.wfd = os.open(_WCHAN.format(self.tid), os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self.wfd, 64, 0)
        except OSError:
            return None

    def cpu_time(self) -> float | None:
        """Seconds the thread has run on a CPU (not waited for one); None where unknown."""
        if not _HAS_CPU_CLOCK or self.thread is None or self.thread.ident is None:
            return None
        try:
            if self.clock < 0:
                self.clock = time.pthread_getcpuclockid(self.thread.ident)
            return time.clock_gettime(self.clock)
        except OSError:
            return None

    def sleeps_in_futex(self) -> bool:
        """Whether the thread sleeps in a futex now (a lock or the GIL); False where unknown."""
        where = self._wchan()
        return where is not None and b"futex" in where

    def close(self) -> None:
        """Close the thread's /proc files (when the thread leaves the pool)."""
        for fd in (self.fd, self.wfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.wfd = -1

    def is_waiting(self, now: float, period: float, running: int) -> bool:
        """Whether the current call waits rather than computes.

        A call younger than ``period`` is what the pool presumed when it
        started (computing, unless its function's last call waited). Then
        the time its thread was busy since an earlier reading is compared with
        the time that passed: since the call's first reading at first, then
        over the last one to two :data:`WINDOW` s, so that a call that
        computed for a while and then blocks gives its slot back. Until it is
        judged, a call whose thread sleeps in I/O or a timer (not a futex,
        where a GIL wait would be) counts as waiting at once.
        """
        if self.call is None:
            return False
        if now - self.started < period:
            # As presumed when it started (see WaitMemory), unless its thread
            # sleeps in I/O or a timer now: then it surely holds no CPU (a GIL
            # wait is a futex wait), and a burst of short blocking calls need
            # not wait for the judging window of each to take more threads.
            return self.waiting or self.sleeps_outside_futex(now)
        if (
            not self.waiting
            and (self.seen != self.started or not self.judged)
            and self.sleeps_outside_futex(now)
        ):
            # Not judged yet (the schedstat window needs two readings
            # JUDGE_AFTER apart, and a late loop stretches that), but asleep
            # in I/O or a timer now: it surely holds no CPU. Without this a
            # burst of short blocking calls holds the CPU slots for most of
            # their run, and the calls that compute wait behind them.
            return True
        if self.seen == self.started and now - self.last < (
            WAITING_REREAD if self.presumed else JUDGE_AFTER
        ):
            # Each reading is a system call that gives the GIL away, and
            # taking it back under contention can cost the loop a switch
            # interval: read a call at most once per JUDGE_AFTER, and one
            # presumed to wait once per WAITING_REREAD.
            return self.waiting
        busy = self.busy()
        if busy is None:
            return True  # nothing to tell by: a long call is taken to be blocked
        self.last = now
        if self.seen != self.started:
            self.mark(busy, now)
            return self.waiting
        # The first reading was JUDGE_AFTER ago at least (see the check above):
        # long enough to tell a GIL wait from a blocking one.
        if self.prev_wall >= 0:
            ref_busy, ref_wall = self.prev_busy, self.prev_wall
        else:
            ref_busy, ref_wall = self.base_busy, self.base_wall
        self.share = (busy - ref_busy) / (now - ref_wall) if now > ref_wall else 1.0
        self.share_since = ref_wall
        waiting = self.share < waiting_share(running)
        self.judged = True
        if now - self.base_wall >= WINDOW:
            self.prev_busy, self.prev_wall = self.base_busy, self.base_wall
            self.base_busy, self.base_wall = busy, now
        return waiting

    def waited_a_window(self) -> bool:
        """Whether the current call's readings already span a whole WINDOW.

        Only readings of this call count: until its first one, the windows
        on record are its thread's previous call's.
        """
        return self.seen == self.started and self.prev_wall >= 0

    def mark(self, busy: float, now: float) -> None:
        """Take the first reading of the current call."""
        self.seen = self.started
        self.base_busy, self.base_wall = busy, now
        self.prev_wall = -1.0
        self.judged = False
        self.share = self.share_since = -1.0


#: The most functions a pool remembers as waiting or computing.
MAX_REMEMBERED: Final = 1024

#: How many measured calls of a function in a row must have waited before
#: its next calls are presumed to wait (see WaitMemory).
WAITS_AFTER: Final = 2


class RunMemory(dict[object, int]):
    """Per function (by code object): how many of its last measured calls in a row matched.

    The base of :class:`WaitMemory` (calls that waited) and
    ``gil.GilMemory`` (calls that waited for the GIL): a run of ``AFTER``
    matching calls makes the function known, one that does not match
    forgets it. A dict, so that the hot path's "is anything known?" is a
    C-level truth test rather than a Python ``__bool__``. Under the pool's lock.
    """

    __slots__ = ()

    #: How many calls in a row make a function known.
    AFTER: ClassVar[int]

    def remember(self, call: OffloadFuture[Any] | None, seen: bool) -> None:
        """Count a measured call of ``call``'s function (plain functions and methods)."""
        code = _key(call.fn) if call is not None else None
        if code is None:
            return
        if not seen:
            self.forget(code)
        else:
            self._store(code, min(self.get(code, 0) + 1, self.AFTER))

    def forget(self, code: object) -> None:
        """Forget what is known of the function with this key."""
        self.pop(code, None)

    def _store(self, code: object, count: int) -> None:
        if len(self) >= MAX_REMEMBERED and code not in self:
            self.clear()  # a bound, not a cache policy: rarely reached
        self[code] = count


class WaitMemory(RunMemory):
    """Which functions wait: for each (by code object), how many of its last measured calls waited.

    A pool counts a call that ended while measured as waiting, and resets
    the count on any call measured computing. The next calls of a function
    whose last :data:`WAITS_AFTER` measured calls all waited take a thread at
    once, without a CPU slot, instead of waiting for the pool's check to
    measure each of them. Learning only from whole calls keeps a long GIL
    wait, which looks like a blocked call for a while, from being learnt;
    asking for a run of them keeps a function that sometimes waits and
    sometimes computes (a handler that fetches, then parses) from being
    presumed to wait, which would let its computing calls past the CPU slots
    and crowd the loop out of the GIL. All under the pool's lock.
    """

    __slots__ = ()
    AFTER = WAITS_AFTER

    def waits(self, fn: object) -> bool:
        """Whether ``fn``'s last :data:`WAITS_AFTER` measured calls waited."""
        return self.get(_key(fn), 0) >= WAITS_AFTER

    def forget(self, code: object) -> None:
        """Count the function with this key as measured computing: a run of 0."""
        self._store(code, 0)


def _key(fn: object) -> object:
    # Plain functions and methods by code object; a C function of a module
    # (time.sleep, select.select) by itself: it lives as long as its module,
    # whereas a bound C method would keep its object (a socket) alive here.
    code = getattr(fn, "__code__", None)
    if code is None and type(fn) is BuiltinFunctionType and type(fn.__self__) is ModuleType:
        return fn
    return code

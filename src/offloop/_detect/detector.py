"""The blocking detector: a watchdog thread that names the line blocking a loop.

How it works, and why it costs the loop almost nothing: every ``interval`` the
monitor thread posts one tiny callback (a *heartbeat*) with
``loop.call_soon_threadsafe``. The heartbeat stores a timestamp and the loop's
thread id; that is the whole loop-side cost, a few microseconds per interval.
If a heartbeat has not run ``threshold`` seconds after it was posted while the
loop is running, the loop is blocked: the monitor then samples the loop
thread's stack with ``sys._current_frames()`` every ``interval`` until the
heartbeat finally runs, so the samples show the line *during* the block (asyncio
debug mode can only say afterwards which callback was slow). The block's
duration is heartbeat-run minus heartbeat-posted.

Unlike a SIGALRM watchdog this works for any loop in any thread (uvloop
too), never raises into user code, and catches C extensions and CPU loops that
no monkey-patching of known blocking functions would see.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import sys
import threading
from collections.abc import Callable
from time import monotonic
from types import CodeType, TracebackType
from typing import Final, final

from .._core.validate import describe
from .report import (
    BlockEvent,
    BlockSite,
    Dispatch,
    Sample,
    SampleTally,
    SiteTable,
    log_block,
    logger,
    make_event,
    sample_thread,
)
from .thresholds import check_interval, check_threshold

__all__ = [
    "BlockEvent",
    "BlockSite",
    "BlockingDetector",
    "DetectorState",
    "detect_blocking",
    "log_block",
]

#: Seconds stop() waits for the monitor thread to record a block in progress
#: and exit. It only waits longer than a moment if on_block is slow.
JOIN_TIMEOUT: Final = 2.0

#: A block still going on after this many thresholds is reported early (with
#: ``ongoing=True``): a loop that never comes back (the server started on the
#: loop's thread) must not stay silent.
ONGOING_AFTER_THRESHOLDS: Final = 10

#: The monitor samples the loop thread once a heartbeat has waited this share of
#: the threshold. Whether it was a block is decided when the heartbeat runs (it
#: waited the threshold or more), and the monitor's wakes drift with the GIL:
#: sampling only from the threshold on, a block whose heartbeat came back
#: before the next wake was never seen at all.
SUSPECT_AFTER_SHARE: Final = 0.5

OnBlock = Callable[[BlockEvent], object]

_numbers: Final = itertools.count(1)

#: Every callback of an asyncio loop runs from Handle._run (TimerHandle inherits it).
_ASYNCIO_DISPATCH: Final[Dispatch] = (asyncio.events.Handle._run.__code__, -1)


class DetectorState(enum.Enum):
    """Lifecycle of a detector: NEW -> RUNNING -> STOPPED."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class _Block:
    """A block in progress, as the monitor sees it."""

    __slots__ = ("noticed", "posted_at", "samples")

    def __init__(self, posted_at: float) -> None:
        self.posted_at = posted_at
        self.samples = SampleTally()
        self.noticed = False  # the early "ongoing" event was sent


class _RunQueueClock:
    """Seconds the calling thread spent ready to run but waiting for a CPU (Linux).

    Read from ``/proc/thread-self/schedstat``, opened in the monitor thread. A
    monitor that wakes late because other processes took the CPUs waited in
    the run queue; one kept out by a loop thread holding the GIL slept. Where
    the file does not exist, every late wake counts as queued, so a block the
    monitor could not watch is reported only on its heartbeat's evidence.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None
        if self._fd is not None and self.read()[1] == 0:
            # A kernel keeping no scheduler statistics prints zeros; a live
            # thread has run at least once. As good as no file.
            self.close()

    def read(self) -> tuple[float, int]:
        """Seconds queued so far, and how many times the thread was put on a CPU."""
        if self._fd is None:
            return 0.0, 0
        try:
            fields = os.pread(self._fd, 64, 0).split()
            return int(fields[1]) / 1e9, int(fields[2])
        except (OSError, ValueError, IndexError):
            return 0.0, 0

    def since(self, before: tuple[float, int], span: float) -> float:
        """Seconds of the ``span`` seconds since ``before`` that no one GIL holder took.

        A thread kept from the GIL by one call that holds it wakes once per
        switch interval to ask for it, and under CPU load each of those
        wakes queues too, although the GIL was still held: that queueing is
        part of the block. Only the queueing after the GIL came free is not,
        the last wake's, and the wakes queue about alike: so one wake's share
        of the queued time counts. All of it counts after at most
        :data:`_FEW_WAKES` wakes (a late wake for want of a CPU). After many
        more wakes than one per switch interval the GIL changed hands all
        along: a loop that gives it up at every iteration wakes the waiting
        thread each time and, under CPU load, takes it back first, so the
        thread starves though no call holds the GIL. None of the span counts
        then. All of it counts where the clock cannot tell.
        """
        if self._fd is None:
            return float("inf")
        queued, wakes = self.read()
        queued -= before[0]
        wakes -= before[1]
        if wakes <= _FEW_WAKES:
            return queued
        if wakes > 2 * span / sys.getswitchinterval() + _FEW_WAKES:
            return max(span, queued)
        return queued / wakes

    def asked_in_time(self, before: tuple[float, int], late: float) -> bool:
        """Whether a thread that woke ``late`` seconds late asked for the GIL during the block.

        The monitor's glimpse shows the loop thread at the line of a call
        that held the GIL only if the monitor's request to drop it was made
        before the call returned: then the loop thread gives up the GIL at
        its next bytecode and waits for the monitor. The request comes a
        switch interval after the monitor, on a CPU, began to wait for the
        GIL. A monitor that spent nearly all of its lateness queued for a CPU
        may have asked only after the call returned, and the loop thread ran
        on meanwhile: its glimpse is of some later line. Two switch intervals
        on a CPU leave one to spare. False where the clock cannot tell.
        """
        if self._fd is None:
            return False
        queued = self.read()[0] - before[0]
        return late - queued >= 2 * sys.getswitchinterval()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: Up to this many times on a CPU during one wait, the monitor was not kept
#: from the GIL for long: its timed wait ended, and it took the GIL after at
#: most a switch interval or two (the loop thread between callbacks).
_FEW_WAKES: Final = 3


@final
class BlockingDetector:
    """Watch an event loop from a monitor thread and record every block.

    ``BlockingDetector(loop, threshold=0.1).start()`` attaches to ``loop``
    (running or not yet, in any thread; asyncio or uvloop). A monitor thread
    named ``offloop-detector-<n>`` (a daemon: it never keeps the process alive)
    notices when the loop has not come back for ``threshold`` seconds, samples
    the loop thread's stack while it is still blocked, and records the block's
    site: the innermost frame that is not in the standard library,
    site-packages or offloop. ``on_block(event)`` is called from the monitor
    thread for each block (default: :func:`log_block`, a WARNING with the stack
    on the ``offloop.detector`` logger); exceptions it raises are logged, never
    raised into the loop. :meth:`report` aggregates the blocks by site.

    The detector stops by itself when its loop is closed. Use it as a context
    manager (``with`` or ``async with``) or call :meth:`start` and
    :meth:`stop`.

    Args:
        loop: the loop to watch; defaults to the loop running in this thread.
        threshold: seconds the loop may go without coming back before it counts
            as blocked, from 0.01 to 86400.
        interval: seconds between heartbeats and between stack samples
            (default ``threshold / 4``), from 0.001 to ``threshold``.
        on_block: called with a :class:`BlockEvent` for each block, from the
            monitor thread. Keep it quick and never wait for the loop there.

    Raises:
        RuntimeError: no loop was given and none is running in this thread.
        TypeError: an argument has the wrong type.
        ValueError: ``threshold`` is not between 0.01 s (:data:`MIN_THRESHOLD`)
            and one day (:data:`MAX_THRESHOLD`), ``interval`` is below 1 ms or
            above ``threshold``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        threshold: float = 0.1,
        interval: float | None = None,
        on_block: OnBlock | None = None,
    ) -> None:
        where = "BlockingDetector()"
        self._threshold = check_threshold(threshold, where)
        self._interval = check_interval(interval, self._threshold, where)
        if on_block is not None and not callable(on_block):
            raise TypeError(
                f"{where} needs on_block to be a function taking a BlockEvent (or None to log "
                f"each block), got {describe(on_block)}."
            )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    f"{where} was given no loop and no event loop is running in this thread. "
                    f"Pass the loop to watch, BlockingDetector(loop), or create the detector "
                    f"inside a coroutine."
                ) from None
        elif not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"{where} needs an asyncio event loop as loop, got {describe(loop)}.")
        self._loop: asyncio.AbstractEventLoop = loop
        self._on_block: OnBlock = on_block if on_block is not None else log_block
        self._name = f"offloop-detector-{next(_numbers)}"
        self._state = DetectorState.NEW
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._table = SiteTable()
        # Written by the heartbeat on the loop's thread, read by the monitor:
        # the loop's thread and where it runs callbacks, if known.
        self._dispatch: tuple[int | None, CodeType | None, int] = (None, None, -1)
        self._acked = 0
        self._acked_at = 0.0
        # The heartbeat start() posts (sequence number 1) and when: the monitor
        # measures it like its own, so the loop is watched from the start on,
        # not from the monitor's first wake an interval (and a thread start) later.
        self._first_posted_at: float | None = None

    # -- public ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name of the monitor thread, ``offloop-detector-<n>``."""
        return self._name

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop being watched."""
        return self._loop

    @property
    def threshold(self) -> float:
        """Seconds the loop may go without coming back before it counts as blocked."""
        return self._threshold

    @property
    def interval(self) -> float:
        """Seconds between heartbeats and between stack samples."""
        return self._interval

    @property
    def state(self) -> DetectorState:
        """The detector's :class:`DetectorState`."""
        return self._state

    @property
    def blocks(self) -> int:
        """How many finished blocks were recorded so far."""
        return self._table.blocks

    def report(self) -> list[BlockSite]:
        """The blocking sites seen so far, most total time first.

        Safe to call from any thread, while running or after :meth:`stop`.
        """
        return self._table.report()

    def start(self) -> BlockingDetector:
        """Start the monitor thread; return the detector.

        Raises:
            RuntimeError: the detector is already running or was stopped (a
                detector runs once), or its loop is closed.
        """
        with self._lock:
            if self._state is DetectorState.RUNNING:
                raise RuntimeError(f"{self._describe()} is already running; stop() it first.")
            if self._state is DetectorState.STOPPED:
                raise RuntimeError(
                    f"{self._describe()} was stopped and cannot start again; "
                    f"create a new BlockingDetector."
                )
            if self._loop.is_closed():
                raise RuntimeError(
                    f"{self._describe()} cannot start: its event loop is closed. Attach the "
                    f"detector to a loop that is running or about to run."
                )
            if asyncio._get_running_loop() is self._loop:
                self._ran_on(threading.get_ident())
            # Running elsewhere or about to run (maybe in another thread): this
            # heartbeat also tells the loop's thread, before anything queued
            # after it, so a block that starts right away can be sampled.
            self._first_posted_at = monotonic()
            self._loop.call_soon_threadsafe(self._heartbeat, 1)
            self._thread = threading.Thread(target=self._monitor, name=self._name, daemon=True)
            self._state = DetectorState.RUNNING
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the monitor thread, recording a block in progress; idempotent.

        Returns once the monitor has exited (or after a bounded wait if
        ``on_block`` is slow), so :meth:`report` is complete afterwards.
        """
        with self._lock:
            if self._state is DetectorState.NEW:
                self._state = DetectorState.STOPPED
                return
            self._state = DetectorState.STOPPED
            self._stopping.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)

    def __enter__(self) -> BlockingDetector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> BlockingDetector:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return self._describe()

    def _describe(self) -> str:
        sites = len(self._table)
        return (
            f"<BlockingDetector {self._name!r} {self._state.value}: threshold "
            f"{self._threshold * 1e3:g} ms, {self._table.blocks} block(s) at {sites} site(s)>"
        )

    # -- loop side ---------------------------------------------------------------------

    def _ran_on(self, ident: int) -> None:
        # The loop is about to run, or running, on this thread (called there).
        self._dispatch = (ident, None, -1)

    def _heartbeat(self, seq: int) -> None:
        # Runs on the loop: keep it to a few stores. The caller's frame is
        # where this loop runs callbacks (see Dispatch); one tuple, so the
        # monitor never pairs one run's thread with another run's frame. The
        # stamp goes before the sequence number, so the monitor never pairs a
        # new sequence number with an old stamp.
        try:
            caller = sys._getframe(1)
        except ValueError:  # a loop run from C with no Python frame: only the thread
            self._dispatch = (threading.get_ident(), None, -1)
        else:
            self._dispatch = (threading.get_ident(), caller.f_code, caller.f_lasti)
        if seq > self._acked:
            self._acked_at = monotonic()
            self._acked = seq

    # -- monitor side ------------------------------------------------------------------

    def _monitor(self) -> None:
        try:
            self._watch()
        except Exception:  # a bug here must not take anything else down
            logger.exception("%r: the monitor thread failed; blocks are no longer detected", self)
        finally:
            with self._lock:
                self._state = DetectorState.STOPPED

    def _watch(self) -> None:
        loop = self._loop
        threshold = self._threshold
        suspect_after = threshold * SUSPECT_AFTER_SHARE
        ongoing_after = threshold * ONGOING_AFTER_THRESHOLDS
        # The heartbeat start() posted is this thread's first.
        seq = 1
        posted_at: float | None = self._first_posted_at
        block: _Block | None = None
        queued = _RunQueueClock()
        now = monotonic() if posted_at is None else posted_at
        try:
            while True:
                # Due an interval after the last wake, not after this turn's work:
                # posting a heartbeat and reading the run-queue clock each give
                # up the GIL, and with a loop thread running Python code each
                # takes a switch interval (5 ms) to get it back. Waiting a full
                # interval after them stretched every turn, and with it the time
                # between a heartbeat's run and the next one's posting, during
                # which a block that begins is measured short.
                due = now + self._interval
                queued_before = queued.read()
                read_at = monotonic()
                stopping = self._stopping.wait(max(due - monotonic(), 0.0))
                now = monotonic()
                acked = self._acked
                # This thread needs the GIL to wake up, so a loop thread inside a
                # C call that holds it (sorted(), json.loads, re) stops this
                # thread too: it wakes late, as the call returns, and by its
                # next turn the loop may have moved on. Look at the loop thread
                # at once: it is still at the line of the call.
                blind = now - due
                glimpse = self._sample() if blind >= threshold else None
                if posted_at is not None and acked >= seq:
                    acked_at = self._acked_at
                    if block is not None or acked_at - posted_at >= threshold:
                        # The heartbeat waited: a block (if long enough) is over.
                        # Without samples if this thread never woke during it (it
                        # held the GIL): the glimpse came after, so it is not the site.
                        self._finish(block or _Block(posted_at), acked_at - posted_at)
                        block = None
                    if blind >= threshold:
                        # Kept from running past the heartbeat: the loop came back,
                        # then blocked again (maybe a moment after another block).
                        # Late for want of a CPU (other processes) is no block:
                        # only the time spent waiting, not queued, was the GIL.
                        held = now - max(due, acked_at) - queued.since(queued_before, now - read_at)
                        site = queued.asked_in_time(queued_before, blind)
                        self._finish_held(acked_at, held, glimpse, site=site)
                    posted_at = None
                if stopping or loop.is_closed():
                    # Stopped from the loop's own thread in the middle of a block
                    # (a sync `with` around the blocking call): it ends now.
                    if block is not None:
                        self._finish(block, now - block.posted_at)
                    return
                running = loop.is_running()
                if not running:
                    # Our heartbeat waits in a loop that has stopped: not a block.
                    # A block in progress ended when the loop stopped, about now.
                    if block is not None:
                        self._finish(block, now - block.posted_at)
                        block = None
                    posted_at = None
                    continue
                if posted_at is None:
                    seq += 1
                    posted_at = monotonic()
                    try:
                        loop.call_soon_threadsafe(self._heartbeat, seq)
                    except RuntimeError:  # closed meanwhile; seen on the next turn
                        posted_at = None
                    continue
                lag = now - posted_at
                if lag < suspect_after:
                    continue
                if block is None:
                    block = _Block(posted_at)
                sample = glimpse if glimpse is not None else self._sample()
                if sample is not None:
                    block.samples.add(sample)
                if not block.noticed and lag >= ongoing_after:
                    block.noticed = True
                    self._emit(make_event(block.samples, lag, ongoing=True))
        finally:
            queued.close()

    def _finish_held(
        self, acked_at: float, held: float, glimpse: Sample | None, *, site: bool
    ) -> None:
        # The heartbeat ran before this thread was kept from running for `held`
        # seconds; the loop thread, caught in the middle of a callback as this
        # thread woke, is what kept it. Had a heartbeat been posted when this
        # thread was due, it would have waited `held` seconds. Without `site`
        # the glimpse may have come after the loop moved on: the block is
        # reported at no site rather than at a wrong line.
        if held >= self._threshold and glimpse is not None and glimpse.busy:
            block = _Block(acked_at)
            if site:
                block.samples.add(glimpse)
            self._finish(block, held)

    def _sample(self) -> Sample | None:
        # asyncio's own loops know their thread exactly (it can change between
        # runs) and run every callback from Handle._run. For others (uvloop)
        # the last heartbeat told both, but the loop may have been run in
        # another thread since: the thread is sampled only if it is still in
        # the frame the heartbeat ran from (an unknown site beats blaming
        # whatever that thread does now).
        loop_ident = getattr(self._loop, "_thread_id", None)
        if isinstance(loop_ident, int):
            return sample_thread(loop_ident, _ASYNCIO_DISPATCH)
        ident, code, lasti = self._dispatch
        if code is None:  # learned on the loop's thread as it started: current
            return sample_thread(ident)
        return sample_thread(ident, (code, lasti), verify=True)

    def _finish(self, block: _Block, duration: float) -> None:
        if duration < self._threshold:
            return  # sampled while it looked like one, but it was no block
        event = make_event(block.samples, duration, ongoing=False)
        self._table.add(event)
        self._emit(event)

    def _emit(self, event: BlockEvent) -> None:
        try:
            self._on_block(event)
        except Exception:
            logger.exception("%r: on_block raised while handling: %s", self, event)


def detect_blocking(
    *,
    threshold: float = 0.1,
    interval: float | None = None,
    on_block: OnBlock | None = None,
) -> BlockingDetector:
    """Detect blocks of the running event loop for the duration of a ``with`` block.

    Use it inside a coroutine, as ``with`` or ``async with``; it yields the
    :class:`BlockingDetector`, whose :meth:`~BlockingDetector.report` lists the
    sites after (or during) the block::

        async with offloop.detect_blocking(threshold=0.05) as det:
            await handler()
        for site in det.report():
            print(site)

    Args:
        threshold: seconds the loop may go without coming back before it counts
            as blocked.
        interval: seconds between heartbeats and stack samples (default
            ``threshold / 4``).
        on_block: called with each :class:`BlockEvent` from the monitor thread
            (default: log it with its stack on the ``offloop.detector`` logger).

    Raises:
        RuntimeError: no event loop is running in this thread (to watch a loop
            from elsewhere, use ``BlockingDetector(loop).start()``).
        TypeError: an argument has the wrong type.
        ValueError: ``threshold`` is not between 0.01 s and one day, or
            ``interval`` is below 1 ms or above ``threshold``.
    """
    # Checked here too, so that errors name the function the user called.
    check_interval(interval, check_threshold(threshold, _DETECT), _DETECT)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "offloop.detect_blocking() must be used inside a running event loop (in a "
            "coroutine). To watch a loop from another thread, use "
            "offloop.BlockingDetector(loop).start()."
        ) from None
    return BlockingDetector(loop, threshold=threshold, interval=interval, on_block=on_block)


_DETECT: Final = "offloop.detect_blocking()"

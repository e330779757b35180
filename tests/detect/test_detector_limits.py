"""The blocking detector at its limits: the GIL, threads, long blocks, bad input.

Every block lasts ten times the threshold or waits for the detector itself, so
the assertions are about what was reported, with wide margins on durations.
"""

# The tests block their own loop on purpose: that is what is being detected.
# ruff: noqa: ASYNC251

from __future__ import annotations

import asyncio
import ctypes
import functools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from offloop import BlockEvent, BlockingDetector, BlockSite, DetectorState, detect_blocking
from offloop._detect.detector import _RunQueueClock
from offloop._detect.hook import LoopWatch
from offloop._detect.thresholds import MAX_THRESHOLD
from tests.helpers import bounded, line_of

HERE = Path(__file__)
THRESHOLD = 0.05
BLOCK = 10 * THRESHOLD

# A PyDLL call keeps the GIL for its whole duration, like a C extension that
# never releases it (sorted() of a big list, json.loads of a huge string).
_GIL_HOLDING_LIBC = ctypes.PyDLL(None)


def hold_the_gil(seconds: float) -> None:
    _GIL_HOLDING_LIBC.usleep(int(seconds * 1e6))  # BLOCK:gil


# -- blocks that hold the GIL --------------------------------------------------------------


class Heartbeats:
    """Records when the detector posts each heartbeat, as the monitor posts it.

    Both ``start()`` and the monitor read ``self._heartbeat`` just before
    posting it, so a property in its place sees every post, on the posting
    thread, and hands back the method bound by a ``functools.partial`` (a C
    object: the heartbeat still sees the loop's frame as its caller).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._posts: dict[BlockingDetector, list[float]] = {}
        heartbeat = BlockingDetector._heartbeat

        def post(det: BlockingDetector) -> Callable[[int], None]:
            self._posts.setdefault(det, []).append(time.monotonic())
            return functools.partial(heartbeat, det)

        monkeypatch.setattr(BlockingDetector, "_heartbeat", property(post))

    def outstanding(self, det: BlockingDetector) -> int:
        """Heartbeats ``det`` posted that have not run yet."""
        return len(self._posts.get(det, [])) - det._acked

    def posted_between(self, det: BlockingDetector, start: float, end: float) -> bool:
        """Whether ``det`` posted a heartbeat between ``start`` and ``end`` (monotonic)."""
        return any(start <= t <= end for t in self._posts.get(det, []))


CLEAN_STARTS = 3  # attempts at a block with no heartbeat outstanding; one is enough


def hold_the_gil_between_heartbeats(det: BlockingDetector, heartbeats: Heartbeats) -> bool:
    """Hold the GIL for ``BLOCK``; False if a heartbeat was waiting as it began.

    Called once every heartbeat posted has run: the monitor posts the next
    one only when it wakes, an interval later, and cannot wake during the
    block. It can still post in the instant before the block begins, and a
    heartbeat waiting through the block is evidence of a different kind.
    """
    start = time.monotonic()
    clean = heartbeats.outstanding(det) == 0
    hold_the_gil(BLOCK)  # CALL:gil
    # A post timed in the block's first half came before the block began
    # (the monitor cannot run during it), between the count and the call.
    return clean and not heartbeats.posted_between(det, start, start + BLOCK / 2)


async def heartbeats_all_ran(det: BlockingDetector, heartbeats: Heartbeats) -> None:
    # A posted heartbeat runs on the loop's next turn or so; the test's own
    # time bound catches a detector that stops posting or acknowledging.
    while heartbeats.outstanding(det):
        await asyncio.sleep(0)


async def one_block_between_heartbeats(
    heartbeats: Heartbeats, *, alone: bool = False
) -> tuple[list[BlockEvent], BlockingDetector]:
    """Watch the loop through one GIL-holding block begun with no heartbeat outstanding.

    The monitor can then only see the block afterwards, as a wake late by
    it. A start where one was outstanding after all is tried again, up to
    CLEAN_STARTS times; with ``alone``, so is one that reported more than
    one event. Returns what the detector reported, and the detector.
    """
    for _ in range(CLEAN_STARTS):
        events: list[BlockEvent] = []
        async with detect_blocking(threshold=THRESHOLD, on_block=events.append) as det:
            await asyncio.sleep(2 * THRESHOLD)
            await heartbeats_all_ran(det, heartbeats)
            clean = hold_the_gil_between_heartbeats(det, heartbeats)  # CALL:between
            await asyncio.sleep(0)
        # A stall of the machine's own beside the block (the loop's thread
        # kept off a busy CPU) is a second event: the run says nothing about
        # the block alone, and is tried again too. A detector that reports
        # the block twice still fails, at every try.
        if clean and (not alone or len(events) == 1):
            return events, det
    pytest.fail(
        f"a heartbeat was outstanding as each of {CLEAN_STARTS} blocks began, or another "
        f"event came beside the block"
    )


@bounded(20)
async def test_a_block_that_holds_the_gil_is_reported_with_its_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events, det = await one_block_between_heartbeats(Heartbeats(monkeypatch), alone=True)
    assert [e.ongoing for e in events] == [False], events
    (event,) = events
    # Measured from when the monitor was due, so short by at most an interval
    # (here a quarter of the margin allowed).
    assert event.duration_ms >= (BLOCK - 4 * det.interval) * 1e3
    assert event.duration_ms < 20 * BLOCK * 1e3
    # Attribution is a glimpse taken as the call returns: the line of the call,
    # inside it or, once it has returned, a line it was called from (or, had
    # the loop already moved on, nothing rather than a wrong line).
    assert (event.function, event.line) in {
        ("hold_the_gil", line_of("BLOCK:gil", HERE)),
        ("hold_the_gil_between_heartbeats", line_of("CALL:gil", HERE)),
        ("one_block_between_heartbeats", line_of("CALL:between", HERE)),
        ("<unknown>", 0),
    }
    assert det.blocks == 1


@bounded(20)
async def test_a_monitor_late_only_for_want_of_a_cpu_reports_no_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Other processes taking every CPU make the monitor wake late too, with
    # the loop caught mid-callback: that alone is no block. Here the run
    # queue is said to have held the monitor the whole time.
    monkeypatch.setattr(_RunQueueClock, "since", lambda self, before, span: float("inf"))
    events, _ = await one_block_between_heartbeats(Heartbeats(monkeypatch))
    assert events == []


ATTEMPTS = 4  # each attempt must be reported: a miss is a window, not bad luck


@bounded(30)
async def test_a_gil_holding_block_right_after_another_block_is_reported_too() -> None:
    # The heartbeat runs as the first block ends, then the next callback holds
    # the GIL at once: the monitor, still watching the first block, could not
    # wake before the second ended, and finished only the first.
    for attempt in range(ATTEMPTS):
        events: list[BlockEvent] = []
        async with detect_blocking(threshold=THRESHOLD, on_block=events.append):
            await asyncio.sleep(2 * THRESHOLD)
            time.sleep(3 * THRESHOLD)  # BLOCK:before
            await asyncio.sleep(0)
            hold_the_gil(6 * THRESHOLD)
            await asyncio.sleep(0)
        sites = [(e.function, e.line) for e in events if not e.ongoing]
        assert sites == [
            (
                "test_a_gil_holding_block_right_after_another_block_is_reported_too",
                line_of("BLOCK:before", HERE),
            ),
            ("hold_the_gil", line_of("BLOCK:gil", HERE)),
        ], f"attempt {attempt}: {events}"


async def short_sleep_then_cpu_loop(seconds: float) -> None:
    await asyncio.sleep(0.01)
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # BLOCK:start-up
        pass


def test_a_block_right_after_the_loop_starts_is_reported_every_time() -> None:
    # End to end, each asyncio.run() a new loop watched from its start (the
    # monitor's side of it is simulated step by step in test_detector_monitor.py).
    block = 2 * THRESHOLD
    for attempt in range(ATTEMPTS):
        with LoopWatch(threshold=THRESHOLD, interval=THRESHOLD / 10) as watch:
            asyncio.run(short_sleep_then_cpu_loop(block))
        sites = [(s.function, s.line, s.count) for s in watch.report()]
        assert sites == [("short_sleep_then_cpu_loop", line_of("BLOCK:start-up", HERE), 1)], (
            f"attempt {attempt}: {watch.events}"
        )


def test_the_run_queue_clock_reads_this_thread_s_waits() -> None:
    clock = _RunQueueClock()
    try:
        before = clock.read()
        assert before[0] >= 0.0
        time.sleep(0.001)  # one more time on a CPU, at least, when it wakes
        after = clock.read()
        assert after[0] >= before[0]
        if clock._fd is not None:  # the kernel keeps scheduler statistics
            assert after[1] > before[1]
        assert clock.since(before, 0.001) >= 0.0
    finally:
        clock.close()
    # Closed, or no /proc: every late wake was queued.
    assert clock.since((0.0, 0), 0.001) == float("inf")


def test_a_wait_kept_from_the_gil_by_one_call_discounts_one_wake_s_queueing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under CPU load a monitor kept from the GIL queues at each of its wakes
    # (one per switch interval) while the block goes on: only the last wake's
    # queueing, after the GIL came free, is not the block's.
    clock = _RunQueueClock()
    switch = sys.getswitchinterval()
    try:
        monkeypatch.setattr(clock, "read", lambda: (0.300, 110))
        # 100 wakes in 100 switch intervals queued 0.2 s: one call held the GIL.
        assert clock.since((0.100, 10), 100 * switch) == pytest.approx(0.002)
        # A few wakes: a timed wait that ended late for want of a CPU, all of it.
        assert clock.since((0.100, 108), 100 * switch) == pytest.approx(0.2)
        # 100 wakes in 10 switch intervals: the GIL changed hands all along (a
        # loop giving it up at each iteration), no one call held it: none of it.
        assert clock.since((0.100, 10), 10 * switch) == pytest.approx(0.2)
        assert clock.since((0.250, 10), 10 * switch) == pytest.approx(10 * switch)
    finally:
        clock.close()


# -- the loop's thread, when the detector is attached from elsewhere -----------------------


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def first_callback_blocks() -> None:
    time.sleep(BLOCK)  # BLOCK:first


def run_in_thread(loop: asyncio.AbstractEventLoop, name: str) -> None:
    thread = threading.Thread(
        target=loop.run_until_complete, args=(first_callback_blocks(),), name=name
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_loop_whose_first_callback_blocks_in_another_thread_is_sampled(kind: str) -> None:
    loop = new_loop(kind)
    try:
        det = BlockingDetector(loop, threshold=THRESHOLD, on_block=lambda e: None).start()
        run_in_thread(loop, "test-first-callback")
        det.stop()
    finally:
        loop.close()
    assert [(s.line, s.function) for s in det.report()] == [
        (line_of("BLOCK:first", HERE), "first_callback_blocks")
    ]


def unrelated_main_thread_work(done: threading.Event) -> None:
    assert done.wait(30)  # NOT-THE-LOOP


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_loop_run_again_in_another_thread_never_blames_the_first_thread(kind: str) -> None:
    loop = new_loop(kind)
    done = threading.Event()
    try:
        det = BlockingDetector(loop, threshold=THRESHOLD, on_block=lambda e: None).start()
        # First run here, long enough for heartbeats to learn this thread.
        loop.run_until_complete(asyncio.sleep(4 * THRESHOLD))

        def run_then_signal() -> None:
            try:
                loop.run_until_complete(first_callback_blocks())
            finally:
                done.set()

        thread = threading.Thread(target=run_then_signal, name="test-second-run")
        thread.start()
        unrelated_main_thread_work(done)
        thread.join(30)
        assert not thread.is_alive()
        det.stop()
    finally:
        loop.close()
    sites: list[BlockSite] = det.report()
    assert len(sites) == 1, sites
    # asyncio knows its thread; uvloop's is learned from a callback, so its
    # site may be unknown until one runs there, but never this thread's code.
    expected = {(line_of("BLOCK:first", HERE), "first_callback_blocks")}
    if kind == "uvloop":
        expected.add((0, "<unknown>"))
    assert (sites[0].line, sites[0].function) in expected


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"threshold": 0.05, "interval": 1.0},
            ValueError,
            r"interval to be at most threshold, got interval=1\.0 and threshold=0\.05: "
            r"the loop is looked at once per interval",
        ),
        (
            {"threshold": 10**400},
            ValueError,
            "threshold to be at most 86400 seconds, got a 401-digit number",
        ),
        (
            {"threshold": 1e300},
            ValueError,
            r"threshold to be at most 86400 seconds, got 1e\+300\. Pass",
        ),
        ({"threshold": float("inf")}, ValueError, "threshold to be at most 86400 seconds"),
        ({"threshold": -(10**400)}, ValueError, "threshold to be a positive number"),
        ({"threshold": 1e-6}, ValueError, "threshold to be at least 0.01 seconds.*idle loop"),
        ({"threshold": 0.05, "interval": 1e-6}, ValueError, "interval to be at least 0.001"),
        ({"threshold": 0.05, "interval": 10**400}, ValueError, "interval to be at most 86400"),
        ({"threshold": 0.05, "interval": "0.01"}, TypeError, "interval as a number of seconds"),
    ],
)
def test_out_of_range_thresholds_and_intervals_are_rejected_with_both_named(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(error, match=f"BlockingDetector\\(\\) needs {match}"):
            BlockingDetector(loop, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(error, match=f"LoopWatch\\(\\) needs {match}"):
            LoopWatch(**kwargs)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_the_largest_threshold_keeps_the_monitor_running(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        det = BlockingDetector(loop, threshold=MAX_THRESHOLD, interval=MAX_THRESHOLD).start()
        loop.run_until_complete(asyncio.sleep(0.05))
        assert det.state is DetectorState.RUNNING
        det.stop()
    finally:
        loop.close()
    assert [r for r in caplog.records if r.name == "offloop.detector"] == []


@bounded(10)
async def test_detect_blocking_errors_name_detect_blocking() -> None:
    # They named BlockingDetector(), which the user never called.
    with pytest.raises(ValueError, match=r"^offloop\.detect_blocking\(\) needs threshold"):
        async with detect_blocking(threshold=0.001):
            pass

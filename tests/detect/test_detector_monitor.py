"""The detector's monitor, step by step, against a simulated loop on a simulated clock.

The monitor thread's decisions (when to post a heartbeat, when a wait was a
block, which site to blame) are driven here deterministically: the clock is
fake, the loop only runs heartbeats when its scripted blocks allow, and the
monitor's waits end when a real thread's would, given the GIL (a block that
holds it keeps the monitor asleep until it ends; one running Python code
costs each wake a switch interval). ``_watch`` runs on the test's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from offloop import BlockEvent, BlockingDetector
from offloop._detect import detector as detector_module
from offloop._detect.detector import _RunQueueClock
from offloop._detect.report import Sample

SWITCH = 0.005  # the interpreter's switch interval: what a GIL hand-over may cost


@dataclass(frozen=True)
class Block:
    """The loop thread busy in one callback from ``start`` to ``end`` (seconds)."""

    start: float
    end: float
    site: str
    kind: str  # "sleep" (GIL released), "python" (GIL shared) or "gil" (GIL held)

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimLoop(asyncio.AbstractEventLoop):
    """Runs a posted callback at once, or when the block it was posted during ends."""

    def __init__(self, clock: Clock, blocks: list[Block]) -> None:
        self.clock = clock
        self.blocks = blocks
        self.posted: list[tuple[float, Callable[..., object], tuple[Any, ...]]] = []

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> None:
        self.posted.append((self.clock.now, callback, args))

    def block_at(self, t: float) -> Block | None:
        return next((b for b in self.blocks if b.covers(t)), None)

    def run_until(self, t: float) -> None:
        for item in list(self.posted):
            posted_at, callback, args = item
            block = self.block_at(posted_at)
            runs_at = posted_at if block is None else block.end
            if runs_at <= t:
                self.posted.remove(item)
                later, self.clock.now = self.clock.now, runs_at
                callback(*args)
                self.clock.now = later


class SimWait:
    """The monitor's ``_stopping``: a wait that ends when a real thread would wake."""

    def __init__(self, clock: Clock, loop: SimLoop, until: float) -> None:
        self.clock, self.loop, self.until = clock, loop, until

    def wait(self, timeout: float) -> bool:
        wake = self.clock.now + timeout
        block = self.loop.block_at(wake)
        if block is not None and block.kind == "gil":
            wake = block.end  # it could not even wake up before the call returned
        elif block is not None and block.kind == "python":
            wake += SWITCH  # it had to wait for the loop thread to hand the GIL over
        self.loop.run_until(wake)
        self.clock.now = wake
        return wake >= self.until

    def set(self) -> None:
        pass


class NoRunQueue:
    """Other processes never take the CPU here."""

    def read(self) -> tuple[float, int]:
        return 0.0, 0

    def since(self, before: tuple[float, int], span: float) -> float:
        return 0.0

    def asked_in_time(self, before: tuple[float, int], late: float) -> bool:
        return late >= 2 * SWITCH  # never queued: on a CPU all the time it was late

    def close(self) -> None:
        pass


class QueuedAllAlong(NoRunQueue):
    """The monitor was queued for a CPU all the time it was late.

    Its wake's queueing is counted as the GIL's (``since`` discounts none of
    it), so the block is long enough to report; but the monitor cannot have
    asked the loop thread for the GIL before the call returned.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._fd = -1  # as if the scheduler's file were open: read() stands for it

    def read(self) -> tuple[float, int]:
        return self.clock.now, 0

    def asked_in_time(self, before: tuple[float, int], late: float) -> bool:
        # The real rule, on this clock's readings.
        return _RunQueueClock.asked_in_time(self, before, late)  # type: ignore[arg-type]


def simulate(
    monkeypatch: pytest.MonkeyPatch,
    blocks: list[Block],
    *,
    threshold: float,
    until: float,
    interval: float | None = None,
    run_queue: Callable[[Clock], NoRunQueue] = lambda clock: NoRunQueue(),
) -> list[BlockEvent]:
    """Watch a loop that blocks as ``blocks`` say, from t=0 to ``until``; return its events."""
    clock = Clock()
    loop = SimLoop(clock, blocks)  # type: ignore[abstract]  # the rest is never called
    monkeypatch.setattr(detector_module, "monotonic", clock)
    monkeypatch.setattr(detector_module, "_RunQueueClock", lambda: run_queue(clock))
    events: list[BlockEvent] = []
    det = BlockingDetector(loop, threshold=threshold, interval=interval, on_block=events.append)

    def sample() -> Sample:
        # The loop thread at the instant of the sample: in the block (a GIL
        # holder is still at its line as the monitor wakes), or idle.
        now = clock.now
        block = next((b for b in blocks if b.start <= now <= b.end), None)
        if block is None:
            return Sample(("loop.py", 1, "select"), (("loop.py", 1, "select"),), busy=False)
        frame = (f"{block.site}.py", 1, block.site)
        return Sample(frame, (frame,), busy=True)

    monkeypatch.setattr(det, "_sample", sample)
    monkeypatch.setattr(det, "_monitor", lambda: None)  # start() runs no thread
    det.start()
    det._stopping = SimWait(clock, loop, until)  # type: ignore[assignment]
    det._watch()
    return events


def summary(events: list[BlockEvent]) -> list[tuple[str, bool]]:
    return [(e.function, e.ongoing) for e in events]


def test_a_block_whose_heartbeat_returns_between_two_wakes_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 130 ms Python loop 10 ms after the loop started, threshold 100 ms: its
    # heartbeat came back after 110 ms, but no wake of the monitor fell
    # between 100 ms of waiting and the return, so it was never reported.
    events = simulate(
        monkeypatch, [Block(0.010, 0.140, "cpu_loop", "python")], threshold=0.1, until=0.3
    )
    assert summary(events) == [("cpu_loop", False)], events
    assert 100 <= events[0].duration_ms <= 130


def test_a_gil_holding_block_right_after_another_block_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # time.sleep(0.1), then at once a call holding the GIL for 0.3 s: the
    # monitor, watching the first block, could not wake before the second
    # ended, finished the first and never looked back.
    blocks = [Block(0.100, 0.200, "sleeper", "sleep"), Block(0.200, 0.500, "sorter", "gil")]
    events = simulate(monkeypatch, blocks, threshold=0.05, until=0.7)
    assert summary(events) == [("sleeper", False), ("sorter", False)], events
    interval = 0.05 / 4
    assert 100 - 1e3 * interval <= events[0].duration_ms <= 100
    assert 300 - 1e3 * interval <= events[1].duration_ms <= 300


def test_a_loop_that_only_looked_blocked_is_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sampled from half the threshold on, but its heartbeat came back in time.
    blocks = [Block(0.100, 0.170, "busy", "python"), Block(0.300, 0.390, "busier", "sleep")]
    assert simulate(monkeypatch, blocks, threshold=0.1, until=0.6) == []


def test_a_gil_holding_block_alone_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    events = simulate(
        monkeypatch, [Block(0.100, 0.400, "sorter", "gil")], threshold=0.05, until=0.6
    )
    assert summary(events) == [("sorter", False)], events


def test_a_gil_holding_block_seen_only_after_a_wait_for_a_cpu_is_reported_at_no_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The monitor, queued for a CPU until after the call returned, asked for
    # the GIL too late to stop the loop thread at the call's line: what it
    # glimpsed is some later line, so the block is reported without a site.
    events = simulate(
        monkeypatch,
        [Block(0.100, 0.400, "sorter", "gil")],
        threshold=0.05,
        until=0.6,
        run_queue=QueuedAllAlong,
    )
    assert summary(events) == [("<unknown>", False)], events
    assert events[0].duration_ms >= 300 - 1e3 * 0.05 / 4


def test_a_block_at_the_first_callback_is_measured_from_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The heartbeat start() posts is measured: a loop that blocks at once is
    # watched from the first instant, not from the monitor's first wake.
    events = simulate(monkeypatch, [Block(0.0, 0.110, "first", "python")], threshold=0.1, until=0.3)
    assert summary(events) == [("first", False)], events
    assert events[0].duration_ms == pytest.approx(110)


def test_a_long_block_is_noticed_while_it_lasts_then_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = simulate(
        monkeypatch, [Block(0.050, 1.050, "stuck", "sleep")], threshold=0.05, until=1.2
    )
    assert summary(events) == [("stuck", True), ("stuck", False)], events

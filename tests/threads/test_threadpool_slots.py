"""CPU slots, continued: the setting, what a pool learns of a function, a full pool's check.

As in test_threadpool_cpu.py, the kernel's measurement (``Worker.busy``) is
replaced by a fixed answer where the policy is under test, so the assertions
do not depend on how loaded the machine is.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

import offloop
from offloop._threads import growth as growth_module
from offloop._threads import pool as pool_module
from offloop._threads import workers as workers_module
from offloop._threads.workers import WAITS_AFTER, WaitMemory, Worker
from tests.helpers import WAIT, await_until
from tests.threads import test_threadpool_cpu as cpu_tests
from tests.threads.test_threadpool_cpu import gated, measure_as, needs_wchan

pytestmark = pytest.mark.loops("asyncio")

# The fixtures, shared.
rebalances = cpu_tests.rebalances
two_slots = cpu_tests.two_slots


class _Call:
    """Just enough of a call for WaitMemory: its function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


def test_a_function_is_presumed_to_wait_only_after_calls_in_a_row_waited() -> None:
    def handler() -> None: ...

    memory, call = WaitMemory(), _Call(handler)
    assert not memory.waits(handler)
    memory.remember(call, True)  # type: ignore[arg-type]
    assert not memory.waits(handler)  # once is not enough
    for _ in range(WAITS_AFTER - 1):
        memory.remember(call, True)  # type: ignore[arg-type]
    assert memory.waits(handler)
    # A handler that fetches, then parses: one computing call resets it.
    memory.remember(call, False)  # type: ignore[arg-type]
    assert not memory.waits(handler)
    memory.remember(call, True)  # type: ignore[arg-type]
    assert not memory.waits(handler)


async def test_a_call_measured_computing_when_it_ends_resets_what_the_pool_learnt(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    work = gated(gate, started)
    async with offloop.ThreadPool(8, name="unlearns") as pool:
        # One more waiting call, and its calls would skip the slots.
        pool._waits[work.__code__] = WAITS_AFTER - 1
        # The third call pends, so the pool's check runs and measures the two.
        calls = [pool.run(work, i) for i in range(3)]

        def judged() -> bool:
            with pool._lock:
                return sum(1 for w in pool._workers if w.judged and w.call is not None) == 2

        await await_until(judged, WAIT, "the two running calls to be measured")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2]
        assert pool._waits[work.__code__] == 0


@needs_wchan
async def test_a_call_first_looked_at_late_gives_its_slot_while_it_sleeps_in_io(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its thread looks busy to the window (as a thread waiting for a core
    # does), and the check only looks once the call is past its first
    # period: only where the thread sleeps (recv, not a futex) shows that it
    # holds no CPU, and must, or two calls in recv fill both slots.
    measure_as(monkeypatch, computing=True)
    original = Worker.is_waiting

    def first_looked_at_in_recv(self: Worker, now: float, period: float, running: int) -> bool:
        # The pool's first look comes once the thread sleeps in recv. A thread
        # slow to get there (queued for a core) would be judged computing
        # first; real readings would correct that at the next window, but the
        # fixed ones here never do.
        if self.call is not None and not self.sleeps_outside_futex(now):
            return False
        return original(self, now, 0.0, running)

    monkeypatch.setattr(Worker, "is_waiting", first_looked_at_in_recv)
    reader, writer = socket.socketpair()
    try:
        async with offloop.ThreadPool(8, name="late-look") as pool:
            calls = [pool.run(reader.recv, 1) for _ in range(4)]
            try:
                # Only a slot given at the first look lets the third and fourth start.
                await await_until(lambda: pool.statistics()["running"] == 4, WAIT, "four in recv")
            finally:
                writer.sendall(b"abcd")  # however it went, no thread stays in recv
            received = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
            assert sorted(received) == [b"a", b"b", b"c", b"d"]
    finally:
        reader.close()
        writer.close()


async def test_with_every_thread_busy_the_check_looks_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measure_as(monkeypatch, computing=False)
    dues: list[float] = []
    original_rebalance = pool_module.ThreadPool._rebalance

    def recording(
        self: Any, channel: Any, loop: asyncio.AbstractEventLoop, due: float, *clocks: Any
    ) -> None:
        dues.append(due)
        original_rebalance(self, channel, loop, due, *clocks)

    monkeypatch.setattr(pool_module.ThreadPool, "_rebalance", recording)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(2, name="full") as pool:
        calls = [pool.run(gated(gate, started), i) for i in range(5)]
        await await_until(lambda: pool.statistics()["running"] == 2, WAIT, "both threads busy")
        await await_until(lambda: pool.statistics()["idle"] == 0, WAIT, "no idle thread")
        seen = len(dues)
        await await_until(lambda: len(dues) >= seen + 4, WAIT, "four more checks")
        gaps = [b - a for a, b in zip(dues[seen:], dues[seen + 1 :], strict=False)]
        assert all(gap >= growth_module.FULL_PERIOD for gap in gaps), gaps
        gate.set()  # threads come free: the pending calls still all run
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(5))


async def test_a_full_pool_still_finds_a_call_presumed_waiting_that_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With every thread busy the check still measures the running calls: a
    # call presumed to wait that computes gets its slot back (so a thread
    # that ends a call does not take the next one past the slots), and the
    # pool unlearns that its function waits.
    measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    work = gated(gate, started)
    async with offloop.ThreadPool(3, name="full-computes", cpu_slots=1) as pool:
        pool._waits[work.__code__] = WAITS_AFTER
        calls = [pool.run(work, i) for i in range(6)]
        await await_until(lambda: len(started) == 3, WAIT, "three threads, all busy")

        def found_computing() -> bool:
            with pool._lock:
                return (
                    pool._waiting == 0
                    and pool._waits.get(work.__code__) == 0
                    and not any(w.presumed for w in pool._workers)
                )

        await await_until(found_computing, WAIT, "the check to find them computing")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(6))
        with pool._lock:
            assert not any(w.presumed for w in pool._workers)


async def test_the_pool_marks_the_calls_it_presumes_to_wait_until_they_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The mark earns a call the longer reading period (WAITING_REREAD): only
    # calls of a function known to wait get it, and none keeps it past its end.
    measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()
    known = gated(gate, started)
    # The same function behind a partial: the pool remembers functions by code
    # object, and a partial has none, so it knows nothing of this one.
    unknown = functools.partial(known)
    async with offloop.ThreadPool(4, name="presumed", cpu_slots=4) as pool:
        pool._waits[known.__code__] = WAITS_AFTER
        calls = [pool.run(known, 0), pool.run(known, 1), pool.run(unknown, 2)]
        try:
            await await_until(lambda: len(started) == 3, WAIT, "three calls running")
            with pool._lock:
                marks = sorted(
                    (w.call.fn is known, w.presumed) for w in pool._workers if w.call is not None
                )
            assert marks == [(False, False), (True, True), (True, True)]
        finally:
            gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2]
        with pool._lock:
            assert not any(w.presumed for w in pool._workers)


async def test_cpu_slots_can_be_set_at_creation_and_while_the_pool_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(8, name="slots", cpu_slots=1) as pool:
        assert pool.cpu_slots == 1
        calls = [pool.run(gated(gate, started), i) for i in range(5)]
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT, "one call to run")
        # Calls made while the pool was busy reach it in one batch (dispatch.py).
        await await_until(lambda: pool.statistics()["queued"] == 4, WAIT, "four to queue")
        pool.cpu_slots = 3  # the pending calls take the new slots at the next check
        await await_until(lambda: pool.statistics()["running"] == 3, WAIT, "three calls to run")
        assert pool.statistics()["cpu_slots"] == 3
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(5))


def test_cpu_slots_never_exceed_max_workers_and_follow_it_back_up() -> None:
    pool = offloop.ThreadPool(2, name="capped", cpu_slots=5)
    assert pool.cpu_slots == 2
    pool.max_workers = 8
    assert pool.cpu_slots == 5  # the setting applies again up to the new bound
    pool.max_workers = 1
    assert pool.cpu_slots == 1
    default = offloop.ThreadPool(64, name="default-slots")
    assert default.cpu_slots == min(64, workers_module.DEFAULT_CPU_SLOTS)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"ThreadPool\(cpu_slots=\.\.\.\) must be at least 1, got 0"),
        (2.5, TypeError, r"ThreadPool\(cpu_slots=\.\.\.\) must be a positive int"),
        (True, TypeError, r"ThreadPool\(cpu_slots=\.\.\.\) must be a positive int"),
    ],
)
def test_a_bad_cpu_slots_is_refused_before_the_pool_exists(
    value: object, error: type[Exception], message: str
) -> None:
    before = len(offloop.pools())
    with pytest.raises(error, match=message):
        offloop.ThreadPool(4, name="bad-slots", cpu_slots=value)  # type: ignore[arg-type]
    assert len(offloop.pools()) == before


def test_setting_a_bad_cpu_slots_changes_nothing() -> None:
    pool = offloop.ThreadPool(4, name="set-bad", cpu_slots=2)
    with pytest.raises(ValueError, match=r"ThreadPool.cpu_slots = \.\.\. must be at least 1"):
        pool.cpu_slots = 0
    with pytest.raises(TypeError, match=r"ThreadPool.cpu_slots = \.\.\. must be a positive int"):
        pool.cpu_slots = "3"  # type: ignore[assignment]
    assert pool.cpu_slots == 2


class Readings:
    """The kernel's measurement of one worker, at a clock the test moves.

    Each reading (``Worker.busy``) is logged at ``now`` and returns ``busy``;
    no thread is ever asleep in I/O.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        self.busy = 0.0
        self.times: list[float] = []
        monkeypatch.setattr(Worker, "busy", lambda worker: self._read())
        monkeypatch.setattr(Worker, "sleeps_outside_futex", lambda worker, now: False)

    def _read(self) -> float:
        self.times.append(self.now)
        return self.busy


# A little over the periods: the check compares float times.
PERIOD, STEP = growth_module.GROWTH_PERIOD, workers_module.JUDGE_AFTER * 1.01


def test_a_call_presumed_to_wait_is_read_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each reading is a system call that hands the GIL away on the loop's
    # thread: a call presumed to wait (forty of them in a burst of blocking
    # calls) is read once per WAITING_REREAD, others once per JUDGE_AFTER.
    kernel = Readings(monkeypatch)
    assert 2 * STEP < workers_module.WAITING_REREAD
    worker = Worker()
    worker.call = _Call(len)  # type: ignore[assignment]
    worker.waiting = worker.presumed = True  # as the pool starts a call of a known function
    kernel.now = PERIOD
    assert worker.is_waiting(kernel.now, PERIOD, 1)  # the first reading
    assert len(kernel.times) == 1
    kernel.now += STEP
    assert worker.is_waiting(kernel.now, PERIOD, 1)
    assert len(kernel.times) == 1, "a call presumed to wait was read again within WAITING_REREAD"
    # It computes after all: found at its next reading.
    kernel.now = kernel.busy = PERIOD + workers_module.WAITING_REREAD * 1.01
    assert not worker.is_waiting(kernel.now, PERIOD, 1)
    assert len(kernel.times) == 2


def test_a_call_judged_waiting_by_its_own_readings_is_read_as_often_as_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thread waiting for the GIL can look blocked for a while: only the
    # presumption (from whole calls of its function) earns the longer period.
    kernel = Readings(monkeypatch)
    worker = Worker()
    worker.call = _Call(len)  # type: ignore[assignment]
    kernel.now = PERIOD
    assert not worker.is_waiting(kernel.now, PERIOD, 1)  # the first reading: as presumed
    kernel.now += STEP
    assert worker.is_waiting(kernel.now, PERIOD, 1)  # judged: busy none of the time
    worker.waiting = True  # as the pool's check records it
    kernel.now += STEP
    worker.is_waiting(kernel.now, PERIOD, 1)
    assert len(kernel.times) == 3


def test_only_a_calls_own_readings_tell_that_it_waited_a_whole_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While the loop runs late, a waiting call's slot is given away only once
    # it has waited a whole window: the windows its thread's previous call
    # left on record must not count for the next call.
    kernel = Readings(monkeypatch)
    worker = Worker()
    assert not worker.waited_a_window()  # a new thread has no window at all
    worker.call = _Call(len)  # type: ignore[assignment]
    worker.waiting = worker.presumed = True
    while not worker.waited_a_window():
        kernel.now += workers_module.WINDOW / 2
        assert worker.is_waiting(kernel.now, PERIOD, 1)
        assert kernel.now < 10 * workers_module.WINDOW, "no window after many readings"
    # The thread takes its next call: no reading of it yet.
    worker.started = kernel.now + STEP
    assert not worker.waited_a_window()
    kernel.now = worker.started + PERIOD
    worker.is_waiting(kernel.now, PERIOD, 1)  # its first reading
    assert not worker.waited_a_window()

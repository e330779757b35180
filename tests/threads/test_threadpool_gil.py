"""The GIL as a resource: at most one call of a function known to hold it runs at a time.

As in test_threadpool_cpu.py, the kernel's measurement (``Worker.busy``) is
replaced by a fixed answer, so the assertions do not depend on how loaded
the machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import offloop
from offloop._core.offload import QUEUED
from offloop._core.poolbase import PoolState
from offloop._threads import gil as gil_module
from offloop._threads import growth as growth_module
from offloop._threads import pool as pool_module
from offloop._threads.gil import (
    CONTENDED,
    CROWDED,
    FREE,
    GIL_AFTER,
    GilClocks,
    GilMemory,
    GilSigns,
    judge_gil,
    learn_gil,
    may_probe,
)
from offloop._threads.workers import Worker, waiting_share
from tests.helpers import WAIT, await_until
from tests.threads import test_threadpool_cpu as cpu_tests

pytestmark = pytest.mark.loops("asyncio")

rebalances = cpu_tests.rebalances
two_slots = cpu_tests.two_slots


@pytest.fixture(autouse=True)
def no_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No probe during a test (see gil.py) unless it sets PROBE_PERIOD itself."""
    monkeypatch.setattr(gil_module, "PROBE_PERIOD", WAIT * 10)


class _Call:
    """Just enough of a call for GilMemory and judge_gil: its function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn


def python_fn() -> None: ...


#: The time the unit tests judge at (monotonic seconds): one value, so no
#: window grows between building a worker and judging it.
NOW = 1000.0


def _worker(
    share: float,
    *,
    now: float = NOW,
    waiting: bool = False,
    ran: float = 0.05,
    fn: Callable[..., Any] = python_fn,
) -> Worker:
    # A worker whose call of ``fn``, started ``ran`` seconds before ``now``,
    # was measured at ``share`` busy seconds per second over its whole run,
    # last at ``now``.
    w = Worker()
    w.call = _Call(fn)  # type: ignore[assignment]
    w.started = w.seen = w.share_since = now - ran
    w.last = now
    w.share = share
    w.waiting = waiting
    return w


def judge_gil_(
    workers: list[Worker],
    gil_calls: set[Any],
    memory: GilMemory,
    now: float,
    *,
    waited: bool = True,
    calm: bool = False,
) -> None:
    # By default the loop's thread waited for the GIL, as when calls fight over it.
    signs = GilSigns(waited=waited, calm=calm)
    judge_gil(workers, gil_calls, memory, now, waiting_share(cpu_tests.SLOTS), signs)


def late_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every check of a pool look as if it ran far past its due time."""
    original = pool_module.ThreadPool._rebalance
    monkeypatch.setattr(
        pool_module.ThreadPool,
        "_rebalance",
        lambda self, channel, loop, due, *clocks: original(self, channel, loop, due - 1.0, *clocks),
    )


def shares_as(monkeypatch: pytest.MonkeyPatch, share: float) -> None:
    """Make every worker thread look busy ``share`` of the time (0.3: sharing the GIL)."""
    monkeypatch.setattr(Worker, "busy", lambda self: share * time.monotonic())


def test_a_function_holds_the_gil_only_after_calls_in_a_row_contended() -> None:
    memory, call = GilMemory(), _Call(python_fn)
    for _ in range(GIL_AFTER - 1):
        memory.remember(call, True)  # type: ignore[arg-type]
        assert not memory.holds(python_fn)
    memory.remember(call, True)  # type: ignore[arg-type]
    assert memory.holds(python_fn)
    memory.remember(call, False)  # type: ignore[arg-type]
    assert not memory.holds(python_fn)


def test_calls_under_a_share_beside_each_other_contend_but_one_alone_teaches_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: True)
    memory, gil_calls = GilMemory(), set[Any]()
    lone = _worker(0.3)
    judge_gil_([lone], gil_calls, memory, NOW)
    assert not memory
    assert not gil_calls
    assert lone.gil_seen == 0
    pair = [_worker(0.3), _worker(0.3)]
    judge_gil_(pair, gil_calls, memory, NOW)
    assert memory.holds(python_fn)
    assert gil_calls == {w.call for w in pair}
    assert all(w.gil_seen == CONTENDED and w.gil_at == w.started for w in pair)
    # Seen again during the same calls: each call counts once.
    memory[python_fn.__code__] = 0
    judge_gil_(pair, gil_calls, memory, NOW)
    assert memory[python_fn.__code__] == 0
    # C code beside others keeps its share near 1: nothing is learnt of it.
    memory.clear()
    judge_gil_([_worker(1.0), _worker(1.0)], set(), memory, NOW)
    assert not memory
    # Nor of calls far under a GIL contender's share that still count as
    # computing (among forty calls blocked in a lock, a few look so).
    judge_gil_([_worker(0.02), _worker(0.02), _worker(1.0)], set(), memory, NOW)
    assert not memory
    # Nor of a low share whose thread is not asleep in a futex, where GIL
    # waits are (C code back from a wait for the GIL, running now).
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: False)
    judge_gil_([_worker(0.3), _worker(0.3)], set(), memory, NOW)
    assert not memory


def test_a_call_of_a_known_function_asleep_in_io_makes_the_pool_forget_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A function that sleeps, runs C or runs Python by turns must not stay
    # held to one call at a time.
    memory = GilMemory({python_fn.__code__: GIL_AFTER})
    asleep = _worker(0.0, waiting=True)
    monkeypatch.setattr(Worker, "sleeps_outside_futex", lambda self, now: True)
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: True)
    judge_gil_([asleep, _worker(0.3)], set(), memory, NOW)
    assert asleep.gil_seen == FREE
    learn_gil(asleep, asleep.call, memory)  # type: ignore[arg-type]
    assert not memory.holds(python_fn)
    # Waiting in a futex may be waiting for the GIL itself: that tells nothing.
    memory[python_fn.__code__] = GIL_AFTER
    monkeypatch.setattr(Worker, "sleeps_outside_futex", lambda self, now: False)
    in_futex = _worker(0.0, waiting=True)
    judge_gil_([in_futex, _worker(0.3)], set(), memory, NOW)
    learn_gil(in_futex, in_futex.call, memory)  # type: ignore[arg-type]
    assert memory.holds(python_fn)


@cpu_tests.needs_wchan  # GIL waits are told by the futex their thread sleeps in
async def test_a_pool_learns_that_calls_hold_the_gil_and_starts_the_next_only_after_them(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    shares_as(monkeypatch, 0.4)  # under GIL_SHARE, over any waiting threshold
    late_checks(monkeypatch)  # as when calls fight over the GIL
    gates = [threading.Event() for _ in range(3)]
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        gates[i].wait(WAIT)
        return i

    async with offloop.ThreadPool(8, name="gil") as pool:
        calls = [pool.run(work, i) for i in range(3)]
        await await_until(lambda: pool._gil_fns.holds(work), WAIT, "the pool to learn")
        assert started == [0, 1]
        assert pool.statistics()["gil_bound"] == 1
        gates[0].set()
        await asyncio.wait_for(calls[0], WAIT)
        # A CPU slot is free, but call 1 still holds the GIL.
        await rebalances(cpu_tests.REBALANCES)
        assert started == [0, 1]
        gates[1].set()
        gates[2].set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2]
        assert not pool._gil_calls


async def test_a_call_of_another_function_takes_the_slot_a_gil_holding_call_leaves(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    cpu_tests.measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    python_work = cpu_tests.gated(gate, started)

    def c_work(i: int) -> int:
        started.append(i)
        gate.wait(WAIT)
        return i

    async with offloop.ThreadPool(8, name="gil-and-c") as pool:
        pool._gil_fns[python_work.__code__] = GIL_AFTER
        calls = [pool.run(python_work, i) for i in range(3)]
        calls.append(pool.run(c_work, 10))
        await await_until(lambda: sorted(started) == [0, 10], WAIT, "a call of each to run")
        await rebalances(cpu_tests.REBALANCES)
        assert sorted(started) == [0, 10]  # the other Python calls wait for the first
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2, 10]


async def test_without_a_gil_nothing_is_learnt(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    shares_as(monkeypatch, 0.3)
    monkeypatch.setattr(growth_module, "GIL_ENABLED", False)
    gate, started = threading.Event(), list[int]()
    work = cpu_tests.gated(gate, started)
    async with offloop.ThreadPool(8, name="no-gil") as pool:
        calls = [pool.run(work, i) for i in range(3)]
        await await_until(lambda: len(started) == 2, WAIT, "two calls to run")
        await rebalances(cpu_tests.REBALANCES)
        assert not pool._gil_fns
        assert not pool._gil_calls
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2]


async def test_a_gil_holding_call_that_waits_lets_the_next_one_start(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outer call waiting for a nested call of its own function must not
    # keep the nested one out.
    cpu_tests.measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()

    def work(i: int) -> int:
        started.append(i)
        gate.wait(WAIT * 3)  # outlasts the wait below: the first call must not end first
        return i

    async with offloop.ThreadPool(8, name="gil-waits") as pool:
        pool._gil_fns[work.__code__] = GIL_AFTER
        calls = [pool.run(work, i) for i in range(2)]
        await await_until(lambda: len(started) == 2, WAIT, "the second call to start")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1]


def test_a_probe_is_due_once_per_period_from_the_first_held_back_call() -> None:
    memory = GilMemory({python_fn.__code__: GIL_AFTER})
    period = gil_module.PROBE_PERIOD
    assert not memory.probe(python_fn, 100.0)  # starts the clock
    assert not memory.probe(python_fn, 100.0 + period / 2)
    assert memory.probe(python_fn, 100.0 + period)
    assert not memory.probe(python_fn, 100.0 + period * 1.5)  # the clock starts over
    assert memory.probe(python_fn, 100.0 + period * 2)
    memory.forget(python_fn.__code__)
    assert not memory.holds(python_fn)
    assert not memory.probe_at


def test_calls_of_a_known_function_with_more_cpu_side_by_side_than_one_gil_make_it_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Read from each thread's CPU clock (time running, not waiting for a
    # core): calls sharing one GIL cannot sum to more than one CPU.
    cpu: dict[int, float] = {}
    clock = [NOW]  # what judge_gil reads with the CPU clocks
    monkeypatch.setattr(Worker, "cpu_time", lambda self: cpu[id(self)])
    monkeypatch.setattr(gil_module, "monotonic", lambda: clock[0])
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: False)
    code = python_fn.__code__
    span = gil_module.FREE_SPAN * 2

    def judged(*used: float, after: float = span) -> GilMemory:
        # Calls that used ``used`` CPU seconds per second over ``after`` seconds.
        memory = GilMemory({code: GIL_AFTER})
        workers = [_worker(0.9) for _ in used]
        gil_calls = {w.call for w in workers}
        for w in workers:
            cpu[id(w)] = 5.0
        clock[0] = NOW
        judge_gil_(workers, gil_calls, memory, NOW)  # marks their clocks together
        assert memory.holds(python_fn)
        for w, share in zip(workers, used, strict=True):
            cpu[id(w)] += share * after
            w.last = NOW + after
        clock[0] = NOW + after
        judge_gil_(workers, gil_calls, memory, NOW + after)
        assert bool(gil_calls) is memory.holds(python_fn)
        return memory

    assert not judged(0.9, 0.9).holds(python_fn)  # C code: one CPU each
    assert not judged(0.5, 0.5, 0.5).holds(python_fn)
    # One call keeping the GIL while the other starves is what GIL-bound
    # calls look like under CPython's unfair hand-off: still known.
    assert judged(1.0, 0.1).holds(python_fn)
    assert judged(0.6, 0.6).holds(python_fn)  # two threads under load sum to about one CPU
    assert judged(0.9, 0.9, after=gil_module.FREE_SPAN / 2).holds(python_fn)  # too soon
    # A call joining the pair starts the comparison over: no decision yet.
    memory = GilMemory({code: GIL_AFTER})
    pair = [_worker(0.9), _worker(0.9)]
    for w in pair:
        cpu[id(w)] = 5.0
    clock[0] = NOW
    judge_gil_(pair, set(), memory, NOW)
    third = _worker(0.9, now=NOW + span, ran=span / 2)
    cpu[id(third)] = 0.0
    for w in pair:
        cpu[id(w)] += span
    clock[0] = NOW + span
    judge_gil_([*pair, third], set(), memory, NOW + span)
    assert memory.holds(python_fn)
    assert {w.pair_at for w in [*pair, third]} == {NOW + span}


async def test_a_probe_starts_a_held_back_call_and_running_free_beside_it_frees_the_function(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A function taken for GIL-bound whose calls run in parallel after all
    # (C code) gets its CPU slots back.
    monkeypatch.setattr(gil_module, "PROBE_PERIOD", 0.0)
    cpu_tests.measure_as(monkeypatch, computing=True)  # a share of 1: no GIL wait
    monkeypatch.setattr(Worker, "cpu_time", lambda self: time.monotonic())  # a CPU each
    gate, started = threading.Event(), list[int]()
    work = cpu_tests.gated(gate, started)
    async with offloop.ThreadPool(8, cpu_slots=3, name="gil-probe") as pool:
        pool._gil_fns[work.__code__] = GIL_AFTER
        # The fourth stays pending (three CPU slots), so the pool's check
        # keeps measuring the three that run.
        calls = [pool.run(work, i) for i in range(4)]
        await await_until(lambda: not pool._gil_fns.holds(work), WAIT, "the pool to forget")
        assert pool.statistics()["gil_bound"] == 0
        assert not pool._gil_calls
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 1, 2, 3]


@cpu_tests.needs_wchan  # the outer call must really be measured waiting
async def test_a_known_function_whose_call_offloads_a_call_of_itself_and_waits_gets_it_run() -> (
    None
):
    # A real nested offload, measured by the kernel: the outer call waits in
    # from_thread, holds no GIL, and must not keep the inner call out.
    async with offloop.ThreadPool(4, name="gil-nested") as pool:

        async def inner(depth: int) -> int:
            return await pool.run(work, depth)

        def work(depth: int) -> int:
            return 0 if depth == 0 else offloop.from_thread(inner, depth - 1) + 1

        pool._gil_fns[work.__code__] = GIL_AFTER
        assert await asyncio.wait_for(pool.run(work, 2), WAIT) == 2
        assert not pool._gil_calls


def test_calls_that_contend_teach_nothing_while_the_loop_keeps_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Calls waiting on a lock, a queue or a future sleep in a futex too: a
    # low share tells nothing unless the loop's thread waits for the GIL.
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: True)
    memory, gil_calls = GilMemory(), set[Any]()
    judge_gil_([_worker(0.3), _worker(0.3)], gil_calls, memory, NOW, waited=False)
    assert not memory
    assert not gil_calls


def test_a_known_call_computing_alone_under_half_the_time_makes_the_pool_forget_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing else computes and the loop keeps time: the GIL is free, so a
    # call that still runs under half the time waits for something else.
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: True)

    def judged(share: float, *, calm: bool, ran: float = 0.05) -> GilMemory:
        memory = GilMemory({python_fn.__code__: GIL_AFTER})
        alone = _worker(share, ran=ran)
        gil_calls = {alone.call}
        judge_gil_([alone], gil_calls, memory, NOW, waited=False, calm=calm)
        assert bool(gil_calls) is memory.holds(python_fn)
        return memory

    assert not judged(0.3, calm=True).holds(python_fn)
    # The loop ran late, or the process computed elsewhere (another pool, a
    # thread of its own): something else may have held the GIL.
    assert judged(0.3, calm=False).holds(python_fn)
    assert judged(0.9, calm=True).holds(python_fn)  # a Python call alone: near 1
    # Too short a window to tell: CPython may leave the GIL with the loop's
    # thread for a switch interval.
    assert judged(0.3, calm=True, ran=gil_module.FREE_SPAN / 2).holds(python_fn)


def test_what_the_loops_thread_and_the_process_did_between_two_checks() -> None:
    before = GilClocks(at=10.0, loop_cpu=1.0, process_cpu=2.0)

    def signs(loop: float, process: float, *, late: bool) -> GilSigns:
        # ``loop`` and ``process``: CPU seconds used per second over 10 ms.
        after = GilClocks(10.01, 1.0 + loop * 0.01, 2.0 + process * 0.01)
        return before.since(after, late=late)

    # Late while the loop's thread hardly ran: it waited for the GIL.
    assert signs(0.1, 1.0, late=True) == GilSigns(waited=True, calm=False)
    # Late because the loop ran work of its own: no GIL wait.
    assert signs(0.9, 1.0, late=True) == GilSigns(waited=False, calm=False)
    # On time, and the process used little CPU: nothing else holds the GIL.
    assert signs(0.1, 0.4, late=False) == GilSigns(waited=False, calm=True)
    assert signs(0.1, CROWDED, late=False) == GilSigns(waited=False, calm=False)
    assert before.since(before, late=True) == GilSigns(waited=False, calm=False)


def test_a_known_call_holds_the_others_back_for_a_bounded_time_and_again_when_it_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Worker, "sleeps_in_futex", lambda self: False)
    memory = GilMemory({python_fn.__code__: GIL_AFTER})
    # One that ran past HOLD_LIMIT (a background job, an abandoned runaway)
    # no longer holds the others back, though it computes.
    long = _worker(0.5, ran=gil_module.HOLD_LIMIT * 2)
    # One that waited a while (the pool's check took it out of gil_calls)
    # and computes again holds them back again.
    again = _worker(0.5)
    gil_calls = {long.call}
    judge_gil_([long, again, _worker(1.0, fn=len)], gil_calls, memory, NOW)
    assert gil_calls == {again.call}


def test_one_probe_at_a_time() -> None:
    memory = GilMemory({python_fn.__code__: GIL_AFTER})
    due = 100.0 + gil_module.PROBE_PERIOD
    assert not may_probe(memory, set(), [_worker(1.0)], python_fn, 100.0)  # starts the clock
    # Two calls compute already (the one that runs and a probe, or one past
    # HOLD_LIMIT that no longer holds the others back): no probe.
    two = [_worker(1.0), _worker(1.0, ran=gil_module.HOLD_LIMIT * 2)]
    assert not may_probe(memory, set(), two, python_fn, due)
    # Nor with one computing and one on its way to a thread.
    queued: Any = _Call(python_fn)
    queued._phase = QUEUED
    assert not may_probe(memory, {queued}, [_worker(1.0)], python_fn, due)
    # Calls of other functions, or that wait, do not count.
    others = [_worker(1.0), _worker(1.0, fn=len), _worker(0.0, waiting=True)]
    assert may_probe(memory, set(), others, python_fn, due)


async def test_held_back_calls_can_be_cancelled_and_fail_when_the_pool_closes(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    cpu_tests.measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    work = cpu_tests.gated(gate, started)
    pool = offloop.ThreadPool(8, name="gil-held")
    pool._gil_fns[work.__code__] = GIL_AFTER
    running = pool.run(work, 0)
    held = [pool.run(work, i) for i in range(1, 4)]
    await await_until(lambda: started == [0], WAIT, "the first call to start")
    await rebalances(cpu_tests.REBALANCES)
    assert started == [0]  # the others are held back, slot or not
    assert pool.statistics()["queued"] == 3
    held[1].cancel()
    stats = pool.statistics()
    assert (stats["queued"], stats["cancelled"]) == (2, 1)
    closing = asyncio.ensure_future(pool.aclose())
    await await_until(lambda: pool.state is PoolState.CLOSING, WAIT, "the pool to close")
    gate.set()
    await asyncio.wait_for(closing, WAIT)
    assert await running == 0
    for call in (held[0], held[2]):
        with pytest.raises(offloop.PoolClosedError, match="closed before this call"):
            await call
    stats = pool.statistics()
    assert (stats["queued"], stats["running"], stats["cancelled"]) == (0, 0, 3)
    assert not pool._gil_calls
    assert started == [0]

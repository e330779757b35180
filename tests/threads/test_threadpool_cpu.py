"""CPU slots: a pool runs at most ``cpu_slots`` computing calls at once; waiting calls hold none.

The policy tests replace the kernel's measurement (``Worker.busy``) with a
fixed answer, so what they assert does not depend on how loaded the machine
is; one test per answer checks the real measurement on a real thread.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import offloop
from offloop._threads import lifecycle as lifecycle_module
from offloop._threads import pool as pool_module
from offloop._threads import workers as workers_module
from offloop._threads.workers import Worker
from tests.helpers import WAIT, await_until, wait_until

SLOTS = 2
REBALANCES = 30  # looks the pool takes at its running calls before a test says "it did not grow"

pytestmark = pytest.mark.loops("asyncio")


@pytest.fixture
def two_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "DEFAULT_CPU_SLOTS", SLOTS)


def measure_as(monkeypatch: pytest.MonkeyPatch, computing: bool) -> None:
    """Make every worker thread look always busy (computing) or never busy (waiting)."""
    if computing:
        monkeypatch.setattr(Worker, "busy", lambda self: time.monotonic())
    else:
        monkeypatch.setattr(Worker, "busy", lambda self: 0.0)


@pytest.fixture
def rebalances(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Any]:
    """A waiter for the pool's rebalancing check to have run ``n`` more times."""
    count = [0]
    original = pool_module.ThreadPool._rebalance

    def counting(
        self: Any, channel: Any, loop: asyncio.AbstractEventLoop, due: float, *clocks: Any
    ) -> None:
        count[0] += 1
        original(self, channel, loop, due, *clocks)

    monkeypatch.setattr(pool_module.ThreadPool, "_rebalance", counting)

    async def wait_for(n: int) -> None:
        target = count[0] + n
        await await_until(lambda: count[0] >= target, WAIT, f"{n} rebalancing checks")

    return wait_for


#: For tests of where a thread sleeps, read from Linux's /proc/self/task/<tid>/wchan.
needs_wchan = pytest.mark.skipif(
    not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/wchan"),
    reason="where a thread sleeps is read from Linux's /proc/self/task/<tid>/wchan",
)


def gated(gate: threading.Event, started: list[int]) -> Callable[[int], int]:
    def work(i: int) -> int:
        started.append(i)
        gate.wait(WAIT)
        return i

    return work


async def test_computing_calls_beyond_the_cpu_slots_wait_and_no_thread_is_added(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(8, name="cpu-bound") as pool:
        calls = [pool.run(gated(gate, started), i) for i in range(3 * SLOTS)]
        await await_until(lambda: pool.statistics()["running"] == SLOTS, WAIT, "two calls to run")
        await rebalances(REBALANCES)
        stats = pool.statistics()
        assert (stats["running"], stats["queued"], stats["threads"]) == (SLOTS, 2 * SLOTS, SLOTS)
        assert stats["waiting"] == 0
        assert stats["cpu_slots"] == SLOTS
        assert sorted(started) == [0, 1]  # in order: the first two
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(3 * SLOTS))
        assert pool.statistics()["threads"] == SLOTS  # never grew past the slots


async def test_waiting_calls_hold_no_slot_so_the_pool_grows_to_max_workers(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(6, name="io-bound") as pool:
        calls = [pool.run(gated(gate, started), i) for i in range(8)]
        await await_until(lambda: pool.statistics()["running"] == 6, WAIT, "six calls to run")
        stats = pool.statistics()
        assert stats["threads"] == 6
        assert stats["queued"] == 2
        assert stats["waiting"] >= 6 - SLOTS  # the ones that let the others in
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(8))


async def test_a_function_whose_call_ended_waiting_gets_threads_at_once_next_time(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()
    work = gated(gate, started)
    async with offloop.ThreadPool(8, name="learns") as pool:
        # Two calls fill the slots; the check finds them waiting (while
        # others are pending, so that it looks) and starts the others.
        first = [pool.run(work, i) for i in range(4)]
        await await_until(lambda: pool.statistics()["running"] == 4, WAIT, "four calls to run")
        await await_until(lambda: pool.statistics()["waiting"] >= 2, WAIT, "two found waiting")
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first), WAIT)
        gate.clear()
        # Now the function is known to wait: new calls are dispatched at once,
        # none left pending for the check to measure first.
        second = [pool.run(work, i) for i in range(4, 9)]
        assert not pool._pending
        await await_until(lambda: pool.statistics()["running"] == 5, WAIT, "five calls to run")
        assert pool.statistics()["queued"] == 0
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*second), WAIT) == list(range(4, 9))


@needs_wchan
async def test_while_the_loop_runs_late_calls_blocked_in_io_give_their_slot_at_once(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread in recv() sleeps outside a futex, so it cannot be waiting for
    # the GIL: its slot goes to a pending call without waiting a whole window.
    measure_as(monkeypatch, computing=False)
    monkeypatch.setattr(workers_module, "WINDOW", 3600.0)  # no call waits a whole window
    reader, writer = socket.socketpair()
    async with offloop.ThreadPool(8, name="late-io") as pool:
        original = pool_module.ThreadPool._rebalance
        monkeypatch.setattr(
            pool_module.ThreadPool,
            "_rebalance",
            lambda self, channel, loop, due, *clocks: original(
                self, channel, loop, due - 1.0, *clocks
            ),
        )
        calls = [pool.run(reader.recv, 1) for _ in range(4)]
        try:
            # All four block in recv at once, on two slots, though the loop stays late.
            try:
                await await_until(lambda: pool.statistics()["running"] == 4, WAIT, "four in recv")
            except AssertionError as exc:
                with pool._lock:  # what the pool saw of each thread, for the report
                    seen = [(w.waiting, w.judged, w.in_io, w.io_read) for w in pool._workers]
                raise AssertionError(f"{exc} {pool.statistics()} {seen}") from exc
            with pool._lock:
                assert not any(w.waited_a_window() for w in pool._workers if w.waiting)
        finally:
            # However it went, no thread stays in recv (the pool's close would wait for it).
            monkeypatch.setattr(pool_module.ThreadPool, "_rebalance", original)
            writer.sendall(b"abcd")
        received = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
        assert sorted(received) == [b"a", b"b", b"c", b"d"]
    reader.close()
    writer.close()


async def test_while_the_loop_runs_late_only_calls_waiting_a_whole_window_give_their_slot(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(8, name="late") as pool:
        # Every check looks as if it ran far past its due time.
        original = pool_module.ThreadPool._rebalance
        monkeypatch.setattr(
            pool_module.ThreadPool,
            "_rebalance",
            lambda self, channel, loop, due, *clocks: original(
                self, channel, loop, due - 1.0, *clocks
            ),
        )
        calls = [pool.run(gated(gate, started), i) for i in range(4)]
        seen_unsure_waiting = False

        def check() -> bool:
            # A slot a waiting call left goes to a pending call only once that
            # call has waited over a whole window, never as soon as it looks
            # waiting (it might be waiting for the GIL).
            nonlocal seen_unsure_waiting
            with pool._lock:
                sure = sum(1 for w in pool._workers if w.waiting and w.waited_a_window())
                unsure = sum(1 for w in pool._workers if w.waiting and not w.waited_a_window())
                running = pool._running
            seen_unsure_waiting |= unsure > 0
            assert running <= SLOTS + sure, (running, sure)
            return running == 4

        # Not starved either: they all run in the end, though the loop stays late.
        await await_until(check, WAIT, "all four calls to run")
        assert seen_unsure_waiting  # the test did look while no slot could be given
        monkeypatch.setattr(pool_module.ThreadPool, "_rebalance", original)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(4))


async def test_a_cancelled_pending_call_lets_go_of_its_arguments(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=True)

    class Big:
        pass

    gate, started = threading.Event(), list[int]()
    work = gated(gate, started)
    async with offloop.ThreadPool(4, name="drops") as pool:
        running = [pool.run(work, i) for i in range(SLOTS)]
        await await_until(lambda: pool.statistics()["running"] == SLOTS, WAIT, "slots to fill")
        big = Big()
        ref = weakref.ref(big)
        pending = pool.run(lambda arg: 0, big)
        del big
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        del pending
        gc.collect()
        assert ref() is None, "a cancelled pending call kept its argument alive"
        gate.set()
        await asyncio.wait_for(asyncio.gather(*running), WAIT)


async def test_closing_fails_the_pending_calls_at_once(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=True)
    gate, started = threading.Event(), list[int]()
    pool = offloop.ThreadPool(4, name="closes")
    calls = [pool.run(gated(gate, started), i) for i in range(4)]
    await await_until(lambda: pool.statistics()["running"] == SLOTS, WAIT, "slots to fill")
    closing = asyncio.ensure_future(pool.aclose())
    for call in calls[SLOTS:]:
        with pytest.raises(offloop.PoolClosedError, match="closed before this call"):
            await asyncio.wait_for(call, WAIT)
    gate.set()
    await asyncio.wait_for(closing, WAIT)
    assert await asyncio.wait_for(asyncio.gather(*calls[:SLOTS]), WAIT) == [0, 1]


@pytest.mark.skipif(not workers_module._HAS_SCHEDSTAT, reason="needs Linux's schedstat")
async def test_the_kernel_tells_a_blocked_call_from_a_computing_one(two_slots: None) -> None:
    stop = threading.Event()

    def spin() -> int:
        n = 0
        while not stop.is_set():
            n += 1
        return n

    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(3, name="kernel") as pool:
        busy = pool.run(spin)
        blocked = pool.run(gated(gate, started), 0)
        queued = pool.run(gated(gate, started), 1)
        # No thread is left for this one: it stays pending, so the pool's check
        # keeps reading the running calls while the test looks.
        pending = pool.run(gated(gate, started), 2)

        def judged() -> bool:
            # The spinning call computes, a gated one waits. Under load a
            # window can mislead for a moment (the loop's thread preempted
            # while it holds the GIL leaves the spinning one asleep): the
            # next readings set it right.
            with pool._lock:
                waiting = {w.call for w in pool._workers if w.waiting}
            return busy not in waiting and bool(waiting & {blocked, queued})

        try:
            await await_until(lambda: pool.statistics()["running"] >= 2, WAIT, "both to run")
            await await_until(judged, WAIT, "the blocked call found waiting, the busy one not")
            # The blocked one's slot went to the queued call.
            await await_until(lambda: sorted(started) == [0, 1], WAIT, "the third call to start")
        finally:
            stop.set()
            gate.set()
        await asyncio.wait_for(asyncio.gather(busy, blocked, queued, pending), WAIT)


def test_the_default_cpu_slots_are_one_more_than_the_cpus_this_process_may_use() -> None:
    if hasattr(os, "sched_getaffinity"):
        expected = len(os.sched_getaffinity(0))
    else:
        expected = os.cpu_count() or 1
    assert expected + 1 == workers_module.DEFAULT_CPU_SLOTS
    assert offloop.ThreadPool(1).statistics()["cpu_slots"] == 1  # never more than max_workers


async def test_max_workers_can_be_raised_and_lowered_while_the_pool_runs(
    two_slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure_as(monkeypatch, computing=False)
    gate, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(2, name="resized") as pool:
        calls = [pool.run(gated(gate, started), i) for i in range(5)]
        await await_until(lambda: pool.statistics()["running"] == 2, WAIT, "two calls to run")
        pool.max_workers = 4
        await await_until(lambda: pool.statistics()["running"] == 4, WAIT, "four calls to run")
        assert pool.statistics()["threads"] == 4
        pool.max_workers = 1
        assert pool.statistics()["cpu_slots"] == 1
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == list(range(5))
        assert pool.statistics()["threads"] <= 4  # none started above the new bound
        with pytest.raises(ValueError, match=r"ThreadPool.max_workers = ... must be at least 1"):
            pool.max_workers = 0
        with pytest.raises(TypeError, match="must be a positive int"):
            pool.max_workers = 2.5  # type: ignore[assignment]
        assert pool.max_workers == 1


async def test_the_default_pools_are_public_for_sizing_and_statistics() -> None:
    pool = offloop.default_thread_pool()
    assert await offloop.to_thread(threading.get_ident) != threading.get_ident()
    assert pool is offloop.default_thread_pool()
    assert pool.statistics()["completed"] >= 1
    assert offloop.default_process_pool().max_workers >= 1


async def test_a_thread_that_fails_to_start_while_the_pool_closes_does_not_hang_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measure_as(monkeypatch, computing=True)
    monkeypatch.setattr(pool_module, "DEFAULT_CPU_SLOTS", 4)
    gate, started = threading.Event(), list[int]()
    pool = offloop.ThreadPool(4, name="giveup")
    closed = threading.Event()
    real_start = threading.Thread.start
    armed = [True]

    def close_it() -> None:
        pool.close()  # no timeout: a close that never completes hangs here
        closed.set()

    def failing_start(self: threading.Thread) -> None:
        # The pool's next new thread: close the pool meanwhile, let its one
        # running worker exit, then fail as a thread limit would.
        if armed[0] and self.name.startswith("offloop-giveup-"):
            armed[0] = False
            threading.Thread(target=close_it, daemon=True).start()
            wait_until(lambda: pool.state.value != "open", WAIT, "the close")
            gate.set()
            wait_until(
                lambda: all(w.thread is None or not w.thread.is_alive() for w in pool._workers),
                WAIT,
                "the running worker to exit",
            )
            raise RuntimeError("can't start new thread")
        real_start(self)

    first = pool.run(gated(gate, started), 0)
    await await_until(lambda: started == [0], WAIT, "the first call to run")
    monkeypatch.setattr(threading.Thread, "start", failing_start)
    rest = [pool.run(int, i) for i in range(3)]  # pending: the check starts threads for them
    outcomes = await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), WAIT)
    assert outcomes[0] == 0
    assert all(isinstance(o, offloop.PoolClosedError) for o in outcomes[1:])
    assert await asyncio.to_thread(closed.wait, WAIT), "close() never returned"


def ran(started: list[int], n: int) -> bool:
    return len(started) == n


class Start:
    """One worker thread the pool started: by which thread, when, and whether it starts the rest."""

    def __init__(self, worker: Worker, starts_others: bool) -> None:
        self.worker = worker
        self.by = threading.current_thread().name
        self.at = time.monotonic()
        self.starts_others = starts_others


def record_starts(monkeypatch: pytest.MonkeyPatch) -> list[Start]:
    """Every thread start of every ThreadPool from now on, in order."""
    starts: list[Start] = []
    real_start = pool_module.ThreadPool._start_thread

    def spy(self: Any, worker: Worker, *, starts_others: bool = False) -> None:
        starts.append(Start(worker, starts_others))
        real_start(self, worker, starts_others=starts_others)

    monkeypatch.setattr(pool_module.ThreadPool, "_start_thread", spy)
    return starts


def named(gate: threading.Event, threads: dict[int, str]) -> Callable[[int], int]:
    """A call that notes the thread it runs on, then waits for ``gate``."""

    def blocked(i: int) -> int:
        threads[i] = threading.current_thread().name
        gate.wait(WAIT)
        return i

    return blocked


async def test_a_thread_wanted_beside_busy_ones_is_started_by_the_next_worker_to_end_a_call(
    monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    # Thread.start() waits until the new thread runs: under GIL contention
    # that stalls the caller for several switch intervals, so the loop leaves
    # a wanted thread to a worker that ends a call, for START_GRACE. With a
    # grace that never runs out, nothing but a worker may start it, however
    # often the pool looks and however slow the machine is.
    monkeypatch.setattr(lifecycle_module, "START_GRACE", 3600.0)
    starts = record_starts(monkeypatch)
    loop_thread = threading.current_thread().name
    first_gate, second_gate = threading.Event(), threading.Event()
    threads: dict[int, str] = {}
    async with offloop.ThreadPool(4, name="starts") as pool:
        first_fn, second_fn = named(first_gate, threads), named(second_gate, threads)
        # As if the pool had learnt that these wait: their calls take threads at once.
        pool._waits[first_fn.__code__] = workers_module.WAITS_AFTER
        first = pool.run(first_fn, 1)
        # The pool's first thread: nobody else could start it, so run() does.
        assert [(s.by, s.starts_others) for s in starts] == [(loop_thread, True)]
        await await_until(lambda: 1 in threads, WAIT, "the first call to run")
        second = pool.run(second_fn, 2)  # wants a thread of its own: the only one is busy
        assert len(pool._unstarted) == 1
        await rebalances(REBALANCES)
        assert len(starts) == 1, "the loop started a thread a worker was to start"
        assert len(pool._unstarted) == 1
        assert 2 not in threads
        first_gate.set()
        assert await asyncio.wait_for(first, WAIT) == 1
        await await_until(lambda: 2 in threads, WAIT, "the second call to run")
        # Started by the worker whose call ended, after it posted its result.
        assert [(s.by, s.starts_others) for s in starts[1:]] == [(threads[1], False)]
        assert pool._unstarted == []
        second_gate.set()
        assert await asyncio.wait_for(second, WAIT) == 2


async def test_the_loop_starts_a_wanted_thread_once_no_worker_came_by_for_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every worker is blocked, so none ends a call to start the threads the
    # new calls want: after START_GRACE the loop starts one itself, and that
    # thread starts the others (the loop pays for one start only).
    starts = record_starts(monkeypatch)
    loop_thread = threading.current_thread().name
    gate, started = threading.Event(), list[int]()
    blocked = gated(gate, started)
    async with offloop.ThreadPool(4, name="late-start") as pool:
        pool._waits[blocked.__code__] = workers_module.WAITS_AFTER
        calls = [pool.run(blocked, 1)]
        await await_until(functools.partial(ran, started, 1), WAIT, "the first call to run")
        wanted = time.monotonic()
        calls += [pool.run(blocked, 2), pool.run(blocked, 3)]
        assert len(starts) == 1
        assert len(pool._unstarted) == 2
        await await_until(functools.partial(ran, started, 3), WAIT, "the wanted threads to run")
        by_loop, by_new = starts[1:]
        assert (by_loop.by, by_loop.starts_others) == (loop_thread, True)
        assert by_loop.at - wanted > lifecycle_module.START_GRACE, "started within the grace"
        assert by_loop.worker.thread is not None
        assert (by_new.by, by_new.starts_others) == (by_loop.worker.thread.name, False)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [1, 2, 3]


async def test_a_module_c_function_found_waiting_takes_threads_at_once() -> None:
    # select.select (a C function, no code object) blocks outside the CPU:
    # once a call of it was found waiting, its next calls take a thread each
    # as they are submitted, with no check of the pool needed (the loop is
    # kept busy below, so none can run) and beyond the CPU slots.
    pipes = [os.pipe() for _ in range(2)]
    try:
        async with offloop.ThreadPool(4, name="c-wait") as pool:
            first: list[Any] = [
                pool.run(select.select, [pipes[0][0]], [], [], WAIT) for _ in range(3)
            ]
            await await_until(
                lambda: pool.statistics()["running"] == 3, what="the first calls to run"
            )
            os.write(pipes[0][1], b"x")
            await asyncio.gather(*first)
            second: list[Any] = [
                pool.run(select.select, [pipes[1][0]], [], [], WAIT) for _ in range(3)
            ]
            wait_until(lambda: pool.statistics()["running"] == 3, what="all three at once")
            os.write(pipes[1][1], b"x")
            assert all(ready == [pipes[1][0]] for ready, _, _ in await asyncio.gather(*second))
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


async def test_lowering_max_workers_holds_the_running_calls_to_it(
    two_slots: None, monkeypatch: pytest.MonkeyPatch, rebalances: Callable[[int], Any]
) -> None:
    # Calls that wait hold no CPU slot, so only max_workers bounds them: the
    # threads left above a lowered bound (idle, or busy with a call) must not
    # take new calls, or a pool sized to a driver's connections overruns it.
    measure_as(monkeypatch, computing=False)
    first, started = threading.Event(), list[int]()
    async with offloop.ThreadPool(3, name="lowered") as pool:
        warm = [pool.run(gated(first, started), i) for i in range(3)]
        await await_until(lambda: pool.statistics()["running"] == 3, WAIT, "three calls to run")
        first.set()
        await asyncio.wait_for(asyncio.gather(*warm), WAIT)
        assert pool.statistics()["idle"] == 3
        pool.max_workers = 1
        await await_until(
            lambda: pool.statistics()["threads"] == 1, WAIT, "the idle threads above it to end"
        )
        second, started = threading.Event(), []
        busy = [pool.run(gated(second, started), i) for i in range(3)]
        await await_until(lambda: started == [0], WAIT, "the first call to start")
        await rebalances(REBALANCES)
        stats = pool.statistics()
        assert (stats["running"], stats["queued"], stats["threads"]) == (1, 2, 1)
        second.set()
        assert await asyncio.wait_for(asyncio.gather(*busy), WAIT) == [0, 1, 2]

        # Lowered while its threads are busy: each ends as its call ends, and
        # the calls queued meanwhile then run one at a time.
        pool.max_workers = 3
        third, fourth, started = threading.Event(), threading.Event(), []
        running = [pool.run(gated(third, started), i) for i in range(3)]
        await await_until(lambda: pool.statistics()["running"] == 3, WAIT, "three calls to run")
        queued = [pool.run(gated(fourth, started), i) for i in range(3, 6)]
        pool.max_workers = 1
        third.set()
        await asyncio.wait_for(asyncio.gather(*running), WAIT)
        await await_until(lambda: len(started) == 4, WAIT, "one queued call to start")
        await rebalances(REBALANCES)
        stats = pool.statistics()
        assert (stats["running"], stats["queued"], stats["threads"]) == (1, 2, 1)
        fourth.set()
        assert await asyncio.wait_for(asyncio.gather(*queued), WAIT) == [3, 4, 5]

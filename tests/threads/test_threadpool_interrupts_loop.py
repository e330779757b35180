"""A KeyboardInterrupt in a thread pool's loop callbacks: its periodic check, its batch flush.

Besides ``run()`` (test_threadpool_interrupts.py), the loop runs two of the
pool's functions under its lock: ``_rebalance``, the check that dispatches
pending calls into free CPU slots and starts threads, and ``_flush``, which
hands the calls a loop iteration batched to the pool. Each test sets up a
pool through its public API, calls the function as the loop would, with
KeyboardInterrupt raised at one point after another (tests/threads/
interrupt_points.py), and checks that the pool is whole afterwards: every
call runs once and its awaiter gets the result, no count is left over, no
thread or check is lost, the next call runs, and it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from time import monotonic
from types import CodeType
from typing import Any

import pytest

import offloop
from offloop._threads import closing, dispatch, growth, lifecycle, view
from tests.helpers import WAIT, await_until
from tests.threads.interrupt_points import (
    closed_with_no_thread_left,
    count_points,
    interrupted_at,
)

REBALANCE: CodeType = growth.ThreadPoolGrowth._rebalance.__code__
FLUSH: CodeType = dispatch.ThreadPoolDispatch._flush.__code__


async def _busy_and_idle(pool: offloop.ThreadPool, gate: threading.Event) -> Any:
    """Leave ``pool`` with one thread busy on ``gate`` and one idle; returns the busy call."""
    busy = pool.run(gate.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT, "the busy call")
    first = threading.Event()
    # The pool's check starts a second thread for it (a slot is free).
    other = pool.run(first.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 2, WAIT, "a second thread")
    first.set()
    assert await asyncio.wait_for(other, WAIT) is True
    await await_until(lambda: pool.statistics()["idle"] == 1, WAIT, "the second thread idle")
    # As if the pool's check had last found the busy call computing (its
    # thread blocks, so it may have been found waiting already): it holds
    # the CPU slot, and the calls made next wait in _pending.
    with pool._lock:
        for w in pool._workers:
            if w.call is not None and w.waiting:
                w.waiting = w.presumed = False
                pool._waiting -= 1
    return busy


async def _interrupt(situation: str, n: int) -> bool:
    """Run the situation's check or flush, interrupted at point ``n``; False past the last."""
    loop = asyncio.get_running_loop()
    pool = offloop.ThreadPool(1 if situation.endswith("busy pool") else 2, name=f"intr-{n}")
    gate = threading.Event()
    ran: list[int] = []
    try:
        if situation.endswith("busy pool"):
            busy = pool.run(gate.wait, WAIT)
            await await_until(lambda: pool.statistics()["running"] == 1, WAIT, "the busy call")
        else:
            busy = await _busy_and_idle(pool, gate)
            pool.cpu_slots = 1  # the busy call holds the only one
        # A fan-out: the first call waits in _pending and opens the loop's
        # batch, the others join it.
        calls = [pool.run(ran.append, i) for i in range(4)]
        channel = calls[0]._channel
        assert channel.batch is not None
        assert len(channel.batch) == 3
        if situation.startswith("check"):
            # The batch's flush, as the loop runs it: without a turn of the
            # loop, whose check would measure the busy call meanwhile.
            pool._flush(channel)
            assert pool.statistics()["queued"] == 4
        if situation.endswith("busy pool"):
            pool.max_workers = 3  # room for threads of their own
        else:
            pool.cpu_slots = 2  # a free slot for the idle thread
        code = REBALANCE if situation.startswith("check") else FLUSH
        with interrupted_at(n, code) as where:
            try:
                if code is FLUSH:
                    pool._flush(channel)
                else:
                    # Due now: on time, so it counts no call as waiting
                    # only because the loop runs late.
                    pool._rebalance(channel, loop, loop.time() + 1)
                    if situation == "check, late start, busy pool" and not where:
                        # The threads wanted were not started: no worker
                        # came by. Past START_GRACE the next check starts one.
                        wanted = pool._start_wanted
                        while monotonic() - wanted <= lifecycle.START_GRACE:
                            pass
                        pool._rebalance(channel, loop, loop.time() + 1)
            except KeyboardInterrupt:
                pass
        reached = bool(where and where[0])
        gate.set()
        await _whole(pool, busy, calls, ran, channel, where)
    finally:
        gate.set()
        await closed_with_no_thread_left(pool, where)
    return reached


async def _whole(
    pool: offloop.ThreadPool,
    busy: Any,
    calls: list[Any],
    ran: list[int],
    channel: Any,
    where: list[str],
) -> None:
    try:
        assert await asyncio.wait_for(busy, WAIT) is True, where
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [None] * 4, where
        assert sorted(ran) == [0, 1, 2, 3], where
        assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2, where
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, f"the calls ({where})")
        # The loop's check ends once nothing is pending (none left armed).
        await await_until(lambda: not pool._armed, WAIT, f"the check to end ({where})")
        assert channel.batch is None, where
        assert (pool.statistics()["queued"], pool._ready, pool._backlog) == (0, 0, 0), where
        assert not pool._starting, where
        assert not pool._unstarted, where
        assert pool._gil_calls == set(), where
    except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
        raise AssertionError(f"interrupted at {where}: {exc!r}") from exc


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize(
    "situation",
    [
        # Its first check dispatches to new threads; its second starts one.
        "check, late start, busy pool",
        "check, idle thread",
        "flush, busy pool",
        "flush, idle thread",
    ],
)
async def test_a_check_or_flush_interrupted_anywhere_leaves_the_pool_whole(situation: str) -> None:
    assert await count_points(lambda n: _interrupt(situation, n), limit=400) > 0


_max_workers: Any = vars(view.ThreadPoolView)["max_workers"]  # the property itself
MAX_WORKERS_SET: CodeType = _max_workers.fset.__code__
BEGIN_CLOSE: CodeType = closing.ThreadPoolClosing._begin_close.__code__


async def _three_idle(pool: offloop.ThreadPool) -> None:
    gate = threading.Event()
    calls = [pool.run(gate.wait, WAIT) for _ in range(3)]
    await await_until(lambda: pool.statistics()["running"] == 3, WAIT, "three threads")
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [True] * 3
    await await_until(lambda: pool.statistics()["idle"] == 3, WAIT, "three idle threads")


async def _interrupt_idle_handover(what: str, n: int) -> bool:
    """Interrupt a lowered max_workers, or a close, at point ``n``; False past the last."""
    pool = offloop.ThreadPool(3, name=f"intr-{what}-{n}", cpu_slots=3)
    try:
        await _three_idle(pool)
        code = MAX_WORKERS_SET if what == "max_workers" else BEGIN_CLOSE
        waiter = threading.Event()
        with interrupted_at(n, code) as where:
            try:
                if what == "max_workers":
                    pool.max_workers = 1
                else:
                    pool._begin_close(waiter)
            except KeyboardInterrupt:
                pass
        reached = bool(where and where[0])
        if what == "max_workers":
            # The threads told to go end; the pool still works.
            await await_until(
                lambda: pool.statistics()["threads"] <= 3 - pool._retiring, WAIT, f"{where}"
            )
            assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2, where
    finally:
        # A close interrupted before it told a thread to go is finished by
        # this one; either way no idle thread may be left untold.
        await closed_with_no_thread_left(pool, where)
    return reached


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("what", ["max_workers", "close"])
async def test_idle_threads_told_to_go_are_never_lost_to_an_interrupt(what: str) -> None:
    assert await count_points(lambda n: _interrupt_idle_handover(what, n), limit=200) > 0


async def _interrupt_close_with_calls(n: int) -> bool:
    """Interrupt the close of a busy pool with calls pending at point ``n``; False past the last."""
    pool = offloop.ThreadPool(1, name=f"intr-closecalls-{n}", cpu_slots=1)
    gate = threading.Event()
    where: list[str] = []
    try:
        busy = pool.run(gate.wait, WAIT)
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT, "the busy call")
        calls = [pool.run(abs, -i) for i in range(4)]
        pool._flush(calls[0]._channel)  # all four pending, none batched
        assert pool.statistics()["queued"] == 4
        with interrupted_at(n, BEGIN_CLOSE) as where, contextlib.suppress(KeyboardInterrupt):
            pool._begin_close(threading.Event())
        gate.set()
        # The next close finishes what the interrupted one began: each
        # refused call's awaiter is told, once.
        await asyncio.wait_for(pool.aclose(), WAIT)
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)
        # Refused, or (interrupted before it refused them) run by the thread
        # that came free meanwhile: either way answered.
        assert all(
            isinstance(o, offloop.PoolClosedError) or o == i for i, o in enumerate(outcomes)
        ), (where, outcomes)
        assert await asyncio.wait_for(busy, WAIT) is True, where
        assert pool.statistics()["queued"] == 0, where
        assert pool._unposted == [], where
    finally:
        gate.set()
        await closed_with_no_thread_left(pool, where)
    return bool(where and where[0])


@pytest.mark.loops("asyncio")
async def test_a_close_interrupted_anywhere_still_answers_every_refused_call() -> None:
    assert await count_points(_interrupt_close_with_calls, limit=300) > 0

"""Batched submits: the calls a loop makes while the pool is busy reach it together.

A call that finds a thread and a CPU slot free goes out at once, as a lone
``await`` makes it. Once a call has to wait in the pool, the further calls
the same loop makes in that iteration wait in the loop's batch (phase
BATCHED, not yet counted by the pool), and the loop hands them all to the
pool at its next iteration under one lock. These tests pin what that must
not change: order, cancellation, closing, and loops that stop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

import offloop
from offloop._core.offload import CallPhase
from tests.helpers import WAIT, wait_until


class Busy:
    """A one-thread pool whose thread is held by a call until ``release()``."""

    def __init__(self) -> None:
        self.pool = offloop.ThreadPool(1, name="batch")
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ran: list[int] = []
        self.held = self.pool.run(self._hold)
        assert self.started.wait(WAIT), "the holding call never started"

    def _hold(self) -> str:
        self.started.set()
        self.gate.wait(WAIT)
        return "held"

    def record(self, i: int) -> int:
        self.ran.append(i)
        return i * 10

    def release(self) -> None:
        self.gate.set()


async def test_calls_made_while_the_pool_is_busy_reach_it_together_at_the_next_iteration() -> None:
    busy = Busy()
    pool = busy.pool
    first = pool.run(busy.record, 1)  # waits in the pool: the loop starts a batch
    rest = [pool.run(busy.record, i) for i in (2, 3, 4)]
    assert [call._phase for call in rest] == [CallPhase.BATCHED] * 3
    assert pool.statistics()["queued"] == 1
    await asyncio.sleep(0)  # one iteration: the batch goes to the pool
    assert [call._phase for call in rest] == [CallPhase.QUEUED] * 3
    assert pool.statistics()["queued"] == 4
    busy.release()
    assert await asyncio.gather(busy.held, first, *rest) == ["held", 10, 20, 30, 40]
    assert busy.ran == [1, 2, 3, 4]  # one thread: in the order they were made
    await pool.aclose()


async def test_a_call_cancelled_in_the_batch_never_runs_and_is_counted_once() -> None:
    busy = Busy()
    pool = busy.pool
    first = pool.run(busy.record, 1)
    dropped = pool.run(busy.record, 2)
    last = pool.run(busy.record, 3)
    assert dropped._phase is CallPhase.BATCHED
    assert dropped.cancel()
    assert dropped.cancelled()
    assert dropped.token.is_set()
    await asyncio.sleep(0)
    busy.release()
    assert list(await asyncio.gather(busy.held, first, last)) == ["held", 10, 30]
    assert busy.ran == [1, 3]
    stats = pool.statistics()
    assert stats["queued"] == 0
    assert stats["cancelled"] == 1
    assert stats["completed"] == 3
    await pool.aclose()


async def test_closing_the_pool_before_the_batch_goes_out_fails_its_calls() -> None:
    busy = Busy()
    pool = busy.pool
    first = pool.run(busy.record, 1)
    batched = [pool.run(busy.record, i) for i in (2, 3)]
    # Closed from another thread while this loop is still in the same iteration.
    closer = threading.Thread(target=pool.close, kwargs={"timeout": WAIT})
    closer.start()
    wait_until(lambda: pool.statistics()["state"] != "open", what="the close to begin")
    with pytest.raises(offloop.PoolClosedError):
        pool.run(busy.record, 4)  # refused at once, though this loop has a batch open
    await asyncio.sleep(0)
    for call in (first, *batched):
        with pytest.raises(offloop.PoolClosedError, match="closed before this call"):
            await call
    busy.release()
    assert await busy.held == "held"  # a running call is waited for, as before
    closer.join(WAIT)
    assert not closer.is_alive()
    assert busy.ran == []
    stats = pool.statistics()
    assert (stats["state"], stats["queued"], stats["cancelled"]) == ("closed", 0, 3)


async def test_a_lone_call_goes_out_at_once_and_another_pool_is_not_held_by_the_batch() -> None:
    busy = Busy()
    busy.pool.run(busy.record, 1)
    batched = busy.pool.run(busy.record, 2)
    assert batched._phase is CallPhase.BATCHED
    ran = threading.Event()
    async with offloop.ThreadPool(1, name="other") as other:
        call = other.run(ran.set)
        # No await: the call runs while this loop is still in its iteration.
        assert ran.wait(WAIT)
        await call
    busy.release()
    assert await batched == 20
    await busy.pool.aclose()


def run_stopping(loop: asyncio.AbstractEventLoop, make: Callable[[], None]) -> None:
    """Run one iteration of ``loop`` in which ``make()`` runs and the loop is stopped."""

    def body() -> None:
        make()
        loop.stop()

    loop.call_soon(body)
    loop.run_forever()


def test_a_batch_waits_while_its_loop_is_stopped_and_goes_out_when_it_runs_again() -> None:
    loop = asyncio.new_event_loop()
    try:
        busy = loop.run_until_complete(_make_busy())
        calls: list[offloop.OffloadFuture[int]] = []
        run_stopping(loop, lambda: calls.extend(busy.pool.run(busy.record, i) for i in (1, 2)))
        assert calls[1]._phase is CallPhase.BATCHED
        busy.release()
        assert loop.run_until_complete(asyncio.gather(*calls)) == [10, 20]
        loop.run_until_complete(busy.pool.aclose())
    finally:
        loop.close()


def test_a_batch_of_a_loop_closed_before_it_went_out_never_runs() -> None:
    loop = asyncio.new_event_loop()
    busy = loop.run_until_complete(_make_busy())
    calls: list[offloop.OffloadFuture[int]] = []
    try:
        run_stopping(loop, lambda: calls.extend(busy.pool.run(busy.record, i) for i in (1, 2)))
    finally:
        loop.close()
    busy.release()
    # The call already in the pool runs (its result reaches nobody); the
    # batched one never reaches the pool.
    wait_until(lambda: busy.pool.statistics()["completed"] == 2, what="the pooled call to end")
    busy.pool.close(timeout=WAIT)
    assert busy.ran == [1]
    stats = busy.pool.statistics()
    assert (stats["state"], stats["queued"], stats["completed"]) == ("closed", 0, 2)
    assert calls[1]._phase is CallPhase.BATCHED


async def _make_busy() -> Busy:
    return Busy()

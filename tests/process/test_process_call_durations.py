"""ProcessPool.call_durations() and queue_waits(): real calls in real worker processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from offloop._core.latency import CALL_BUCKETS
from offloop._process.pool import ProcessPool
from tests.helpers import SPAWN_WAIT, await_until, bounded, wait_for_file


@bounded(SPAWN_WAIT)
async def test_process_calls_are_counted_and_a_sleeping_call_lands_above_its_bound() -> None:
    async with ProcessPool(1, name="proc-durations") as pool:
        assert pool.call_durations()["count"] == 0
        for i in range(5):
            assert await pool.run(abs, -i) == i
        with pytest.raises(ValueError, match="not a number"):
            await pool.run(int, "not a number")
        # The child sleeps at least this long between taking the call and replying.
        await pool.run(time.sleep, 0.06)
        hist = pool.call_durations()
    assert [b for b, _ in hist["buckets"]] == [*CALL_BUCKETS, float("inf")]
    counts = [c for _, c in hist["buckets"]]
    assert counts == sorted(counts)
    assert hist["count"] == counts[-1] == 7  # completed and failed alike
    assert dict(hist["buckets"])[0.05] <= 6  # the sleeping call is above 50 ms
    assert hist["sum"] >= 0.06


# The recording is in the pool's manager thread, whatever the loop: one loop kind.
@pytest.mark.loops("asyncio")
@bounded(SPAWN_WAIT)
async def test_a_call_queued_behind_a_busy_worker_process_shows_its_wait(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    async with ProcessPool(1, name="proc-queue-wait") as pool:
        assert await pool.run(abs, -1) == 1  # the one worker is up
        first = pool.run(wait_for_file, str(gate), str(started))
        await await_until(started.exists, SPAWN_WAIT, "the first call to start")
        # The one worker is busy: this call waits in the queue from here on.
        second = pool.run(abs, -2)
        queued_at = time.monotonic()  # run() stamped it before this
        assert pool.statistics()["queued"] == 1
        await asyncio.sleep(0.07)
        held_for = time.monotonic() - queued_at
        gate.touch()
        assert await first > 0
        assert await second == 2
        waits = pool.queue_waits()
        runs = pool.call_durations()
    assert waits["count"] == runs["count"] == 3
    assert [b for b, _ in waits["buckets"]] == [*CALL_BUCKETS, float("inf")]
    # Stamped by run() before queued_at, handed to the worker after the gate.
    assert held_for > 0.05
    assert dict(waits["buckets"])[0.05] <= 2
    assert waits["sum"] >= held_for

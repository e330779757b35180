"""ProcessPool.call_durations(): real calls in real worker processes fill the histogram."""

from __future__ import annotations

import time

import pytest

from offloop._core.latency import CALL_BUCKETS
from offloop._process.pool import ProcessPool
from tests.helpers import SPAWN_WAIT, bounded


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

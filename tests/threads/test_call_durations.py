"""ThreadPool.call_durations() and queue_waits(): real calls through a real pool fill them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from offloop import ThreadPool
from offloop._core.latency import CALL_BUCKETS
from tests.helpers import WAIT, bounded


def _fails() -> None:
    raise ValueError("boom")


@bounded(10)
async def test_every_ended_call_is_counted_once_and_the_buckets_are_cumulative() -> None:
    async with ThreadPool(max_workers=4, name="durations") as pool:
        empty = pool.call_durations()
        assert empty["count"] == 0
        assert empty["sum"] == 0
        assert [b for b, _ in empty["buckets"]] == [*CALL_BUCKETS, float("inf")]
        results = await asyncio.gather(*(pool.run(abs, -i) for i in range(50)))
        assert results == list(range(50))
        with pytest.raises(ValueError, match="boom"):
            await pool.run(_fails)
        hist = pool.call_durations()
    assert hist["count"] == 51  # completed and failed calls alike
    assert pool.queue_waits()["count"] == 51  # the same calls
    counts = [c for _, c in hist["buckets"]]
    assert counts == sorted(counts)
    assert counts[-1] == hist["count"]
    assert hist["sum"] > 0


def _holder(started: threading.Event, release: threading.Event) -> Callable[[], str]:
    """A function that sets ``started``, then waits (bounded) for ``release``."""

    def held() -> str:
        started.set()
        if not release.wait(WAIT):
            raise TimeoutError("the test never released the call")
        return "done"

    return held


@bounded(10)
async def test_a_call_held_past_a_bound_lands_above_that_bucket() -> None:
    started = threading.Event()
    release = threading.Event()

    held = _holder(started, release)

    async with ThreadPool(max_workers=1, name="held") as pool:
        assert await pool.run(abs, -1) == 1  # a quick one, for contrast
        call = pool.run(held)
        await asyncio.to_thread(started.wait, WAIT)
        assert started.is_set()
        # The worker stamped the call before it set started: whatever the
        # scheduling, the call has now run at least this long.
        await asyncio.sleep(0.07)
        release.set()
        assert await call == "done"
        hist = pool.call_durations()
    by_bound = dict(hist["buckets"])
    assert hist["count"] == 2
    assert by_bound[0.05] <= 1  # the held call is not at or under 50 ms
    assert by_bound[float("inf")] == 2
    assert hist["sum"] >= 0.05


@bounded(10)
async def test_a_call_queued_behind_a_blocked_worker_shows_its_wait() -> None:
    started = threading.Event()
    release = threading.Event()

    held = _holder(started, release)

    async with ThreadPool(max_workers=1, name="queue-wait") as pool:
        assert pool.queue_waits()["count"] == 0
        first = pool.run(held)
        await asyncio.to_thread(started.wait, WAIT)
        assert started.is_set()
        # The one thread is held: this call waits in the queue from here on.
        second = pool.run(abs, -2)
        queued_at = time.monotonic()  # run() stamped it before this
        assert pool.statistics()["queued"] == 1
        await asyncio.sleep(0.07)
        held_for = time.monotonic() - queued_at
        release.set()
        assert await first == "done"
        assert await second == 2
        waits = pool.queue_waits()
        runs = pool.call_durations()
    # Both histograms count the same calls.
    assert waits["count"] == runs["count"] == 2
    assert [b for b, _ in waits["buckets"]] == [*CALL_BUCKETS, float("inf")]
    # The second call was stamped by run() before queued_at and taken only
    # after the release: at least held_for (about 70 ms) in the queue.
    assert held_for > 0.05
    assert dict(waits["buckets"])[0.05] <= 1
    assert waits["sum"] >= held_for
    assert dict(waits["buckets"])[float("inf")] == 2

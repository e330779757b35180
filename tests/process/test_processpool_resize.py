"""ProcessPool.max_workers set while the pool runs: more processes at once, or fewer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import offloop
from offloop._process.pool import ProcessPool
from offloop._process.toprocess import default_process_pool
from tests.helpers import SPAWN_WAIT, await_until, wait_for_file

# Processes are what is resized; the kind of loop awaiting them does not matter.
pytestmark = pytest.mark.loops("asyncio")


def pid() -> int:
    return os.getpid()


async def test_raising_max_workers_starts_a_process_for_a_queued_call(tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    async with ProcessPool(1, name="grow") as pool:
        held = pool.run(wait_for_file, str(gate), str(started), SPAWN_WAIT)
        await await_until(started.exists, SPAWN_WAIT, "the first call to start")
        queued = pool.run(pid)
        assert pool.statistics()["queued"] == 1  # no second process at max_workers=1
        pool.max_workers = 2
        # It runs while the first call still holds its process: a second one started.
        other = await asyncio.wait_for(queued, SPAWN_WAIT)
        assert pool.statistics()["processes"] == 2
        gate.touch()
        assert await asyncio.wait_for(held, SPAWN_WAIT) != other


async def test_lowering_max_workers_stops_idle_processes_and_busy_ones_as_they_end(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    async with ProcessPool(3, name="shrink") as pool:
        first = [tmp_path / f"started{i}" for i in range(3)]
        calls = [pool.run(wait_for_file, str(gate), str(s), SPAWN_WAIT) for s in first]
        await await_until(lambda: all(s.exists() for s in first), SPAWN_WAIT, "three calls")
        pool.max_workers = 1
        assert pool.max_workers == 1
        # Running calls are never interrupted.
        assert pool.statistics()["processes"] == 3
        gate.touch()
        assert len(set(await asyncio.wait_for(asyncio.gather(*calls), SPAWN_WAIT))) == 3
        # Two of the three exit as they end their calls; one stays for the next call.
        await await_until(lambda: pool.statistics()["processes"] == 1, SPAWN_WAIT, "one process")
        assert len({await pool.run(pid) for _ in range(3)}) == 1


async def test_lowering_max_workers_asks_idle_processes_to_exit_at_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with ProcessPool(2, name="idle") as pool:
        started = [tmp_path / f"started{i}" for i in range(2)]
        calls = [pool.run(wait_for_file, str(gate), str(s), SPAWN_WAIT) for s in started]
        await await_until(lambda: all(s.exists() for s in started), SPAWN_WAIT, "two calls")
        gate.touch()
        await asyncio.wait_for(asyncio.gather(*calls), SPAWN_WAIT)
        assert pool.statistics()["processes"] == 2  # both idle now
        pool.max_workers = 1
        await await_until(lambda: pool.statistics()["processes"] == 1, SPAWN_WAIT, "one process")


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (1.5, TypeError), (None, TypeError)])
def test_a_bad_max_workers_is_refused_and_changes_nothing(value: object, error: type) -> None:
    pool = ProcessPool(2, name="bad")
    try:
        with pytest.raises(error, match=r"ProcessPool\.max_workers"):
            pool.max_workers = value  # type: ignore[assignment]
        assert pool.max_workers == 2
    finally:
        pool.close()


def test_the_default_process_pool_is_resized_through_its_property() -> None:
    # The documented way: offloop.default_process_pool().max_workers = n.
    pool = offloop.default_process_pool()
    assert pool is default_process_pool()
    before = pool.max_workers
    try:
        pool.max_workers = before + 1
        assert pool.statistics()["max_workers"] == before + 1
    finally:
        pool.max_workers = before

"""DaskPool's counters and histograms, and its series in /metrics, on a real LocalCluster.

The cluster fixtures are test_dask.py's: one cluster for this module.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._core.latency import CALL_BUCKETS
from offloop._supervisor.metrics import metrics_text
from offloop._supervisor.statusserver import start_status_server
from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import await_until, wait_for_file
from tests.process.test_dask import add, cluster, offload_thread, reject
from tests.supervisor.test_metrics import _parse, _value
from tests.supervisor.test_probes import get

pytest.importorskip("distributed")

pytestmark = pytest.mark.loops("asyncio")

__all__ = ["cluster", "offload_thread"]  # fixtures, used by name


async def test_counters_histograms_and_metrics_of_a_dask_pool(cluster: Any, tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    sv = offloop.Supervisor(name="dask-metrics")
    async with sv, offloop.DaskPool(cluster.scheduler_address, name="cluster") as pool:
        assert pool.name == "cluster"
        assert pool.statistics() == {
            "state": "open",
            "queued": 0,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
        }
        for i in range(3):
            assert (await asyncio.wait_for(pool.run(add, i, 1), WAIT))[0] == i + 1
        with pytest.raises(LookupError, match="no key"):
            await asyncio.wait_for(pool.run(reject, "key"), WAIT)
        # A call held on a worker is running (handed to the cluster), not queued.
        held = pool.run(wait_for_file, str(gate), str(started))
        await await_until(started.exists, WAIT, "the held call to start on the cluster")
        assert pool.statistics()["running"] == 1
        assert pool.statistics()["queued"] == 0
        seen_running = time.monotonic()  # it was handed to the client before this
        await asyncio.sleep(0.06)
        held_for = time.monotonic() - seen_running
        gate.touch()
        assert await asyncio.wait_for(held, WAIT) > 0
        cancelled = pool.run(time.sleep, 5)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # Dropped (or cancelled on the cluster) by the client's loop, soon after.
        await await_until(
            lambda: pool.statistics()["queued"] + pool.statistics()["running"] == 0,
            WAIT,
            "the cancelled call to leave the pool",
        )
        stats = pool.statistics()
        runs = pool.call_durations()
        waits = pool.queue_waits()
        server = await start_status_server(sv, 0)
        try:
            status, text = await get(server.port, "/metrics")
        finally:
            await server.aclose()
    assert stats == {
        "state": "open",
        "queued": 0,
        "running": 0,
        "completed": 4,
        "failed": 1,
        "cancelled": 1,
    }
    # The calls that reached the cluster and came back; the cancelled one is not timed.
    assert runs["count"] == waits["count"] == 5
    assert [b for b, _ in runs["buckets"]] == [*CALL_BUCKETS, float("inf")]
    assert held_for > 0.05
    assert dict(runs["buckets"])[0.05] <= 4  # the held call took over 50 ms
    assert runs["sum"] >= held_for
    assert waits["sum"] >= 0

    assert status == 200
    fams = _parse(text)
    labels = {"pool": "cluster", "kind": "dask"}
    calls = fams["offloop_pool_calls"]
    assert _value(calls, outcome="completed", **labels) == 4
    assert _value(calls, outcome="failed", **labels) == 1
    assert _value(calls, outcome="cancelled", **labels) == 1
    assert _value(fams["offloop_pool_queued"], **labels) == 0
    assert _value(fams["offloop_pool_running"], **labels) == 0
    # The cluster, not the pool, bounds its workers: no gauge for it.
    assert not [s for s in fams["offloop_pool_workers"] if s.labels["kind"] == "dask"]
    for family in ("offloop_pool_call_seconds", "offloop_pool_queue_wait_seconds"):
        samples = fams[family]
        assert _value(samples, f"{family}_count", **labels) == 5
        assert _value(samples, f"{family}_bucket", le="+Inf", **labels) == 5
    run_sum = _value(fams["offloop_pool_call_seconds"], "offloop_pool_call_seconds_sum", **labels)
    assert run_sum >= held_for


async def test_a_closed_dask_pool_leaves_metrics_and_a_bad_name_is_refused(cluster: Any) -> None:
    sv = offloop.Supervisor(name="dask-closed")
    async with offloop.DaskPool(cluster.scheduler_address, name="gone") as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2
    fams = _parse(metrics_text(sv))
    assert not [s for s in fams["offloop_pool_calls"] if s.labels["pool"] == "gone"]
    with pytest.raises(ValueError, match="name"):
        offloop.DaskPool(cluster.scheduler_address, name="")
    with pytest.raises(TypeError, match="name"):
        offloop.DaskPool(cluster.scheduler_address, name=3)  # type: ignore[arg-type]

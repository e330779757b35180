"""/metrics over real HTTP, read with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import offloop
from offloop import ProcessPool, Supervisor, ThreadPool
from offloop._core.latency import CALL_BUCKETS
from offloop._supervisor.health import LAG_BUCKETS, TICK
from offloop._supervisor.metrics import metrics_text
from offloop._supervisor.statusserver import start_status_server
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_probes import get


def _parse(text: str) -> dict[str, list[Sample]]:
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def _value(samples: list[Sample], name: str | None = None, **labels: str) -> float:
    found = [
        s
        for s in samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (labels, found)
    return float(found[0].value)


def _fails() -> None:
    raise ValueError("no such thing")


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_metrics_show_states_restarts_pools_loop_lag_and_blocks_by_site() -> None:
    sv = Supervisor(name="m", detect_blocking=0.05)
    crashes = 0

    @sv.service(backoff=0, max_backoff=0, retry_startup=True)
    async def flaky() -> None:
        nonlocal crashes
        if crashes < 2:
            crashes += 1
            raise ConnectionError("lost")
        await asyncio.Event().wait()

    @sv.service(oneshot=True)
    async def migrate() -> None:
        pass

    async with sv, ThreadPool(max_workers=2, name="metrics-pool") as pool:
        server = await start_status_server(sv, 0)
        try:
            await await_until(lambda: sv.status()["flaky"].restarts == 2, QUICK_WAIT, "restarts")
            await await_until(lambda: sv.status()["flaky"].state == "running", QUICK_WAIT)
            assert await pool.run(sum, [1, 2]) == 3
            assert await pool.run(sum, [3]) == 3
            with pytest.raises(ValueError, match="no such thing"):
                await pool.run(_fails)
            # A real block, longer than two ticks: some tick runs over 0.1 s late.
            time.sleep(2.5 * TICK)  # noqa: ASYNC251
            await await_until(lambda: sv.detector is not None and sv.detector.blocks >= 1)
            await asyncio.sleep(2 * TICK)  # a tick or two for the lag histogram
            status, text = await get(server.port, "/metrics")
        finally:
            await server.aclose()
    assert status == 200
    fams = _parse(text)

    states = fams["offloop_service_state"]
    assert _value(states, service="flaky", state="running") == 1
    assert _value(states, service="flaky", state="failed") == 0
    assert _value(states, service="migrate", state="done") == 1
    assert _value(fams["offloop_supervisor_state"], state="running") == 1
    assert _value(fams["offloop_service_restarts"], service="flaky") == 2

    pool_labels = {"pool": "metrics-pool", "kind": "thread"}
    calls = fams["offloop_pool_calls"]
    assert _value(calls, outcome="completed", **pool_labels) == 2
    assert _value(calls, outcome="failed", **pool_labels) == 1
    assert _value(calls, outcome="cancelled", **pool_labels) == 0
    assert _value(fams["offloop_pool_queued"], **pool_labels) == 0
    assert _value(fams["offloop_pool_running"], **pool_labels) == 0
    assert _value(fams["offloop_pool_workers"], **pool_labels) == 2
    durations = fams["offloop_pool_call_seconds"]
    assert _value(durations, "offloop_pool_call_seconds_count", **pool_labels) == 3
    assert _value(durations, "offloop_pool_call_seconds_bucket", le="+Inf", **pool_labels) == 3
    assert [
        s.labels["le"]
        for s in durations
        if s.name == "offloop_pool_call_seconds_bucket" and s.labels["pool"] == "metrics-pool"
    ] == [*(str(b) for b in CALL_BUCKETS), "+Inf"]
    assert _value(durations, "offloop_pool_call_seconds_sum", **pool_labels) > 0
    # Every open pool has one, the default ones included.
    assert {s.labels["kind"] for s in durations} <= {"thread", "process", "dask"}
    waits = fams["offloop_pool_queue_wait_seconds"]
    # The same calls as the run-time histogram.
    assert _value(waits, "offloop_pool_queue_wait_seconds_count", **pool_labels) == 3
    assert _value(waits, "offloop_pool_queue_wait_seconds_bucket", le="+Inf", **pool_labels) == 3
    assert [
        s.labels["le"]
        for s in waits
        if s.name == "offloop_pool_queue_wait_seconds_bucket" and s.labels["pool"] == "metrics-pool"
    ] == [*(str(b) for b in CALL_BUCKETS), "+Inf"]
    assert {s.labels["pool"] for s in waits} == {s.labels["pool"] for s in durations}

    lag = fams["offloop_loop_lag_seconds"]
    buckets = [s for s in lag if s.name == "offloop_loop_lag_seconds_bucket"]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in LAG_BUCKETS), "+Inf"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)  # cumulative
    count = _value(lag, "offloop_loop_lag_seconds_count")
    assert count == counts[-1] >= 2
    # The block above made one tick more than 0.1 s late.
    assert _value(lag, "offloop_loop_lag_seconds_bucket", le="0.1") < count

    site = {
        "file": __file__,
        "function": test_metrics_show_states_restarts_pools_loop_lag_and_blocks_by_site.__name__,
    }
    blocks = [
        s
        for s in fams["offloop_detector_blocks"]
        if s.labels["function"].endswith(site["function"])
    ]
    assert len(blocks) == 1
    assert blocks[0].value == 1
    assert blocks[0].labels["file"] == __file__
    seconds = fams["offloop_detector_blocked_seconds"]
    assert sum(s.value for s in seconds if s.labels["file"] == __file__) >= 0.05


def test_label_values_are_escaped_and_the_text_parses() -> None:
    sv = Supervisor(name='odd "name"\\ with\nnewline')

    @sv.service(name='svc "quoted"')
    async def svc() -> None:
        pass

    fams: dict[str, Any] = _parse(metrics_text(sv))
    sample = fams["offloop_service_restarts"][0]
    assert sample.labels == {"supervisor": 'odd "name"\\ with\nnewline', "service": 'svc "quoted"'}
    assert sample.value == 0
    assert _value(fams["offloop_supervisor_state"], state="new") == 1


@pytest.mark.loops("asyncio")
async def test_pools_lists_the_open_pools_of_every_kind_and_drops_closed_ones() -> None:
    thread_pool = ThreadPool(max_workers=1, name="listed-thread")
    process_pool = ProcessPool(1, name="listed-process")  # no call: no process started
    try:
        found = offloop.pools()
        assert thread_pool in found
        assert process_pool in found
        # Ordered by kind, then name, as /metrics lists them.
        assert found.index(process_pool) < found.index(thread_pool)
        assert await thread_pool.run(abs, -1) == 1
    finally:
        await thread_pool.aclose()
        await process_pool.aclose()
    found = offloop.pools()
    assert thread_pool not in found
    assert process_pool not in found
    text = metrics_text(Supervisor(name="after-close"))
    assert 'pool="listed-thread"' not in text
    assert 'pool="listed-process"' not in text


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_pools_sharing_a_name_get_distinct_series_that_keep_their_label() -> None:
    # Names are free (a program may open a pool per request under one name),
    # but two series with the same name and labels are one too many for
    # Prometheus, which keeps one and raises a duplicate-sample alert.
    sv = Supervisor(name="twins")
    first, second = ThreadPool(2, name="db"), ThreadPool(3, name="db")
    mine = ThreadPool(6, name="db#3")  # a name that looks like a suffix is a name
    third = ThreadPool(4, name="db")
    other_kind = ProcessPool(7, name="db")  # no call: no process started
    fourth: ThreadPool | None = None
    server = await start_status_server(sv, 0)
    try:
        _, text = await get(server.port, "/metrics")
        fams = _parse(text)
        for name, samples in fams.items():
            keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples]
            assert len(keys) == len(set(keys)), f"{name} repeats a series"
        workers = {
            (s.labels["pool"], s.labels["kind"]): s.value
            for s in fams["offloop_pool_workers"]
            if s.labels["pool"].startswith("db")
        }
        assert workers == {
            ("db", "thread"): 2,
            ("db#2", "thread"): 3,
            ("db#3", "thread"): 6,
            ("db#4", "thread"): 4,
            ("db", "process"): 7,
        }
        # The first closes: its label is free for the next pool of that name,
        # and the others keep theirs (a series must not change pools).
        await first.aclose()
        fourth = ThreadPool(5, name="db")
        _, text = await get(server.port, "/metrics")
        threads = {
            s.labels["pool"]: s.value
            for s in _parse(text)["offloop_pool_workers"]
            if s.labels["kind"] == "thread" and s.labels["pool"].startswith("db")
        }
        assert threads == {"db": 5, "db#2": 3, "db#3": 6, "db#4": 4}
        assert second.name == "db"  # the pool's own name is untouched
    finally:
        await server.aclose()
        for pool in (first, second, mine, third, other_kind, fourth):
            if pool is not None:
                await pool.aclose()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_scheduled_services_have_run_failure_and_last_success_series() -> None:
    # A job that must keep working is watched by its last success: the series
    # to alert on when it stops working, whatever the restarts do.
    sv = Supervisor(name="jobs-m")
    runs: list[float] = []

    # retry_startup: the crash comes within the start-up window.
    @sv.every(0.01, backoff=0, max_backoff=0, retry_startup=True)
    async def poll() -> None:
        runs.append(time.time())
        if len(runs) == 2:
            raise ConnectionError("the API is down")

    @sv.cron("0 0 1 1 *")  # once a year: no run during the test
    async def yearly() -> None:
        pass

    async with sv:
        await await_until(lambda: len(runs) >= 4, QUICK_WAIT, "runs after the restart")
        status = sv.status()
        fams = _parse(metrics_text(sv))
    poll_status, yearly_status = status["poll"].schedule, status["yearly"].schedule
    assert poll_status is not None
    assert yearly_status is not None
    assert poll_status.failures == 1
    # The status was read just before the metrics: a run may have ended between.
    assert _value(fams["offloop_schedule_runs"], service="poll") >= poll_status.runs >= 3
    assert _value(fams["offloop_schedule_failures"], service="poll") == 1
    assert _value(fams["offloop_schedule_failures"], service="yearly") == 0
    assert _value(fams["offloop_schedule_missed"], service="poll") == poll_status.missed
    assert _value(fams["offloop_schedule_overlapped"], service="poll") == poll_status.overlapped
    success = _value(fams["offloop_schedule_last_success_timestamp_seconds"], service="poll")
    assert runs[2] <= success <= time.time()
    assert success >= (poll_status.last_success or 0.0)
    # No run of the yearly job yet: no last success, no duration; its next run is known.
    assert [
        s.labels["service"] for s in fams["offloop_schedule_last_success_timestamp_seconds"]
    ] == ["poll"]
    assert [s.labels["service"] for s in fams["offloop_schedule_last_duration_seconds"]] == ["poll"]
    assert (
        _value(fams["offloop_schedule_next_run_timestamp_seconds"], service="yearly")
        == yearly_status.next_run
    )
    # Families are always listed; a supervisor without a schedule has no series in them.
    assert _parse(metrics_text(Supervisor(name="no-jobs")))["offloop_schedule_runs"] == []

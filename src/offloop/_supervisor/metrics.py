"""``/metrics``: the supervisor, the pools and the loop in the Prometheus text format (0.0.4).

Written here rather than with ``prometheus_client``: the core is stdlib-only,
the format is a few line shapes, and the figures already exist as snapshots
(:meth:`Supervisor.status`, each pool's ``statistics()``, the loop's lag
histogram, the detector's report), so there is no registry to keep. An
application that uses ``prometheus_client`` for its own metrics can serve
both: this text is a plain exposition a scraper reads as any other. The tests
parse it with ``prometheus_client``'s own parser.

Families:

- ``offloop_supervisor_state{supervisor,state}`` and
  ``offloop_service_state{supervisor,service,state}``: 1 for the current
  state, 0 for the others (every state is listed, so a query never misses a
  series); ``offloop_service_restarts_total{supervisor,service}`` and
  ``offloop_service_dependency_restarts_total{supervisor,service}`` (restarts
  with a dependency, see :mod:`.cascade`);
- per pool (``pool``, ``kind`` = ``thread``, ``process`` or ``dask``), every
  open pool of the process from the registry of ``_core/registry.py``; the
  ``pool`` label is the pool's name, suffixed ``#2``, ``#3``... for a pool
  opened while another of its kind held that name (``registry.label_of``):
  ``offloop_pool_workers`` (not for ``dask``: the cluster sizes itself),
  ``offloop_pool_queued``, ``offloop_pool_running`` (gauges) and
  ``offloop_pool_calls_total{outcome=completed|failed|cancelled}``;
- ``offloop_pool_call_seconds{pool,kind}``: per pool, a histogram of how long
  calls ran in their worker (``call_durations()`` of each pool);
- ``offloop_pool_queue_wait_seconds{pool,kind}``: per pool, a histogram of
  how long calls waited from ``run()`` until a worker took them
  (``queue_waits()``; named after OpenTelemetry's ``executor.queue.wait``).
  Both histograms count the same calls, so a call's submit-to-done time is
  the sum of the two: ``rate(..._call_seconds_sum) +
  rate(..._queue_wait_seconds_sum)`` over the calls' rate is its mean;
- ``offloop_schedule_*{supervisor,service}`` for ``@sv.every`` and ``@sv.cron``
  services (from ``ServiceStatus.schedule``): counters of runs, failures,
  missed and overlapped due times, and gauges of the last success, the next
  run and the last run's duration (no sample until there is a value);
- ``offloop_loop_lag_seconds``: a histogram of how late the supervisor's loop
  ran its timer (see :mod:`.health`);
- ``offloop_detector_blocks_total`` and ``offloop_detector_blocked_seconds_total``
  by site (``file``, ``line``, ``function``) when ``detect_blocking`` is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from .._core.registry import MeteredPool, label_of, live_pools
from .health import LAG_BUCKETS
from .status import ServiceState, SupervisorState

if TYPE_CHECKING:
    from .._services.schedule import ScheduleStatus
    from .status import ServiceStatus
    from .view import SupervisorView

__all__ = ["CONTENT_TYPE", "metrics_text"]

#: The media type of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_Labels = dict[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def _sample(name: str, labels: _Labels, value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {_number(value)}"
    return f"{name} {_number(value)}"


def _family(name: str, kind: str, help_: str, samples: Iterable[str]) -> Iterator[str]:
    yield f"# HELP {name} {help_}"
    yield f"# TYPE {name} {kind}"
    yield from samples


_Pool = tuple[str, str, dict[str, Any], MeteredPool]


def _pools() -> list[_Pool]:
    """Every open pool of this process: (label, kind, statistics, pool)."""
    return [(label_of(p), p._kind, dict(p.statistics()), p) for p in live_pools()]


def _histogram(
    name: str, pools: list[tuple[str, str, dict[str, Any], MeteredPool]]
) -> Iterator[str]:
    """The samples of the histogram family ``name``, one histogram per pool."""
    for pool_name, kind, _, p in pools:
        hist = p.call_durations() if name == "offloop_pool_call_seconds" else p.queue_waits()
        labels = {"pool": pool_name, "kind": kind}
        for bound, cumulative in hist["buckets"]:
            le = "+Inf" if math.isinf(bound) else repr(bound)
            yield _sample(f"{name}_bucket", {**labels, "le": le}, cumulative)
        yield _sample(f"{name}_sum", labels, hist["sum"])
        yield _sample(f"{name}_count", labels, hist["count"])


def _schedule_families(sup: str, statuses: dict[str, ServiceStatus]) -> Iterator[str]:
    """The scheduled services' families (``@sv.every``, ``@sv.cron``): one series each."""
    scheduled = [(n, s.schedule) for n, s in statuses.items() if s.schedule is not None]
    for name, kind, help_, read in _SCHEDULE_FAMILIES:
        yield from _family(
            name,
            kind,
            help_,
            (
                _sample(name, {"supervisor": sup, "service": n}, value)
                for n, sched in scheduled
                # A gauge with nothing to say yet (no run has worked, the service
                # is not running) has no sample, rather than a made-up 0.
                if (value := read(sched)) is not None
            ),
        )


_SCHEDULE_FAMILIES: Final[
    tuple[tuple[str, str, str, Callable[[ScheduleStatus], float | None]], ...]
] = (
    (
        "offloop_schedule_runs_total",
        "counter",
        "Runs of each scheduled service that ended (failed ones included).",
        lambda s: s.runs,
    ),
    (
        "offloop_schedule_failures_total",
        "counter",
        "Runs of each scheduled service that raised.",
        lambda s: s.failures,
    ),
    (
        "offloop_schedule_missed_total",
        "counter",
        "Due times of each scheduled service that passed without their run on time.",
        lambda s: s.missed,
    ),
    (
        "offloop_schedule_overlapped_total",
        "counter",
        "Due times of each scheduled service that found the previous run still going.",
        lambda s: s.overlapped,
    ),
    (
        "offloop_schedule_last_success_timestamp_seconds",
        "gauge",
        "When the last run of each scheduled service that returned ended (Unix time).",
        lambda s: s.last_success,
    ),
    (
        "offloop_schedule_next_run_timestamp_seconds",
        "gauge",
        "When the next run of each running scheduled service is due (Unix time).",
        lambda s: s.next_run,
    ),
    (
        "offloop_schedule_last_duration_seconds",
        "gauge",
        "How long the last run of each scheduled service took.",
        lambda s: s.last_duration,
    ),
)


def metrics_text(sv: SupervisorView) -> str:
    """The metrics of ``sv``, its loop and this process's pools, in the text format."""
    sup = sv.name
    statuses = sv.status()
    lines: list[str] = []
    lines += _family(
        "offloop_supervisor_state",
        "gauge",
        "1 for the supervisor's current state, 0 for the others.",
        (
            _sample(
                "offloop_supervisor_state", {"supervisor": sup, "state": st.value}, st is sv.state
            )
            for st in SupervisorState
        ),
    )
    lines += _family(
        "offloop_service_state",
        "gauge",
        "1 for each service's current state, 0 for the others.",
        (
            _sample(
                "offloop_service_state",
                {"supervisor": sup, "service": name, "state": state.value},
                state is status.state,
            )
            for name, status in statuses.items()
            for state in ServiceState
        ),
    )
    lines += _family(
        "offloop_service_restarts_total",
        "counter",
        "How many times the supervisor restarted each service.",
        (
            _sample("offloop_service_restarts_total", {"supervisor": sup, "service": n}, s.restarts)
            for n, s in statuses.items()
        ),
    )
    lines += _family(
        "offloop_service_dependency_restarts_total",
        "counter",
        "How many times each service was restarted because a service it depends on was.",
        (
            _sample(
                "offloop_service_dependency_restarts_total",
                {"supervisor": sup, "service": n},
                s.dependency_restarts,
            )
            for n, s in statuses.items()
        ),
    )
    lines += _schedule_families(sup, statuses)
    pools = _pools()
    for metric, key, help_ in (
        ("offloop_pool_workers", "max_workers", "The most calls each pool runs at once."),
        ("offloop_pool_queued", "queued", "Calls waiting in each pool for a worker."),
        ("offloop_pool_running", "running", "Calls running in each pool now."),
    ):
        lines += _family(
            metric,
            "gauge",
            help_,
            # A DaskPool has no worker bound of its own (the cluster has).
            (
                _sample(metric, {"pool": p, "kind": k}, stats[key])
                for p, k, stats, _ in pools
                if key in stats
            ),
        )
    lines += _family(
        "offloop_pool_calls_total",
        "counter",
        "Calls each pool has finished, by outcome.",
        (
            _sample("offloop_pool_calls_total", {"pool": p, "kind": k, "outcome": o}, stats[o])
            for p, k, stats, _ in pools
            for o in ("completed", "failed", "cancelled")
        ),
    )
    lines += _family(
        "offloop_pool_call_seconds",
        "histogram",
        "How long each pool's calls ran in their worker (queueing excluded).",
        _histogram("offloop_pool_call_seconds", pools),
    )
    lines += _family(
        "offloop_pool_queue_wait_seconds",
        "histogram",
        "How long each pool's calls waited from run() until a worker took them.",
        _histogram("offloop_pool_queue_wait_seconds", pools),
    )
    counts, total = sv._health.histogram()
    cumulative = 0
    buckets = []
    for bound, count in zip([*LAG_BUCKETS, math.inf], counts, strict=True):
        cumulative += count
        buckets.append(
            _sample(
                "offloop_loop_lag_seconds_bucket",
                # Floats as Prometheus' own clients write them: "1.0", "+Inf".
                {"supervisor": sup, "le": "+Inf" if math.isinf(bound) else repr(bound)},
                cumulative,
            )
        )
    buckets.append(_sample("offloop_loop_lag_seconds_sum", {"supervisor": sup}, total))
    buckets.append(_sample("offloop_loop_lag_seconds_count", {"supervisor": sup}, cumulative))
    lines += _family(
        "offloop_loop_lag_seconds",
        "histogram",
        "How late the supervisor's loop ran a timer due every 0.1 s.",
        buckets,
    )
    detector = sv.detector
    sites = detector.report() if detector is not None else []

    def site(s: Any) -> _Labels:
        return {"supervisor": sup, "file": s.file, "line": str(s.line), "function": s.function}

    lines += _family(
        "offloop_detector_blocks_total",
        "counter",
        "Blocks of the supervisor's loop the detector saw, by the line that blocked.",
        (_sample("offloop_detector_blocks_total", site(s), s.count) for s in sites),
    )
    lines += _family(
        "offloop_detector_blocked_seconds_total",
        "counter",
        "Seconds the supervisor's loop was blocked, by the line that blocked.",
        (
            _sample("offloop_detector_blocked_seconds_total", site(s), s.total_ms / 1e3)
            for s in sites
        ),
    )
    return "\n".join(lines) + "\n"

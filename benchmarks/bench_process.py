"""Process offload: offloop against ProcessPoolExecutor, anyio and loky; loop lag.

Cases, each measured in the same process and on one event loop (anyio keeps
its workers per loop), with interleaved rounds:
- sequential round trip of a trivial function;
- throughput of 200 concurrent small CPU tasks (``asyncio.gather``);
- event-loop lag: how late a 1 ms ``asyncio.sleep`` wakes while pure-Python
  CPU work runs back to back in a thread (``offloop.to_thread``) or in a
  worker process (``ProcessPool.run``), against an idle loop;
- event-loop lag while 20 calls with a 10 MB argument are sent, one after
  another and all at once. Every library pickles the argument;
  offloop does it in ``run()``, on the loop's thread, so that an unpicklable
  argument fails there, and writes the bytes from its writer thread;
- a burst of 200 calls of sha256 + zlib over the same 1 MB buffer, through
  ``DaskPool`` on a real ``distributed.LocalCluster`` (2 worker processes, its
  scheduler in this process), ``ProcessPool(2)``,
  ``run_in_executor(ProcessPoolExecutor(2))``, anyio, and Dask's own
  asynchronous client used on the caller's loop: the loop's lag and the wall
  time of the burst.

Every pool has 2 workers (the machines this project targets have 2 cores), started before timing.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.bench_process``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import os
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import anyio.to_process
import distributed
import loky

import offloop

# Absolute, not relative: anyio's workers run this file again as a script.
from benchmarks._common import check, interleaved, percentiles, ratio, round_ratios, table

WORKERS = 2
SEQ_CALLS = int(os.environ.get("OFFLOOP_BENCH_PROCESS_SEQ", "1000"))
TASKS = 200
TASK_LOOPS = 20_000  # pure Python, enough that a task costs more than its round trip
LAG_SECONDS = float(os.environ.get("OFFLOOP_BENCH_LAG_SECONDS", "1.0"))
BURN_SECONDS = 0.02
BIG_CALLS = 20
BIG_ARG = 10 << 20
BIG_ROUNDS = 2
BURST_CALLS = 200
BURST_ARG = 1 << 20
BURST_ROUNDS = int(os.environ.get("OFFLOOP_BENCH_BURST_ROUNDS", "3"))
#: 0 leaves out the DaskPool row whose scheduler runs in a process of its own
#: (distributed's SubprocessCluster), which costs a second cluster's start-up.
#: Which tables to run (comma-separated): round-trip, lag, big-arg, burst.
SECTIONS = os.environ.get("OFFLOOP_BENCH_PROCESS_SECTIONS", "round-trip,lag,big-arg,burst").split(
    ","
)
DASK_SUBPROCESS = os.environ.get("OFFLOOP_BENCH_DASK_SUBPROCESS", "1") != "0"


def trivial() -> int:
    return 1


def small_cpu_task(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def burn(seconds: float) -> int:
    # Pure Python: holds the GIL of whichever process runs it.
    end = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    return spins


def size(data: bytes) -> int:
    return len(data)


def digest(data: bytes) -> str:
    return hashlib.sha256(zlib.compress(data, 1)).hexdigest()


Submit = Callable[..., Awaitable[Any]]

SUBPROCESS_CASE = "DaskPool.run, scheduler out of process"


def make_submitters(
    loop: asyncio.AbstractEventLoop,
) -> tuple[dict[str, Submit], Callable[[], None]]:
    pool = offloop.ProcessPool(WORKERS, name="bench")
    stdlib = ProcessPoolExecutor(WORKERS)
    loky_pool = loky.get_reusable_executor(max_workers=WORKERS)
    limiter = anyio.CapacityLimiter(WORKERS)

    def in_executor(executor: Any) -> Submit:
        return functools.partial(loop.run_in_executor, executor)

    async def anyio_run(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_process.run_sync(fn, *args, limiter=limiter)

    submitters: dict[str, Submit] = {
        "offloop ProcessPool.run": pool.run,
        "offloop.to_process": offloop.to_process,
        "loop.run_in_executor(ProcessPoolExecutor)": in_executor(stdlib),
        "anyio.to_process.run_sync": anyio_run,
        "loky reusable executor": in_executor(loky_pool),
    }

    def close() -> None:
        loop.run_until_complete(pool.aclose())
        stdlib.shutdown()
        loky_pool.shutdown()

    return submitters, close


def sequential(loop: asyncio.AbstractEventLoop, submit: Submit) -> Callable[[], float]:
    async def body() -> float:
        t0 = time.perf_counter()
        for _ in range(SEQ_CALLS):
            await submit(trivial)
        return (time.perf_counter() - t0) / SEQ_CALLS

    return lambda: loop.run_until_complete(body())


def throughput(loop: asyncio.AbstractEventLoop, submit: Submit) -> Callable[[], float]:
    async def body() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(submit(small_cpu_task, TASK_LOOPS) for _ in range(TASKS)))
        return (time.perf_counter() - t0) / TASKS

    return lambda: loop.run_until_complete(body())


def lag(loop: asyncio.AbstractEventLoop, submit: Submit | None, samples: list[float]) -> None:
    async def cpu_work(stop: asyncio.Event) -> None:
        assert submit is not None
        while not stop.is_set():
            await submit(burn, BURN_SECONDS)

    async def body() -> None:
        stop = asyncio.Event()
        worker = asyncio.ensure_future(cpu_work(stop)) if submit else None
        await asyncio.sleep(0.05)  # let the work start
        end = time.perf_counter() + LAG_SECONDS
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            samples.append(time.perf_counter() - t0 - 0.001)
        stop.set()
        if worker is not None:
            await worker

    loop.run_until_complete(body())


def big_arg_lag(
    loop: asyncio.AbstractEventLoop,
    submit: Submit,
    data: bytes,
    samples: list[float],
    *,
    at_once: bool,
) -> None:
    async def ticker(done: asyncio.Event) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            samples.append(time.perf_counter() - t0 - 0.001)

    async def body() -> None:
        done = asyncio.Event()
        ticks = asyncio.ensure_future(ticker(done))
        await asyncio.sleep(0.005)
        if at_once:
            sizes = await asyncio.gather(*(submit(size, data) for _ in range(BIG_CALLS)))
        else:
            sizes = [await submit(size, data) for _ in range(BIG_CALLS)]
        assert sizes == [len(data)] * BIG_CALLS
        done.set()
        await ticks

    loop.run_until_complete(body())


def big_arg_lag_table(loop: asyncio.AbstractEventLoop, submitters: dict[str, Submit]) -> None:
    names = [
        "offloop ProcessPool.run",
        "loop.run_in_executor(ProcessPoolExecutor)",
        "anyio.to_process.run_sync",
    ]
    data = os.urandom(BIG_ARG)
    for at_once in (False, True):
        lateness: dict[str, list[float]] = {name: [] for name in names}
        for r in range(BIG_ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                big_arg_lag(loop, submitters[name], data, lateness[name], at_once=at_once)
        how = "all at once (gather)" if at_once else "one after another"
        print(
            f"\n## event-loop lag: lateness of asyncio.sleep(0.001) while sending "
            f"{BIG_CALLS} calls with a {BIG_ARG >> 20} MB argument, {how}, {BIG_ROUNDS} rounds"
        )
        print(f"{'case':<44} {'p50':>10} {'p99':>10} {'max':>10}")
        for name, values in lateness.items():
            p50, p99, worst = (v * 1e3 for v in percentiles(values, (50, 99, 100)))
            print(f"{name:<44} {p50:7.3f} ms {p99:7.3f} ms {worst:7.3f} ms")


class GCPauses:
    """The longest garbage collection seen while on, with its generation (any thread's)."""

    def __init__(self) -> None:
        self.on = False
        self.longest: dict[str, tuple[float, int]] = {}
        self.case = ""
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        if took > self.longest.get(self.case, (0.0, 0))[0]:
            self.longest[self.case] = (took, info["generation"])


def burst(
    loop: asyncio.AbstractEventLoop, submit: Submit, data: bytes, samples: list[float]
) -> float:
    """One burst of BURST_CALLS digests while a ticker measures the loop's lag; its wall time."""

    async def ticker(done: asyncio.Event) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            samples.append(time.perf_counter() - t0 - 0.001)

    async def body() -> float:
        done = asyncio.Event()
        ticks = asyncio.ensure_future(ticker(done))
        await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        digests = await asyncio.gather(*(submit(digest, data) for _ in range(BURST_CALLS)))
        wall = time.perf_counter() - t0
        assert set(digests) == {digest(data)}
        done.set()
        await ticks
        return wall

    return loop.run_until_complete(body())


def dask_burst_table(
    loop: asyncio.AbstractEventLoop, submitters: dict[str, Submit]
) -> dict[str, list[float]]:
    """Print the loop lag and wall time of the burst; return the lag samples.

    The cluster is started and closed here.
    """
    # The cluster's INFO lines would bury the tables.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    dask_pool = offloop.DaskPool(cluster.scheduler_address)
    # The same pool on a cluster whose scheduler is not in this process: what
    # is left is the client's own work, on the pool's thread.
    sub_cluster: Any = None
    if DASK_SUBPROCESS:
        from distributed.deploy.subprocess import SubprocessCluster

        # None turns the dashboard off (distributed's annotation says str only).
        no_dashboard: dict[str, Any] = {"dashboard_address": None}
        sub_cluster = SubprocessCluster(
            n_workers=WORKERS, threads_per_worker=1, host="127.0.0.1", **no_dashboard
        )
        sub_pool = offloop.DaskPool(sub_cluster.scheduler_address)

    async def connect() -> Any:
        return await distributed.Client(  # type: ignore[no-untyped-call]
            cluster.scheduler_address, asynchronous=True
        )

    raw_client = loop.run_until_complete(connect())

    async def raw_submit(fn: Callable[..., Any], *args: Any) -> Any:
        # What DaskPool did before its client had a thread of its own.
        return await raw_client.submit(fn, *args, pure=False)

    cases = {
        "offloop DaskPool.run": dask_pool.run,
        **({SUBPROCESS_CASE: sub_pool.run} if DASK_SUBPROCESS else {}),
        "offloop ProcessPool.run": submitters["offloop ProcessPool.run"],
        "loop.run_in_executor(ProcessPoolExecutor)": submitters[
            "loop.run_in_executor(ProcessPoolExecutor)"
        ],
        "anyio.to_process.run_sync": submitters["anyio.to_process.run_sync"],
        "dask Client(asynchronous=True) on the loop": raw_submit,
    }
    # Text-like data: zlib has something to compress, as in a real upload.
    data = b" ".join(str(i).encode() for i in range(BURST_ARG // 5))[:BURST_ARG]
    lateness: dict[str, list[float]] = {name: [] for name in cases}
    walls: dict[str, list[float]] = {name: [] for name in cases}
    pauses = GCPauses()
    gc.callbacks.append(pauses)
    try:
        for submit in cases.values():  # warm-up: connect, start workers, import
            burst(loop, submit, data, [])
        names = list(cases)
        for r in range(BURST_ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                pauses.case, pauses.on = name, True
                walls[name].append(burst(loop, cases[name], data, lateness[name]))
                pauses.on = False
    finally:
        gc.callbacks.remove(pauses)
        loop.run_until_complete(dask_pool.aclose())
        loop.run_until_complete(raw_client.close())
        cluster.close()
        if sub_cluster is not None:
            loop.run_until_complete(sub_pool.aclose())
            sub_cluster.close()
    print(
        f"\n## {BURST_CALLS} calls of sha256 + zlib over the same {BURST_ARG >> 20} MB buffer, "
        f"{WORKERS} worker processes each, {BURST_ROUNDS} interleaved rounds: event-loop lag "
        f"(lateness of asyncio.sleep(0.001)), wall time per burst (median), and the "
        f"longest garbage collection during the case's bursts (any thread; generation)"
    )
    reference = statistics.median(walls["offloop ProcessPool.run"])
    print(
        f"{'case':<48} {'p50':>10} {'p99':>10} {'max':>10} {'wall':>10} {'x ProcessPool':>14} "
        f"{'gc max':>13}"
    )
    for name, values in lateness.items():
        p50, p99, worst = (v * 1e3 for v in percentiles(values, (50, 99, 100)))
        wall = statistics.median(walls[name])
        took, generation = pauses.longest.get(name, (0.0, 0))
        print(
            f"{name:<48} {p50:7.3f} ms {p99:7.3f} ms {worst:7.3f} ms {wall * 1e3:7.0f} ms "
            f"{wall / reference:13.2f}x {took * 1e3:6.1f} ms (g{generation})"
        )
    return lateness


def main() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    submitters, close = make_submitters(loop)
    ok = True
    try:
        if "round-trip" in SECTIONS:
            seq = interleaved({n: sequential(loop, s) for n, s in submitters.items()})
            table("sequential round trip", seq, reference="offloop ProcessPool.run")
            gat = interleaved({n: throughput(loop, s) for n, s in submitters.items()})
            table(
                f"{TASKS} concurrent small CPU tasks, per task",
                gat,
                reference="offloop ProcessPool.run",
            )
            r = ratio(seq, "loop.run_in_executor(ProcessPoolExecutor)", "offloop ProcessPool.run")
            ok &= check(
                "round trip >= 1.5x run_in_executor(ProcessPoolExecutor)", r >= 1.5, f"{r:.2f}x"
            )
            for name in ("offloop ProcessPool.run", "offloop.to_process"):
                r = ratio(seq, "anyio.to_process.run_sync", name)
                ok &= check(
                    f"{name} round trip <= anyio.to_process.run_sync's",
                    r >= 1.0,
                    f"{r:.2f}x ({round_ratios(seq, 'anyio.to_process.run_sync', name)})",
                )

        if "lag" in SECTIONS:
            lag_pool = offloop.ProcessPool(1, name="lag")
            lag_cases: dict[str, Submit | None] = {
                "idle loop (no CPU work)": None,
                "CPU work via offloop.to_thread": offloop.to_thread,
                "CPU work via offloop ProcessPool.run": lag_pool.run,
            }
            lateness: dict[str, list[float]] = {name: [] for name in lag_cases}
            lag(loop, lag_pool.run, [])  # start the worker
            for r_ in range(3):
                names = list(lag_cases)
                for name in names[r_ % len(names) :] + names[: r_ % len(names)]:
                    lag(loop, lag_cases[name], lateness[name])
            loop.run_until_complete(lag_pool.aclose())
            print(
                f"\n## event-loop lag: lateness of asyncio.sleep(0.001), "
                f"{3 * LAG_SECONDS:.0f} s each"
            )
            print(f"{'case':<44} {'p50':>10} {'p99':>10} {'max':>10}")
            for name, values in lateness.items():
                p50, p99, worst = (v * 1e3 for v in percentiles(values, (50, 99, 100)))
                print(f"{name:<44} {p50:7.3f} ms {p99:7.3f} ms {worst:7.3f} ms")
            p99 = percentiles(lateness["CPU work via offloop ProcessPool.run"], (99,))[0]
            ok &= check("loop lag p99 with to_process < 1 ms", p99 < 1e-3, f"{p99 * 1e3:.3f} ms")

        if "big-arg" in SECTIONS:
            big_arg_lag_table(loop, submitters)

        if "burst" in SECTIONS:
            lateness = dask_burst_table(loop, submitters)
            dask_p99, dask_max = percentiles(lateness["offloop DaskPool.run"], (99, 100))
            pool_p99 = percentiles(lateness["offloop ProcessPool.run"], (99,))[0]
            ok &= check(
                "DaskPool burst: loop lag p99 within 2x ProcessPool's",
                dask_p99 <= 2 * pool_p99,
                f"{dask_p99 * 1e3:.3f} ms vs {pool_p99 * 1e3:.3f} ms",
            )
            ok &= check(
                "DaskPool burst: loop lag max < 50 ms", dask_max < 0.05, f"{dask_max * 1e3:.3f} ms"
            )
            if SUBPROCESS_CASE in lateness:
                # Not the targets (its cluster is a LocalCluster): the same
                # two, with the scheduler in a process of its own (SubprocessCluster).
                sub_p99, sub_max = percentiles(lateness[SUBPROCESS_CASE], (99, 100))
                ok &= check(
                    "DaskPool burst, scheduler out of process: p99 within 2x ProcessPool's",
                    sub_p99 <= 2 * pool_p99,
                    f"{sub_p99 * 1e3:.3f} ms vs {pool_p99 * 1e3:.3f} ms",
                )
                ok &= check(
                    "DaskPool burst, scheduler out of process: max < 50 ms",
                    sub_max < 0.05,
                    f"{sub_max * 1e3:.3f} ms",
                )
    finally:
        close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    print("\nall process-offload targets met" if ok else "\nsome process-offload targets missed")


if __name__ == "__main__":
    main()

"""``loop.run_in_executor`` through ``ThreadPool.executor()`` against asyncio's default executor.

The Executor view is what a loop can take as its default executor, so that
``asyncio.to_thread`` and ``run_in_executor(None, ...)`` in third-party code go
through an offloop pool. Sequential calls of a trivial function, and bursts of
100 one-millisecond sleeps gathered, with the loop's lag while a burst runs;
``pool.run`` itself beside them shows the view's own share of the cost.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.bench_executor_view``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine
from typing import Any

import offloop

from ._common import check, fmt_time, interleaved, percentiles, ratio, round_ratios, table
from .bench_from_thread import CALLS, ROUNDS, BackgroundLoop, noop

EXECUTOR_CALLS = max(CALLS // 4, 50)
BURST = 100


async def _lag_during(work: Coroutine[Any, Any, Any]) -> tuple[float, list[float]]:
    """Run ``work`` while sampling the loop's lag (how late a 1 ms sleep wakes up)."""
    lags: list[float] = []
    stop = False

    async def probe() -> None:
        while not stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    prober = asyncio.ensure_future(probe())
    start = time.perf_counter()
    await work
    elapsed = time.perf_counter() - start
    stop = True
    await prober
    return elapsed, lags


def executor_view() -> None:
    """The view against the default executor: sequential calls, bursts, the loop's lag."""
    # One loop for every case, as a program has: a fresh loop per round
    # would time each pool's start-up on it, not the calls.
    bg = BackgroundLoop()
    pool = offloop.ThreadPool(name="bench-executor")
    view = pool.executor()
    default = concurrent.futures.ThreadPoolExecutor()  # what asyncio makes by default
    # A reference, not a peer: as many threads as the view's pool may run.
    # The loop's lag during a burst follows the number of threads finishing
    # calls at once more than whose pool they belong to.
    wide = concurrent.futures.ThreadPoolExecutor(pool.max_workers)
    lags: dict[str, list[float]] = {}

    def sequential(executor: concurrent.futures.Executor) -> Callable[[], float]:
        async def body() -> float:
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            for _ in range(EXECUTOR_CALLS):
                await loop.run_in_executor(executor, noop)
            return (time.perf_counter() - start) / EXECUTOR_CALLS

        return lambda: float(bg.submit(body()))

    def burst(name: str, executor: concurrent.futures.Executor) -> Callable[[], float]:
        async def body() -> float:
            loop = asyncio.get_running_loop()

            async def all_of() -> None:
                await asyncio.gather(
                    *(loop.run_in_executor(executor, time.sleep, 0.001) for _ in range(BURST))
                )

            elapsed, lag = await _lag_during(all_of())
            lags.setdefault(name, []).extend(lag)
            return elapsed / BURST

        return lambda: float(bg.submit(body()))

    def pool_sequential() -> float:
        async def body() -> float:
            start = time.perf_counter()
            for _ in range(EXECUTOR_CALLS):
                await pool.run(noop)
            return (time.perf_counter() - start) / EXECUTOR_CALLS

        return float(bg.submit(body()))

    def pool_burst() -> float:
        # The same burst through pool.run itself: the view's own share of the cost.
        async def body() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(pool.run(time.sleep, 0.001) for _ in range(BURST)))
            return (time.perf_counter() - start) / BURST

        return float(bg.submit(body()))

    ours = "run_in_executor(pool.executor(), fn)"
    theirs = "run_in_executor(default ThreadPoolExecutor, fn)"
    ours_burst = f"pool.executor(): {BURST} x sleep(1 ms) gathered"
    theirs_burst = f"default ThreadPoolExecutor: {BURST} x sleep(1 ms) gathered"
    wide_burst = (
        f"ThreadPoolExecutor({pool.max_workers}) (reference): {BURST} x sleep(1 ms) gathered"
    )
    cases: dict[str, Callable[[], float]] = {
        ours: sequential(view),
        theirs: sequential(default),
        ours_burst: burst(ours_burst, view),
        theirs_burst: burst(theirs_burst, default),
        wide_burst: burst(wide_burst, wide),
        f"pool.run itself: {BURST} x sleep(1 ms) gathered": pool_burst,
        "pool.run itself, sequential": pool_sequential,
    }
    try:
        results = interleaved(cases, ROUNDS)
    finally:
        view.shutdown()
        pool.close()
        default.shutdown()
        wide.shutdown()
        bg.close()
    table(
        f"run_in_executor of a trivial function ({EXECUTOR_CALLS} sequential calls) and of "
        f"bursts of {BURST} 1 ms sleeps, per call",
        results,
        reference=ours,
    )
    for name in (ours_burst, theirs_burst, wide_burst):
        p50, p99 = percentiles(lags[name])
        print(
            f"loop lag during {name}: p50 {fmt_time(p50)}, p99 {fmt_time(p99)}, max "
            f"{fmt_time(max(lags[name]))}"
        )
    seq_ratio = ratio(results, ours, theirs)
    check(
        "sequential run_in_executor through the view within 1.3x of the default executor",
        seq_ratio <= 1.3,
        f"{seq_ratio:.2f}x ({round_ratios(results, ours, theirs)})",
    )
    burst_ratio = ratio(results, ours_burst, theirs_burst)
    check(
        "a burst through the view within 1.3x of the default executor",
        burst_ratio <= 1.3,
        f"{burst_ratio:.2f}x ({round_ratios(results, ours_burst, theirs_burst)})",
    )


if __name__ == "__main__":
    executor_view()

"""Thread offload: offloop against asyncio, anyio, aiomisc, asgiref and the CPython floor.

Cases, each measured in the same process with interleaved rounds:
- sequential round trip of a trivial function (await one call after another);
- the same round trip as a distribution over SEQ_RUNS runs, each its own
  interleaved measurement with its ratio to the floor (wake-ups dominate a
  round trip, and the floor itself moves a lot from one run to the next);
- the sequential round trip of a pool that measures whether its idle threads
  should poll for the next call, against pools pinned to either choice;
- throughput of a 500-wide ``asyncio.gather``, beside the cost of gathering
  bare futures with no thread at all (the bound no offload can beat);
- both again on uvloop;
- RSS growth over 1,000,000 sequential offloop calls.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.bench_threads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiomisc
import anyio.to_thread
import psutil
import uvloop
from asgiref.sync import sync_to_async

import offloop
from offloop._threads.pool import SPIN_WINDOW

from ._common import (
    ROUNDS,
    FixedPolling,
    check,
    check_polling_choice,
    fmt_time,
    interleaved,
    ratio,
    table,
)

SEQ_CALLS = int(os.environ.get("OFFLOOP_BENCH_SEQ", "3000"))
GATHER_WIDTH = 500
GATHER_REPEATS = int(os.environ.get("OFFLOOP_BENCH_GATHER", "6"))
MEMORY_CALLS = int(os.environ.get("OFFLOOP_BENCH_MEMORY_CALLS", "1000000"))
SEQ_RUNS = int(os.environ.get("OFFLOOP_BENCH_SEQ_RUNS", "10"))
SEQ_RUN_ROUNDS = int(os.environ.get("OFFLOOP_BENCH_SEQ_RUN_ROUNDS", "3"))
FLOOR = "floor (SimpleQueue + call_soon_threadsafe)"
GATHER_BOUND = "bound: gather of bare futures (no thread)"


def trivial() -> int:
    return 1


class Floor:
    """The CPython floor: one worker on a SimpleQueue completing an asyncio future."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            loop, fut, fn = item
            loop.call_soon_threadsafe(_set_result, fut, fn())

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()

    def run(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.q.put((loop, fut, fn))
        return fut


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


Offload = Callable[[], Awaitable[Any]]


def make_offloads() -> tuple[dict[str, Callable[[], Offload]], Callable[[], None]]:
    """Each entry builds, on the running loop, a zero-arg coroutine maker."""
    floor = Floor()
    pool = offloop.ThreadPool(name="bench")
    stdlib_pool = ThreadPoolExecutor()
    aiomisc_pool = aiomisc.ThreadPoolExecutor()
    asgiref_fn = sync_to_async(trivial, thread_sensitive=False)

    def run_in_executor() -> Offload:
        loop = asyncio.get_running_loop()
        return functools.partial(loop.run_in_executor, stdlib_pool, trivial)

    def aiomisc_case() -> Offload:
        loop = asyncio.get_running_loop()
        return functools.partial(loop.run_in_executor, aiomisc_pool, trivial)

    offloads: dict[str, Callable[[], Offload]] = {
        "offloop.to_thread": lambda: functools.partial(offloop.to_thread, trivial),
        "offloop ThreadPool.run": lambda: functools.partial(pool.run, trivial),
        FLOOR: lambda: functools.partial(floor.run, trivial),
        "asyncio.to_thread": lambda: functools.partial(asyncio.to_thread, trivial),
        "loop.run_in_executor": run_in_executor,
        "anyio.to_thread.run_sync": lambda: functools.partial(anyio.to_thread.run_sync, trivial),
        "aiomisc ThreadPoolExecutor": aiomisc_case,
        "asgiref sync_to_async": lambda: asgiref_fn,
    }

    def close() -> None:
        floor.close()
        pool.close()
        stdlib_pool.shutdown()
        aiomisc_pool.shutdown()

    return offloads, close


T = TypeVar("T")


def run_on(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, T]
) -> T:
    """Run one round on a fresh loop, and close it (an unclosed loop left to the
    garbage collector can be finalized after its own self-pipe, which logs an error).

    What ``asyncio.Runner(loop_factory=...)`` does, which Python 3.10 lacks.
    """
    loop = loop_factory()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def sequential(make: Callable[[], Offload], loop_factory: Callable[[], Any]) -> Callable[[], float]:
    async def body() -> float:
        call = make()
        for _ in range(50):
            await call()
        t0 = time.perf_counter()
        for _ in range(SEQ_CALLS):
            await call()
        return (time.perf_counter() - t0) / SEQ_CALLS

    return lambda: run_on(loop_factory, body())


def gathered(make: Callable[[], Offload], loop_factory: Callable[[], Any]) -> Callable[[], float]:
    async def body() -> float:
        call = make()
        await asyncio.gather(*[call() for _ in range(GATHER_WIDTH)])
        t0 = time.perf_counter()
        for _ in range(GATHER_REPEATS):
            await asyncio.gather(*[call() for _ in range(GATHER_WIDTH)])
        return (time.perf_counter() - t0) / (GATHER_REPEATS * GATHER_WIDTH)

    return lambda: run_on(loop_factory, body())


def gather_bound(loop_factory: Callable[[], Any]) -> Callable[[], float]:
    """What ``asyncio.gather`` costs the loop per call with no thread at all.

    Futures are made, gathered and resolved in one callback: the loop-side
    cost every offload's gather pays on top of its own. The gather target is
    judged against it: a ratio above ``asyncio.to_thread / bound`` is out of
    reach for any offload on that loop.
    """

    async def body() -> float:
        loop = asyncio.get_running_loop()

        async def once() -> None:
            futures = [loop.create_future() for _ in range(GATHER_WIDTH)]

            def resolve() -> None:
                for future in futures:
                    future.set_result(1)

            loop.call_soon(resolve)
            await asyncio.gather(*futures)

        await once()
        t0 = time.perf_counter()
        for _ in range(GATHER_REPEATS):
            await once()
        return (time.perf_counter() - t0) / (GATHER_REPEATS * GATHER_WIDTH)

    return lambda: run_on(loop_factory, body())


def _workers_cpu() -> float:
    # CPU seconds used so far by offloop's worker threads (Linux: per-thread clocks).
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith("offloop-") and thread.ident is not None:
            with contextlib.suppress(OSError):
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


def gather_cpu(loop_name: str, loop_factory: Callable[[], Any]) -> None:
    """Where a gathered offloop.to_thread call spends its time: the loop's thread or a worker's.

    The gather holds the GIL nearly all the time, so wall time per call is
    about the sum of the two; CPU time moves far less than wall time on a
    loaded machine, which makes this the figure to compare two versions by.
    """

    async def body() -> tuple[float, float, float]:
        def call() -> Awaitable[Any]:
            return offloop.to_thread(trivial)

        await asyncio.gather(*[call() for _ in range(GATHER_WIDTH)])
        t0, c0, w0 = time.perf_counter(), time.thread_time(), _workers_cpu()
        for _ in range(GATHER_REPEATS):
            await asyncio.gather(*[call() for _ in range(GATHER_WIDTH)])
        n = GATHER_REPEATS * GATHER_WIDTH
        return (
            (time.perf_counter() - t0) / n,
            (time.thread_time() - c0) / n,
            (_workers_cpu() - w0) / n,
        )

    if not hasattr(time, "pthread_getcpuclockid"):
        return
    rounds = [run_on(loop_factory, body()) for _ in range(ROUNDS)]
    wall, loop_cpu, workers = (statistics.median(r[i] for r in rounds) for i in range(3))
    print(
        f"\n## {GATHER_WIDTH}-wide gather of offloop.to_thread, {loop_name}: per call "
        f"(median of {ROUNDS} rounds) wall {fmt_time(wall)}, CPU of the loop's thread "
        f"{fmt_time(loop_cpu)}, CPU of the worker threads {fmt_time(workers)}"
    )


def sequential_runs(
    offloads: dict[str, Callable[[], Offload]], loop_name: str, factory: Callable[[], Any]
) -> tuple[list[float], list[float]]:
    """SEQ_RUNS runs of the sequential case; per run, to_thread / floor and to_thread / run().

    Each run is a whole interleaved measurement (SEQ_RUN_ROUNDS rounds) of
    offloop.to_thread, ThreadPool.run and the floor, so every ratio compares
    figures taken moments apart; the spread over the runs is what one run's
    figure can be off by.
    """
    names = ("offloop.to_thread", "offloop ThreadPool.run", FLOOR)
    cases = {n: sequential(offloads[n], factory) for n in names}
    print(f"\n## sequential round trip over {SEQ_RUNS} runs, {loop_name}")
    print(
        f"{'run':>4} {'to_thread':>12} {'ThreadPool.run':>15} {'floor':>12}"
        f" {'to_thread/floor':>16} {'to_thread/run':>14}"
    )
    to_floor: list[float] = []
    to_run: list[float] = []
    for i in range(SEQ_RUNS):
        res = interleaved(cases, SEQ_RUN_ROUNDS, warmup=i == 0)
        t, r, f = (res[n].median for n in names)
        to_floor.append(t / f)
        to_run.append(t / r)
        print(
            f"{i + 1:>4} {fmt_time(t):>12} {fmt_time(r):>15} {fmt_time(f):>12}"
            f" {t / f:15.2f}x {t / r:13.2f}x"
        )
        sys.stdout.flush()
    for label, values in (("to_thread/floor", to_floor), ("to_thread/run", to_run)):
        v = sorted(values)
        print(f"{label:<16} min {v[0]:.2f}x  median {statistics.median(v):.2f}x  max {v[-1]:.2f}x")
    return to_floor, to_run


POLL_MEASURED = "ThreadPool.run, measured (default)"
POLL_ALWAYS = "ThreadPool.run, idle threads always poll"
POLL_NEVER = "ThreadPool.run, idle threads never poll"


def idle_polling(loop_name: str, factory: Callable[[], Any], floor: Offload) -> bool:
    """Sequential round trips with the pool's measured polling choice against both fixed modes.

    Whether an idle thread should poll for its next call depends on the
    machine (_core/spin.py); the measured choice should be as fast as the
    better of the two fixed ones, whichever that is here.
    """
    pools = {
        POLL_MEASURED: offloop.ThreadPool(name="bench-poll-measured"),
        POLL_ALWAYS: offloop.ThreadPool(name="bench-poll-always"),
        POLL_NEVER: offloop.ThreadPool(name="bench-poll-never"),
    }
    # Private on purpose: the benchmark pins the choice a pool would make itself.
    pools[POLL_ALWAYS]._spin = FixedPolling(SPIN_WINDOW)
    pools[POLL_NEVER]._spin = FixedPolling(0.0)
    cases = {
        name: sequential(functools.partial(functools.partial, pool.run, trivial), factory)
        for name, pool in pools.items()
    }
    cases[FLOOR] = sequential(lambda: floor, factory)
    try:
        res = interleaved(cases)
    finally:
        for pool in pools.values():
            pool.close()
    table(
        f"sequential round trip, idle threads polling or not, {loop_name}",
        res,
        reference=POLL_MEASURED,
    )
    chosen = "the pool polls" if pools[POLL_MEASURED]._spin.window else "the pool does not poll"
    return check_polling_choice(
        f"[{loop_name}] the measured polling choice is",
        res,
        measured=POLL_MEASURED,
        always=POLL_ALWAYS,
        never=POLL_NEVER,
        chosen=chosen,
    )


BATCH_ITEMS = int(os.environ.get("OFFLOOP_BENCH_BATCH", "20000"))


def square(x: int) -> int:
    return x * x


def batched(kind: str, loop_factory: Callable[[], Any]) -> Callable[[], float]:
    """Seconds per item for BATCH_ITEMS small calls, sent one way or another."""

    async def body() -> float:
        pool = offloop.ThreadPool(name="bench-batch")
        items = range(BATCH_ITEMS if kind.startswith("offloop") else GATHER_WIDTH)
        t0 = time.perf_counter()
        if kind == "offloop ThreadPool.map (adaptive chunks)":
            [r async for r in pool.map(square, items)]
        elif kind == "offloop ThreadPool.map(chunksize=256)":
            [r async for r in pool.map(square, items, chunksize=256)]
        else:  # one asyncio.to_thread per item: the baseline
            await asyncio.gather(*(asyncio.to_thread(square, x) for x in items))
        took = (time.perf_counter() - t0) / len(items)
        await pool.aclose()
        return took

    return lambda: run_on(loop_factory, body())


def memory() -> float:
    async def body() -> float:
        run = offloop.to_thread
        for _ in range(10_000):
            await run(trivial)
        gc.collect()
        before = psutil.Process().memory_info().rss
        for _ in range(MEMORY_CALLS):
            await run(trivial)
        gc.collect()
        return (psutil.Process().memory_info().rss - before) / 2**20

    return asyncio.run(body())


def main() -> None:
    offloads, close = make_offloads()
    loops: dict[str, Callable[[], Any]] = {
        "asyncio": asyncio.new_event_loop,
        "uvloop": uvloop.new_event_loop,
    }
    ok = True
    try:
        for loop_name, factory in loops.items():
            seq = interleaved({n: sequential(m, factory) for n, m in offloads.items()})
            table(f"sequential round trip, {loop_name}", seq, reference="offloop.to_thread")
            gather_cases = {n: gathered(m, factory) for n, m in offloads.items()}
            gather_cases[GATHER_BOUND] = gather_bound(factory)
            gat = interleaved(gather_cases)
            table(
                f"{GATHER_WIDTH}-wide gather, per call, {loop_name}",
                gat,
                reference="offloop.to_thread",
            )
            gather_cpu(loop_name, factory)
            s = ratio(seq, "asyncio.to_thread", "offloop.to_thread")
            ok &= check(
                f"[{loop_name}] sequential >= 1.8x asyncio.to_thread", s >= 1.8, f"{s:.2f}x"
            )
            f = ratio(seq, "offloop.to_thread", FLOOR)
            ok &= check(f"[{loop_name}] sequential within 1.3x of the floor", f <= 1.3, f"{f:.2f}x")
            g = ratio(gat, "asyncio.to_thread", "offloop.to_thread")
            # The bound says whether 12x is reachable on this loop at all: the
            # gather of bare futures is a cost no offload can avoid.
            budget = gat["asyncio.to_thread"].median / 12
            ceiling = ratio(gat, "asyncio.to_thread", GATHER_BOUND)
            ok &= check(
                f"[{loop_name}] gather >= 12x asyncio.to_thread",
                g >= 12,
                f"{g:.2f}x (12x allows {fmt_time(budget).strip()} per call; the gather of bare "
                f"futures alone takes {fmt_time(gat[GATHER_BOUND].median).strip()}, so no "
                f"offload can pass {ceiling:.1f}x here)",
            )
            a = ratio(gat, "aiomisc ThreadPoolExecutor", "offloop.to_thread")
            ok &= check(f"[{loop_name}] gather >= 2x aiomisc", a >= 2, f"{a:.2f}x")
            to_floor, to_run = sequential_runs(offloads, loop_name, factory)
            m = statistics.median(to_floor)
            ok &= check(
                f"[{loop_name}] sequential over {SEQ_RUNS} runs: median within 1.1x of the floor",
                m <= 1.1,
                f"median {m:.2f}x (runs {min(to_floor):.2f}x-{max(to_floor):.2f}x)",
            )
            if loop_name == "uvloop":
                ok &= check(
                    f"[{loop_name}] sequential over {SEQ_RUNS} runs: median within 1.5x "
                    f"of the floor",
                    m <= 1.5,
                    f"median {m:.2f}x",
                )
                # "As fast as": the ratio to run() is no worse than the noise of
                # two identical cases (5 %).
                mr = statistics.median(to_run)
                ok &= check(
                    f"[{loop_name}] to_thread as fast as ThreadPool.run (median over "
                    f"{SEQ_RUNS} runs <= 1.05x)",
                    mr <= 1.05,
                    f"median {mr:.2f}x (runs {min(to_run):.2f}x-{max(to_run):.2f}x)",
                )
            ok &= idle_polling(loop_name, factory, offloads[FLOOR]())
            kinds = (
                "offloop ThreadPool.map (adaptive chunks)",
                "offloop ThreadPool.map(chunksize=256)",
                "asyncio.to_thread per item (gather)",
            )
            bat = interleaved({k: batched(k, factory) for k in kinds})
            table(f"small calls, per item, {loop_name}", bat, reference=kinds[0])
            for kind in kinds[:2]:
                b = ratio(bat, kinds[2], kind)
                ok &= check(
                    f"[{loop_name}] {kind} <= 1/30 of asyncio.to_thread per item",
                    b >= 30,
                    f"{b:.1f}x cheaper",
                )
        growth = memory()
        ok &= check(
            f"RSS growth after {MEMORY_CALLS:,} sequential calls < 5 MB",
            growth < 5,
            f"{growth:.2f} MB",
        )
    finally:
        close()
    print("\nall thread-offload targets met" if ok else "\nsome thread-offload targets missed")


if __name__ == "__main__":
    main()

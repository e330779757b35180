"""Supervisor overhead against the hand-rolled floor it replaces.

Cases, each measured in the same process with interleaved rounds:
- a full lifecycle: start 20 thread services (each waiting on its stop
  token), then stop them all, against 20 bare threads waiting on one
  ``threading.Event`` that are set and joined;
- one crash-and-restart cycle (``backoff=0``) of an ``async def`` service,
  against a bare ``while True: try: await fn() except: pass`` loop;
- the time from ``sv.stop()`` to ``serve()`` returning when one service is a
  thread that ignores its token (``grace=0.2``): the bound the user relies on.

Logging is silenced: crash logging with tracebacks would dominate the
restart case, and it is the same cost for any supervisor that logs.

Run: ``.venv/bin/python -m benchmarks.bench_supervisor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

import offloop

from ._common import check, interleaved, ratio, table

THREADS = 20
CYCLES = int(os.environ.get("OFFLOOP_BENCH_RESTARTS", "2000"))
GRACE = 0.2


def offloop_lifecycle() -> float:
    sv = offloop.Supervisor()
    for i in range(THREADS):
        sv.service(name=f"t{i}")(_wait_for_token)

    async def main() -> float:
        t0 = time.perf_counter()
        async with sv:
            pass
        return time.perf_counter() - t0

    return asyncio.run(main())


def _wait_for_token(token: offloop.StopToken) -> None:
    token.wait()


def floor_lifecycle() -> float:
    async def main() -> float:
        t0 = time.perf_counter()
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(THREADS)]
        for t in threads:
            t.start()
        await asyncio.sleep(0)
        stop.set()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    return asyncio.run(main())


def offloop_restarts() -> float:
    sv = offloop.Supervisor()
    runs = 0

    @sv.service(backoff=0, max_backoff=0, max_restarts=CYCLES, restart_window=3600)
    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("crash")

    async def main() -> float:
        t0 = time.perf_counter()
        with contextlib.suppress(offloop.ServiceFailed):
            await sv.serve()
        return (time.perf_counter() - t0) / runs

    return asyncio.run(main())


def floor_restarts() -> float:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("crash")

    async def main() -> float:
        t0 = time.perf_counter()
        while runs <= CYCLES:
            try:
                await flaky()
            except ValueError:
                await asyncio.sleep(0)
        return (time.perf_counter() - t0) / runs

    return asyncio.run(main())


def bounded_shutdown() -> float:
    sv = offloop.Supervisor(grace=GRACE)
    release = threading.Event()
    sv.service(name="deaf")(lambda: release.wait())
    sv.service(name="polite")(_wait_for_token)

    async def main() -> float:
        async with sv:
            t0 = time.perf_counter()
            sv.stop()
            await sv.serve()
            elapsed = time.perf_counter() - t0
        release.set()
        return elapsed

    return asyncio.run(main())


def main() -> None:
    logging.getLogger("offloop").setLevel(logging.CRITICAL)
    life = interleaved(
        {
            f"offloop Supervisor, {THREADS} thread services": offloop_lifecycle,
            f"floor: {THREADS} threads + Event + join": floor_lifecycle,
        }
    )
    table(
        "start + stop of 20 thread services",
        life,
        reference=f"floor: {THREADS} threads + Event + join",
    )
    restarts = interleaved(
        {
            "offloop crash -> restart (backoff=0)": offloop_restarts,
            "floor: while True / try / except": floor_restarts,
        }
    )
    table(
        "one crash-and-restart cycle of an async service",
        restarts,
        reference="floor: while True / try / except",
    )
    shutdown = interleaved({f"stop with a deaf thread, grace={GRACE}s": bounded_shutdown})
    table("bounded shutdown", shutdown, reference=f"stop with a deaf thread, grace={GRACE}s")

    life_ratio = ratio(
        life,
        f"offloop Supervisor, {THREADS} thread services",
        f"floor: {THREADS} threads + Event + join",
    )
    restart_cost = restarts["offloop crash -> restart (backoff=0)"].median
    stop_time = shutdown[f"stop with a deaf thread, grace={GRACE}s"].median
    check(
        "lifecycle within 3x of bare threads",
        life_ratio <= 3.0,
        f"{life_ratio:.2f}x the floor",
    )
    check("crash-restart cycle under 1 ms", restart_cost < 1e-3, f"{restart_cost * 1e6:.0f} us")
    check(
        f"shutdown bounded by grace ({GRACE}s) + 0.1s",
        stop_time < GRACE + 0.1,
        f"{stop_time * 1e3:.0f} ms",
    )


if __name__ == "__main__":
    main()

"""Sync -> async round trip: offloop.from_thread against asyncio, anyio, asgiref, aiomisc.

Every case runs a trivial coroutine on an event loop in another thread and
blocks the calling thread for its result, one call after another:

- from a plain thread (no loop): ``offloop.from_thread`` (shared loop thread),
  ``asyncio.run_coroutine_threadsafe(...).result()``, anyio's
  ``BlockingPortal.call``, asgiref ``async_to_sync``, aiomisc
  ``wait_coroutine``, ``LoopThread.call``, and the CPython floor: one
  ``call_soon_threadsafe`` that creates the task, a ``SimpleQueue`` reply;
- from a worker thread back into the loop that sent the work:
  ``offloop.from_thread`` in ``offloop.to_thread`` and ``anyio.from_thread.run``
  in ``anyio.to_thread.run_sync``.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.bench_from_thread``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiomisc
import anyio.from_thread
import anyio.to_thread
from asgiref.sync import async_to_sync

import offloop

from ._common import check, interleaved, ratio, table

CALLS = int(os.environ.get("OFFLOOP_BENCH_FROM_THREAD_CALLS", "2000"))
# asgiref starts a new event loop per call from a plain thread: far slower.
ASGIREF_CALLS = max(CALLS // 10, 20)


async def trivial() -> int:
    return 1


class BackgroundLoop:
    """A plain asyncio loop running forever in a daemon thread (the peers' target)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _floor_runner(reply: queue.SimpleQueue[Any], coro: Coroutine[Any, Any, Any]) -> None:
    reply.put(await coro)


def floor_call(loop: asyncio.AbstractEventLoop, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """The CPython floor: one call_soon_threadsafe creating the task, a SimpleQueue reply."""
    reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
    loop.call_soon_threadsafe(lambda: loop.create_task(_floor_runner(reply, fn())))
    return reply.get()


def timed(body: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    body()
    return (time.perf_counter() - start) / calls


def main() -> None:
    bg = BackgroundLoop()
    loop = bg.loop
    lt = offloop.LoopThread(name="bench").start()
    portal_cm = anyio.from_thread.start_blocking_portal()
    portal = portal_cm.__enter__()
    sync_trivial = async_to_sync(trivial)

    def loop_of(call: Callable[[], Any], n: int = CALLS) -> Callable[[], None]:
        def body() -> None:
            for _ in range(n):
                call()

        return body

    def in_offloop_worker() -> float:
        async def drive() -> float:
            return await offloop.to_thread(
                timed, loop_of(lambda: offloop.from_thread(trivial)), CALLS
            )

        return float(bg.submit(drive()))

    def in_anyio_worker() -> float:
        async def drive() -> float:
            body = loop_of(lambda: anyio.from_thread.run(trivial))
            return await anyio.to_thread.run_sync(timed, body, CALLS)

        return float(bg.submit(drive()))

    cases: dict[str, Callable[[], float]] = {
        "offloop.from_thread (plain thread)": lambda: timed(
            loop_of(lambda: offloop.from_thread(trivial)), CALLS
        ),
        "floor (call_soon_threadsafe + SimpleQueue)": lambda: timed(
            loop_of(lambda: floor_call(loop, trivial)), CALLS
        ),
        "asyncio.run_coroutine_threadsafe().result()": lambda: timed(
            loop_of(lambda: asyncio.run_coroutine_threadsafe(trivial(), loop).result()), CALLS
        ),
        "offloop LoopThread.call": lambda: timed(loop_of(lambda: lt.call(trivial)), CALLS),
        "anyio BlockingPortal.call": lambda: timed(loop_of(lambda: portal.call(trivial)), CALLS),
        "aiomisc wait_coroutine": lambda: timed(
            loop_of(lambda: aiomisc.thread_pool.wait_coroutine(trivial(), loop=loop)), CALLS
        ),
        "asgiref async_to_sync (plain thread)": lambda: timed(
            loop_of(sync_trivial, ASGIREF_CALLS), ASGIREF_CALLS
        ),
        "offloop.from_thread (in offloop worker)": in_offloop_worker,
        "anyio.from_thread.run (in anyio worker)": in_anyio_worker,
    }
    try:
        results = interleaved(cases)
    finally:
        portal_cm.__exit__(None, None, None)
        lt.close()
        bg.close()
    table(
        f"sync -> async round trip of a trivial coroutine ({CALLS} sequential calls)",
        results,
        reference="offloop.from_thread (plain thread)",
    )
    ours = "offloop.from_thread (plain thread)"
    rcts = ratio(results, "asyncio.run_coroutine_threadsafe().result()", ours)
    anyio_ratio = ratio(results, "anyio BlockingPortal.call", ours)
    floor = results[ours].median / results["floor (call_soon_threadsafe + SimpleQueue)"].median
    check(
        "plain thread >= 1.3x faster than run_coroutine_threadsafe().result()",
        rcts >= 1.3,
        f"{rcts:.2f}x",
    )
    check("plain thread >= 2.5x faster than anyio BlockingPortal.call", anyio_ratio >= 2.5,
          f"{anyio_ratio:.2f}x")  # fmt: skip
    check("plain thread within 1.3x of the floor", floor <= 1.3, f"{floor:.2f}x the floor")


if __name__ == "__main__":
    main()

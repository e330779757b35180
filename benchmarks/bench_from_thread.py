"""Sync -> async round trip: offloop.from_thread against asyncio, anyio, asgiref, aiomisc.

Every case runs a trivial coroutine on an event loop in another thread and
blocks the calling thread for its result, one call after another:

- from a plain thread (no loop): ``offloop.from_thread`` (shared loop thread),
  ``asyncio.run_coroutine_threadsafe(...).result()``, anyio's
  ``BlockingPortal.call``, asgiref ``async_to_sync``, aiomisc
  ``wait_coroutine``, ``LoopThread.call``, and the CPython floor: one
  ``call_soon_threadsafe`` that creates the task, a ``SimpleQueue`` reply;
  and, as a yardstick, two plain threads handing a lock back and forth (the
  machine's own cost of waking a thread and being woken back);
- from a worker thread back into the loop that sent the work:
  ``offloop.from_thread`` in ``offloop.to_thread`` and ``anyio.from_thread.run``
  in ``anyio.to_thread.run_sync``.

Then the sync-function crossing (``offloop.from_thread_sync``: a sync function
run on the loop's thread) against anyio's ``from_thread.run_sync`` (in a
worker) and ``BlockingPortal.call`` of a sync function (from a plain thread),
and its floor: one ``call_soon_threadsafe`` and a ``threading.Event``.

Then an async iterator consumed from sync code, per item: ``Portal.iterate``
(the generator stepped in one task, as under ``async for``) against
``asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()`` and
``offloop.from_thread(anext_of, agen)`` (a coroutine awaiting ``agen.__anext__()``),
which both step each item in a new
task (so a context variable or ``asyncio.timeout`` the generator holds across
a ``yield`` is lost).

Last, ``LoopThread.call`` with the measured choices of whether the caller and
the loop thread poll before they sleep, against both sides pinned to polling
and to not polling.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.bench_from_thread``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any

import aiomisc
import anyio.from_thread
import anyio.to_thread
from asgiref.sync import async_to_sync

import offloop
from offloop._core.spin import SpinTuner
from offloop._loops import crossing, hotloop

from ._common import (
    FixedPolling,
    check,
    check_polling_choice,
    interleaved,
    ratio,
    round_ratios,
    table,
)

CALLS = int(os.environ.get("OFFLOOP_BENCH_FROM_THREAD_CALLS", "2000"))
# More rounds than the other benchmarks: a round trip is a few thread wake-ups,
# whose cost on a shared machine drifts from round to round by more than the
# differences measured, and the median of 9 rounds drifts less than of 5.
ROUNDS = int(os.environ.get("OFFLOOP_BENCH_FROM_THREAD_ROUNDS", "9"))
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


class PingPong:
    """Two plain threads handing a lock back and forth: no event loop at all.

    Every sync -> async round trip wakes the other thread and is woken back,
    so this is the least one can cost on the machine that runs it; it tells how much of
    a case's time is the machine's wake-ups and how much is the code.
    """

    def __init__(self) -> None:
        self._ping = threading.Lock()
        self._pong = threading.Lock()
        self._ping.acquire()
        self._pong.acquire()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="bench-pong", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._ping.acquire()
            if self._stopping:
                return
            self._pong.release()

    def call(self) -> None:
        self._ping.release()
        self._pong.acquire()

    def close(self) -> None:
        self._stopping = True
        self._ping.release()
        self._thread.join(10)


def timed(body: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    body()
    return (time.perf_counter() - start) / calls


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class HostedPortal:
    """An anyio ``BlockingPortal`` served by offloop's shared loop thread.

    The scheduler places each thread on a CPU of its own choosing, and a round
    trip can cost about half as much when the loop thread happens to share
    the caller's CPU (no cross-CPU wake-up). Serving every plain-thread case from one and the
    same loop thread gives them all the same placement, so their ratios
    measure the code, not the luck of the draw. A plain thread holds the
    portal open through ``offloop.from_thread``, so the shared loop counts it
    as busy and does not retire under it.
    """

    def __init__(self) -> None:
        handoff: queue.SimpleQueue[tuple[anyio.from_thread.BlockingPortal, asyncio.Event]] = (
            queue.SimpleQueue()
        )

        async def host() -> None:
            stop = asyncio.Event()
            async with anyio.from_thread.BlockingPortal() as portal:
                handoff.put((portal, stop))
                await stop.wait()

        self._holder = threading.Thread(target=offloop.from_thread, args=(host,), daemon=True)
        self._holder.start()
        self.portal, self._stop = handoff.get(timeout=10)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._stop.set)
        self._holder.join(10)


def main() -> None:
    bg = BackgroundLoop()
    shared = offloop.from_thread(_running_loop)  # the loop thread from_thread uses
    hosted = HostedPortal()
    lt = offloop.LoopThread(name="bench").start()
    # The same, on asyncio's plain loop: what the polling loop (_loops/hotloop.py) saves.
    plain_lt = offloop.LoopThread(name="bench-plain", loop_factory=asyncio.new_event_loop).start()
    portal_cm = anyio.from_thread.start_blocking_portal()
    own_portal = portal_cm.__enter__()
    sync_trivial = async_to_sync(trivial)
    pingpong = PingPong()

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

    ours = "offloop.from_thread (plain thread)"
    floor = "floor (call_soon_threadsafe + SimpleQueue)"
    rcts = "asyncio.run_coroutine_threadsafe().result()"
    portal = "anyio BlockingPortal.call"
    pingpong_case = "bare lock ping-pong between two threads"
    plain_case = "offloop LoopThread.call (own thread, plain asyncio loop)"
    cases: dict[str, Callable[[], float]] = {
        ours: lambda: timed(loop_of(lambda: offloop.from_thread(trivial)), CALLS),
        floor: lambda: timed(loop_of(lambda: floor_call(shared, trivial)), CALLS),
        rcts: lambda: timed(
            loop_of(lambda: asyncio.run_coroutine_threadsafe(trivial(), shared).result()), CALLS
        ),
        portal: lambda: timed(loop_of(lambda: hosted.portal.call(trivial)), CALLS),
        "aiomisc wait_coroutine": lambda: timed(
            loop_of(lambda: aiomisc.thread_pool.wait_coroutine(trivial(), loop=shared)), CALLS
        ),
        "offloop LoopThread.call (own thread)": lambda: timed(
            loop_of(lambda: lt.call(trivial)), CALLS
        ),
        plain_case: lambda: timed(loop_of(lambda: plain_lt.call(trivial)), CALLS),
        "anyio BlockingPortal.call (own thread)": lambda: timed(
            loop_of(lambda: own_portal.call(trivial)), CALLS
        ),
        "asgiref async_to_sync (plain thread)": lambda: timed(
            loop_of(sync_trivial, ASGIREF_CALLS), ASGIREF_CALLS
        ),
        pingpong_case: lambda: timed(loop_of(pingpong.call), CALLS),
        "offloop.from_thread (in offloop worker)": in_offloop_worker,
        "anyio.from_thread.run (in anyio worker)": in_anyio_worker,
    }
    try:
        results = interleaved(cases, ROUNDS)
    finally:
        portal_cm.__exit__(None, None, None)
        pingpong.close()
        hosted.close(shared)
        lt.close()
        plain_lt.close()
        bg.close()
    table(
        f"sync -> async round trip of a trivial coroutine ({CALLS} sequential calls, "
        f"{ROUNDS} rounds; "
        f"from_thread, floor, run_coroutine_threadsafe, the portal and aiomisc share one loop)",
        results,
        reference=ours,
    )
    rcts_ratio = ratio(results, rcts, ours)
    portal_ratio = ratio(results, portal, ours)
    floor_ratio = ratio(results, ours, floor)
    check(
        "plain thread >= 1.3x faster than run_coroutine_threadsafe().result()",
        rcts_ratio >= 1.3,
        f"{rcts_ratio:.2f}x ({round_ratios(results, rcts, ours)})",
    )
    check(
        "plain thread >= 2.5x faster than anyio BlockingPortal.call",
        portal_ratio >= 2.5,
        f"{portal_ratio:.2f}x ({round_ratios(results, portal, ours)})",
    )
    # Not a target: how many bare wake-up round trips each costs, to tell the
    # machine's share of a figure from the code's.
    print(
        f"in bare ping-pongs: offloop.from_thread {ratio(results, ours, pingpong_case):.2f}, "
        f"run_coroutine_threadsafe {ratio(results, rcts, pingpong_case):.2f}, "
        f"anyio BlockingPortal.call {ratio(results, portal, pingpong_case):.2f}"
    )
    # Not a target either: two loop threads of their own, so thread placement
    # moves it more than the shared-loop ratios above.
    print(
        "polling loop thread vs asyncio's plain loop (LoopThread.call): "
        f"{ratio(results, plain_case, 'offloop LoopThread.call (own thread)'):.2f}x faster "
        f"({round_ratios(results, plain_case, 'offloop LoopThread.call (own thread)')})"
    )
    check(
        "plain thread within 1.3x of the floor",
        floor_ratio <= 1.3,
        f"{floor_ratio:.2f}x the floor ({round_ratios(results, ours, floor)})",
    )


def noop() -> int:
    return 1


def floor_sync(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """The floor of a sync-function crossing: call_soon_threadsafe, a threading.Event."""
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        box.append(fn())
        done.set()

    loop.call_soon_threadsafe(run)
    done.wait()
    return box[0]


def sync_crossing() -> None:
    bg = BackgroundLoop()
    shared = offloop.from_thread(_running_loop)
    hosted = HostedPortal()

    def loop_of(call: Callable[[], Any]) -> Callable[[], None]:
        def body() -> None:
            for _ in range(CALLS):
                call()

        return body

    def in_offloop_worker() -> float:
        async def drive() -> float:
            body = loop_of(lambda: offloop.from_thread_sync(noop))
            return await offloop.to_thread(timed, body, CALLS)

        return float(bg.submit(drive()))

    def in_anyio_worker() -> float:
        async def drive() -> float:
            body = loop_of(lambda: anyio.from_thread.run_sync(noop))
            return await anyio.to_thread.run_sync(timed, body, CALLS)

        return float(bg.submit(drive()))

    ours = "offloop.from_thread_sync (plain thread)"
    ours_worker = "offloop.from_thread_sync (in offloop worker)"
    anyio_worker = "anyio.from_thread.run_sync (in anyio worker)"
    portal = "anyio BlockingPortal.call(sync fn)"
    floor = "floor (call_soon_threadsafe + threading.Event)"
    cases: dict[str, Callable[[], float]] = {
        ours: lambda: timed(loop_of(lambda: offloop.from_thread_sync(noop)), CALLS),
        floor: lambda: timed(loop_of(lambda: floor_sync(shared, noop)), CALLS),
        portal: lambda: timed(loop_of(lambda: hosted.portal.call(noop)), CALLS),
        ours_worker: in_offloop_worker,
        anyio_worker: in_anyio_worker,
    }
    try:
        results = interleaved(cases, ROUNDS)
    finally:
        hosted.close(shared)
        bg.close()
    table(
        f"sync function run on a loop's thread from another thread ({CALLS} sequential "
        f"calls, {ROUNDS} rounds; plain-thread cases share one loop)",
        results,
        reference=ours,
    )
    measured = ratio(results, portal, ours)
    check(
        "plain thread >= 2x faster than anyio BlockingPortal.call",
        measured >= 2.0,
        f"{measured:.2f}x ({round_ratios(results, portal, ours)})",
    )
    # In a worker anyio's run_sync is itself one call_soon_threadsafe and a
    # concurrent.futures.Future: the floor. Not slower than it is the target.
    measured = ratio(results, anyio_worker, ours_worker)
    check(
        "in a worker at least as fast as anyio from_thread.run_sync",
        measured >= 1.0,
        f"{measured:.2f}x ({round_ratios(results, anyio_worker, ours_worker)})",
    )
    floor_ratio = ratio(results, ours, floor)
    check(
        "plain thread within 1.3x of the floor",
        floor_ratio <= 1.3,
        f"{floor_ratio:.2f}x the floor ({round_ratios(results, ours, floor)})",
    )


async def count(n: int) -> AsyncGenerator[int, None]:
    for i in range(n):
        yield i


async def anext_of(agen: AsyncIterator[int]) -> int:
    return await agen.__anext__()


def async_iterator() -> None:
    shared = offloop.from_thread(_running_loop)

    def per_item(step: Callable[[AsyncGenerator[int, None]], Any]) -> Callable[[], float]:
        def run() -> float:
            agen = count(CALLS)
            start = time.perf_counter()
            for _ in range(CALLS):
                step(agen)
            elapsed = time.perf_counter() - start
            asyncio.run_coroutine_threadsafe(agen.aclose(), shared).result()
            return elapsed / CALLS

        return run

    def iterate() -> float:
        start = time.perf_counter()
        for _ in offloop.Portal().iterate(count, CALLS):
            pass
        return (time.perf_counter() - start) / CALLS

    ours = "offloop Portal().iterate (plain thread)"
    rcts = "run_coroutine_threadsafe(agen.__anext__())"
    task_per_item = "offloop.from_thread(anext_of, agen)"
    cases: dict[str, Callable[[], float]] = {
        ours: iterate,
        rcts: per_item(
            lambda agen: asyncio.run_coroutine_threadsafe(agen.__anext__(), shared).result()
        ),
        task_per_item: per_item(lambda agen: offloop.from_thread(anext_of, agen)),
    }
    results = interleaved(cases, ROUNDS)
    table(
        f"async generator consumed from sync code, per item ({CALLS} items, {ROUNDS} rounds; "
        f"all on the loop from_thread uses)",
        results,
        reference=ours,
    )
    rcts_ratio = ratio(results, rcts, ours)
    check(
        "Portal.iterate >= 1.2x faster per item than run_coroutine_threadsafe(agen.__anext__())",
        rcts_ratio >= 1.2,
        f"{rcts_ratio:.2f}x ({round_ratios(results, rcts, ours)})",
    )
    # Stepping every item in one task must cost no more than a new task per item.
    own_ratio = ratio(results, task_per_item, ours)
    check(
        "Portal.iterate at least as fast per item as a crossing per item (from_thread)",
        own_ratio >= 1.0,
        f"{own_ratio:.2f}x ({round_ratios(results, task_per_item, ours)})",
    )


def polling_choice() -> bool:
    """``LoopThread.call`` from a plain thread with the measured polling choices, against both
    pinned.

    The caller may poll for its reply, and the loop thread for its next call
    (_core/spin.py); whether that pays depends on the machine. Each case has a
    loop thread of its own and sets the callers' tuner (``crossing.REPLY_POLLING``,
    one for the process) to its own before it runs.
    """
    measured, never, always = (
        "LoopThread.call, polling measured (default)",
        "LoopThread.call, neither side polls",
        "LoopThread.call, both sides poll",
    )
    tuners = {
        measured: (SpinTuner(crossing.SPIN_WINDOW), None),
        never: (FixedPolling(0.0), FixedPolling(0.0)),
        always: (FixedPolling(crossing.SPIN_WINDOW), FixedPolling(hotloop.HOT_WINDOW)),
    }
    threads = {name: offloop.LoopThread(name="bench-polling").start() for name in tuners}
    saved = crossing.REPLY_POLLING

    def case(name: str) -> Callable[[], float]:
        lt = threads[name]
        replies, loop_side = tuners[name]
        if loop_side is not None:
            # Private on purpose: the benchmark pins the choice the loop makes itself.
            lt.loop._selector.polling = loop_side  # type: ignore[union-attr]

        def calls() -> None:
            for _ in range(CALLS):
                lt.call(trivial)

        def run() -> float:
            crossing.REPLY_POLLING = replies  # type: ignore[misc]
            return timed(calls, CALLS)

        return run

    # The measured loop's own tuner, read after the loop (and its selector) closed.
    loop_side = threads[measured].loop._selector.polling  # type: ignore[union-attr]
    try:
        results = interleaved({name: case(name) for name in tuners}, ROUNDS)
    finally:
        crossing.REPLY_POLLING = saved  # type: ignore[misc]
        for lt in threads.values():
            lt.close()
    table(
        f"LoopThread.call from a plain thread, polling or not ({CALLS} calls)",
        results,
        reference=measured,
    )
    replies = tuners[measured][0]
    return check_polling_choice(
        "the measured polling choices are",
        results,
        measured=measured,
        always=always,
        never=never,
        chosen=f"callers {'poll' if replies.window else 'do not poll'}, the loop "
        f"{'polls' if loop_side.window else 'does not poll'}",
    )


if __name__ == "__main__":
    main()
    sync_crossing()
    async_iterator()
    polling_choice()

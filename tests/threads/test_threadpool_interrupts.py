"""A KeyboardInterrupt (or any signal handler's exception) in the middle of a thread pool's run().

A signal handler runs in the main thread between two bytecodes, and only at
some of them (tests/threads/interrupt_points.py says which, and raises
there). These tests interrupt ``run()`` at each of them in turn, and check
that the pool is whole afterwards: no thread lost, no count left over, its
next call runs, and it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

import pytest

import offloop
from offloop._threads import dispatch, lifecycle
from tests.helpers import WAIT, await_until
from tests.threads.interrupt_points import (
    closed_with_no_thread_left,
    count_points,
    interrupted_at,
)

SUBMIT: CodeType = dispatch.ThreadPoolDispatch._submit.__code__
START_THREAD: CodeType = lifecycle.ThreadPoolLifecycle._start_thread.__code__


async def _interrupt(situation: str, n: int) -> bool:
    """Interrupt a call's run() at the ``n``-th point; False once it had fewer points."""
    pool = offloop.ThreadPool(2, name=f"interrupt-{situation}")
    gate = threading.Event()
    busy: list[offloop.OffloadFuture[Any]] = []
    fn: Any = list.append
    if situation == "idle thread":
        await asyncio.wait_for(pool.run(abs, -1), WAIT)
    elif situation in ("busy pool", "waits beside a busy thread"):
        if situation == "busy pool":
            pool.max_workers = 1
        busy.append(pool.run(gate.wait, WAIT))
        await await_until(lambda: pool.statistics()["running"] == 1, WAIT, "the busy call")
    if situation == "waits beside a busy thread":

        def waits(ran: list[str], what: str) -> None:
            ran.append(what)

        # As if the pool had learnt that it waits: it takes a thread of its own at once.
        pool._waits[waits.__code__] = 2
        fn = waits
    ran: list[str] = []
    try:
        with interrupted_at(n, SUBMIT, stop_at=START_THREAD) as where:
            pool.run(fn, ran, "interrupted")
    except KeyboardInterrupt:
        pass
    reached = bool(where and where[0])
    try:
        await asyncio.sleep(0)  # a batch the call opened is flushed
        gate.set()
        for call in busy:
            assert await asyncio.wait_for(call, WAIT) is True
        assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2, where
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, "the calls to end")
        if reached and not where[0].startswith("c_return lock.__exit__"):
            assert ran == [], f"the interrupted call ran ({where[0]})"
        stats = pool.statistics()
        assert (stats["queued"], pool._ready, pool._backlog) == (0, 0, 0), where
        assert pool._gil_calls == set(), where
    finally:
        gate.set()
        await asyncio.wait_for(pool.aclose(), WAIT)
    assert pool.statistics()["threads"] == 0
    return reached


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize(
    "situation", ["idle thread", "no thread yet", "busy pool", "waits beside a busy thread"]
)
async def test_a_run_interrupted_anywhere_leaves_the_pool_whole(situation: str) -> None:
    points = await count_points(lambda n: _interrupt(situation, n), limit=200, what="run()")
    assert points > 0


THREAD_START: CodeType = threading.Thread.start.__code__


@contextlib.contextmanager
def interrupted_in_thread_start(n: int) -> Iterator[list[str]]:
    """Raise KeyboardInterrupt at the ``n``-th point of ``Thread.start()`` where a handler may run.

    Its own start, each call it makes (at the callee's start and return),
    and each C call's return: before and after the new thread is launched,
    and while start() waits for it to run. Yields a list that names the
    point once it is reached.
    """
    seen = 0
    where: list[str] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal seen
        if where:
            return
        if event in ("call", "return"):
            own_start = event == "call" and frame.f_code is THREAD_START
            if not own_start and (frame.f_back is None or frame.f_back.f_code is not THREAD_START):
                return
        elif event != "c_return" or frame.f_code is not THREAD_START:
            return
        name = getattr(arg, "__qualname__", frame.f_code.co_name)
        if seen == n:
            launched = event == "c_return" and "start" in name and "thread" in name
            where.append(f"{event} {name}{' (launched)' if launched or launched_at else ''}")
            raise KeyboardInterrupt(f"injected at {where[0]}")
        seen += 1
        if event == "c_return" and "start" in name and "thread" in name:
            launched_at.append(seen)

    launched_at: list[int] = []
    sys.setprofile(hook)
    try:
        yield where
    finally:
        sys.setprofile(None)


async def _interrupt_start(n: int) -> bool:
    """Interrupt the start of a pool's first thread at the ``n``-th point; False past the last."""
    pool = offloop.ThreadPool(2, name=f"interrupt-start-{n}")
    ran: list[str] = []
    try:
        try:
            with interrupted_in_thread_start(n) as where:
                pool.run(ran.append, "interrupted")
        except KeyboardInterrupt:
            pass
        assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2, where
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, "the calls to end")
        if not where:
            assert ran == ["interrupted"], "the call was not interrupted, and did not run"
        elif not where[0].endswith("(launched)"):
            # Once launched, the thread may take the call before the interrupt.
            assert ran == [], f"the interrupted call ran ({where})"
        assert (pool.statistics()["queued"], pool._ready, pool._backlog) == (0, 0, 0), where
        assert not pool._starting, where
        assert not pool._unstarted, where
    finally:
        # A thread launched as start() was interrupted serves the pool, and
        # leaves with it; one launched after its start was given up leaves at once.
        await closed_with_no_thread_left(pool, where)
    return bool(where)


@pytest.mark.loops("asyncio")
async def test_a_thread_start_interrupted_anywhere_leaves_the_pool_whole() -> None:
    points = await count_points(_interrupt_start, limit=50, what="Thread.start()")
    assert points >= 3  # before the launch, at it, and in the wait

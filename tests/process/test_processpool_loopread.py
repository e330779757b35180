"""ProcessPool replies read by the caller's event loop, and their races with the manager thread.

The loop of a call handed to an idle worker reads the reply itself; the
manager thread keeps deaths, cancels and closing. Each race test holds one
side (the manager thread behind a gate, or the loop's thread blocked) so that
both orders happen every time, with real worker processes and real signals.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._process.pickling import encode_result
from offloop._process.pool import ProcessPool
from offloop._process.records import MANAGER, ProcessWorker
from tests.helpers import WAIT, await_until, wait_for_file

pytestmark = [pytest.mark.loops("asyncio", "uvloop"), pytest.mark.usefixtures("resource_tracker")]


def square(x: int) -> int:
    return x * x


def _worker_conn() -> Any:
    # The worker's end of its pipe, from worker_main's frame: the function
    # writes its own reply, as the worker would, then dies.
    frame = sys._getframe()
    while frame.f_code.co_name != "worker_main":
        assert frame.f_back is not None
        frame = frame.f_back
    return frame.f_locals["conn"]


def reply_then_die(value: int, whole: bool) -> int:
    """Write the reply ``value`` (whole, or its first half) to the pool, then SIGKILL itself."""
    conn = _worker_conn()
    data = encode_result(value, reply_then_die)
    if whole:
        conn.send_bytes(data)
    else:
        os.write(conn.fileno(), struct.pack("!i", len(data)) + data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
    return value  # never reached: the pool gets the reply written above


def the_worker(pool: ProcessPool) -> ProcessWorker:
    (worker,) = pool._workers
    return worker


def readable(worker: ProcessWorker) -> bool:
    assert worker.lsock is not None
    with selectors.DefaultSelector() as selector:
        selector.register(worker.lsock, selectors.EVENT_READ)
        return bool(selector.select(WAIT))


def hold_exits(
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Hold the manager's handling of a worker's death until ``gate`` is set; ``done`` after."""
    gate, done = threading.Event(), threading.Event()
    handle_exit = pool._on_exit

    def held(worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        gate.wait(WAIT)
        handle_exit(worker, selector)
        done.set()

    monkeypatch.setattr(pool, "_on_exit", held)
    return gate, done


def count_manager_batches(pool: ProcessPool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    batches = [0]
    on_events = pool._on_events

    def counted(*args: Any) -> bool:
        batches[0] += 1
        return on_events(*args)

    monkeypatch.setattr(pool, "_on_events", counted)
    return batches


async def test_sequential_calls_do_not_wake_the_manager_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with ProcessPool(1, name="loop-reads") as pool:
        assert await asyncio.wait_for(pool.run(square, 2), WAIT) == 4  # started by the manager
        batches = count_manager_batches(pool, monkeypatch)
        for x in range(20):
            assert await asyncio.wait_for(pool.run(square, x), WAIT) == x * x
        assert batches[0] == 0
        assert the_worker(pool).watcher is asyncio.get_running_loop()
        stats = pool.statistics()
        assert (stats["completed"], stats["running"], stats["idle"]) == (21, 0, 1)


async def test_a_large_reply_is_read_by_the_manager_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with ProcessPool(1, name="large-reply") as pool:
        await asyncio.wait_for(pool.run(square, 2), WAIT)
        batches = count_manager_batches(pool, monkeypatch)
        assert await asyncio.wait_for(pool.run(bytes, 1 << 20), WAIT) == bytes(1 << 20)
        assert batches[0] >= 1  # handed over: the loop reads only what fits its peek
        assert await asyncio.wait_for(pool.run(square, 3), WAIT) == 9


@pytest.mark.parametrize("whole", [True, False], ids=["whole-reply", "half-reply"])
@pytest.mark.parametrize("first", ["loop", "manager"])
async def test_a_worker_killed_as_its_reply_is_read_resolves_its_call_once(
    whole: bool, first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker writes its reply (or half of it) and is SIGKILLed at once:
    # the loop's reader and the manager's exit handling race for it. A whole
    # reply is the call's result, half a reply a crash; never both, never none.
    async with ProcessPool(1, name="reply-kill") as pool:
        await asyncio.wait_for(pool.run(square, 2), WAIT)
        gate, done = hold_exits(pool, monkeypatch)
        call = pool.run(reply_then_die, 7, whole)
        worker = the_worker(pool)
        if first == "manager":
            # Block this loop until the manager has handled the death: its
            # reader callback then finds the manager took over.
            assert readable(worker)
            gate.set()
            assert done.wait(WAIT)
        else:
            gate.set()
        if whole:
            assert await asyncio.wait_for(call, WAIT) == 7
        else:
            with pytest.raises(offloop.WorkerCrashed, match="died from SIGKILL"):
                await asyncio.wait_for(call, WAIT)
        assert done.wait(WAIT)
        await await_until(lambda: worker.lsock is None, WAIT, "the loop to let go of the pipe")
        monkeypatch.undo()
        assert await asyncio.wait_for(pool.run(square, 5), WAIT) == 25
        stats = pool.statistics()
        assert stats["running"] == 0
        assert stats["crashed"] == (0 if whole else 1)
        assert (stats["completed"], stats["failed"]) == ((3, 0) if whole else (2, 1))


@pytest.mark.parametrize("kill_on_cancel", [False, True], ids=["abandon", "kill"])
async def test_a_cancel_racing_the_reply_resolves_the_call_once(kill_on_cancel: bool) -> None:
    # The reply is in the pipe, but the loop cancels the call before its
    # reader runs: the manager takes the reply over (or sees the kill), the
    # loop lets go, and the pool goes on.
    async with ProcessPool(1, name="cancel-reply", kill_on_cancel=kill_on_cancel) as pool:
        await asyncio.wait_for(pool.run(square, 2), WAIT)
        worker = the_worker(pool)
        call = pool.run(square, 3)
        assert readable(worker)  # the loop has not run since: its reader has not either
        assert call.cancel()
        assert worker.reader is MANAGER
        await await_until(lambda: pool.statistics()["running"] == 0, WAIT, "the reply to be taken")
        assert await asyncio.wait_for(pool.run(square, 4), WAIT) == 16
        stats = pool.statistics()
        assert stats["cancelled"] == 1
        assert stats["abandoned"] == 0
        # A reply that came before the kill is read (completed); else the call is only cancelled.
        assert stats["completed"] + stats["failed"] in (2, 3)
        assert stats["failed"] == 0


async def test_close_reads_a_reply_whose_loop_closed_unawaited(tmp_path: Path) -> None:
    # A call made on a loop that closed without awaiting or cancelling it:
    # that loop can never read the reply. Closing the pool must not wait for it forever.
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = ProcessPool(1, name="closed-loop")
    try:
        assert await asyncio.wait_for(pool.run(square, 2), WAIT) == 4

        def other_loop() -> None:
            loop = asyncio.new_event_loop()
            try:

                async def make_call() -> None:
                    pool.run(wait_for_file, str(gate), str(started))

                loop.run_until_complete(make_call())
            finally:
                loop.close()

        thread = threading.Thread(target=other_loop)
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive()
        await await_until(started.exists, WAIT, "the call to start")
        gate.touch()
    finally:
        await asyncio.wait_for(pool.aclose(), WAIT)
    stats = pool.statistics()
    assert (stats["state"], stats["running"], stats["completed"]) == ("closed", 0, 2)


class NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop that cannot watch descriptors, as Windows' proactor loop."""

    def add_reader(self, *args: Any) -> None:  # type: ignore[override]
        raise NotImplementedError


def test_a_loop_without_add_reader_gets_its_replies_through_the_manager() -> None:
    loop = NoReaderLoop()
    pool = ProcessPool(1, name="no-reader")
    try:

        async def calls() -> list[int]:
            return [await asyncio.wait_for(pool.run(square, x), WAIT) for x in range(5)]

        assert loop.run_until_complete(calls()) == [0, 1, 4, 9, 16]
        assert the_worker(pool).watcher is None
        loop.run_until_complete(asyncio.wait_for(pool.aclose(), WAIT))
    finally:
        loop.close()


async def test_two_loops_share_a_worker() -> None:
    # A worker watched by one loop, taken by a call of another: that call's
    # reply goes through the manager, and the first loop lets go of the pipe.
    async with ProcessPool(1, name="two-loops") as pool:
        for x in (2, 3):  # the first is read by the manager, which started the worker
            assert await asyncio.wait_for(pool.run(square, x), WAIT) == x * x
        here = asyncio.get_running_loop()
        assert the_worker(pool).watcher is here

        def other_loop() -> list[int]:
            async def calls() -> list[int]:
                return [await asyncio.wait_for(pool.run(square, x), WAIT) for x in range(3)]

            return asyncio.run(calls())

        results = await asyncio.wait_for(asyncio.to_thread(other_loop), WAIT)
        assert results == [0, 1, 4]
        for x in range(3):
            assert await asyncio.wait_for(pool.run(square, x), WAIT) == x * x
        assert pool.statistics()["completed"] == 8
        assert the_worker(pool).watcher is here

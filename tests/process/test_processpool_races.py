"""ProcessPool races between the event loop's thread and the manager thread.

Each test holds the manager thread at one point (a gate on one of its
methods) to make a race that is rare in the wild happen every time.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.resource_tracker
import os
import selectors
import signal
import threading
from pathlib import Path

import psutil
import pytest

import offloop
from offloop._process.pool import ProcessPool
from offloop._process.records import ProcessWorker
from offloop._process.writer import LARGE_PAYLOAD
from tests.helpers import WAIT, await_until, wait_for_file, wait_until

pytestmark = [pytest.mark.loops("asyncio"), pytest.mark.usefixtures("resource_tracker")]


def square(x: int) -> int:
    return x * x


def touch(path: str) -> None:
    Path(path).touch()


def rebuild() -> str:
    # Unpickling a result runs this in the pool's process (on the loop's
    # thread or the manager's); only there does it raise, and a BaseException at that.
    if multiprocessing.parent_process() is None:
        raise KeyboardInterrupt("raised while unpickling in the parent")
    return "rebuilt"


class RaisesWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return rebuild, ()


def make_raising_result() -> RaisesWhenUnpickled:
    return RaisesWhenUnpickled()


def exited(pid: int) -> bool:
    # A zombie: its pipe is closed, but the manager thread has not reaped it.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_call_given_to_an_idle_worker_that_died_unnoticed_runs_on_a_new_one(
    size: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An idle worker killed from outside (OOM killer, kill -9): run() may hand
    # it the next call before the manager thread has seen it die. That call
    # never reached the worker; it must run elsewhere, not fail as crashed.
    argument = bytes(LARGE_PAYLOAD + 1 if size == "large" else 10)
    async with ProcessPool(1, name="idle-kill") as pool:
        handle_exit = pool._on_exit
        for _ in range(3):
            pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
            gate = threading.Event()

            def held(
                worker: ProcessWorker,
                selector: selectors.BaseSelector,
                gate: threading.Event = gate,
            ) -> None:
                gate.wait(WAIT)
                handle_exit(worker, selector)

            monkeypatch.setattr(pool, "_on_exit", held)
            try:
                os.kill(pid, signal.SIGKILL)
                wait_until(functools.partial(exited, pid), WAIT, "the killed worker to exit")
                call = pool.run(len, argument)
            finally:
                monkeypatch.undo()
                gate.set()
            assert await asyncio.wait_for(call, WAIT) == len(argument)
        assert pool.statistics()["crashed"] == 0


async def test_a_call_made_right_after_its_idle_worker_was_killed_runs_on_a_new_one() -> None:
    # No gate: the call goes to the killed worker's pipe while that process
    # is still dying. A SIGKILLed process runs no more code, so it never
    # takes the call from its pipe: every call must succeed.
    async with ProcessPool(1, name="idle-kill-now") as pool:
        for _ in range(5):
            pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.wait_for(pool.run(os.getpid), WAIT) != pid
        assert pool.statistics()["crashed"] == 0


async def test_a_result_whose_unpickling_raises_a_base_exception_fails_only_its_call() -> None:
    async with ProcessPool(1, name="odd-result") as pool:
        with pytest.raises(offloop.NotPicklableError, match="KeyboardInterrupt") as info:
            await asyncio.wait_for(pool.run(make_raising_result), WAIT)
        assert "could not be unpickled here" in str(info.value)
        assert isinstance(info.value.__cause__, KeyboardInterrupt)
        assert await asyncio.wait_for(pool.run(square, 3), WAIT) == 9


async def test_a_failing_manager_thread_closes_the_pool_and_fails_every_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever escapes the manager thread (a bug, a MemoryError) must not
    # leave calls and aclose() waiting forever for a thread that is gone.
    pool = ProcessPool(1, name="broken")

    def fail(worker: ProcessWorker, selector: selectors.BaseSelector) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pool, "_on_reply", fail)  # runs on the worker's first message
    running, queued = pool.run(square, 2), pool.run(square, 3)
    for call in (running, queued):
        with pytest.raises(offloop.PoolClosedError, match="manager thread failed") as info:
            await asyncio.wait_for(call, WAIT)
        assert "RuntimeError: injected failure" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert pool.statistics()["state"] == "closed"
    assert pool.statistics()["processes"] == 0
    assert "manager thread of ProcessPool 'broken' failed" in caplog.text
    with pytest.raises(offloop.PoolClosedError):
        pool.run(square, 4)
    await asyncio.wait_for(pool.aclose(timeout=1), WAIT)


async def test_a_call_cancelled_while_its_worker_starts_never_runs(tmp_path: Path) -> None:
    # A slow initializer (loading a model): the call that started the worker
    # is cancelled before the worker is ready. Like a queued call, it must
    # never start, though kill_on_cancel=False leaves the worker alone.
    gate, started, ran = tmp_path / "gate", tmp_path / "started", tmp_path / "ran"
    pool = ProcessPool(1, initializer=wait_for_file, initargs=(str(gate), str(started)))
    async with pool:
        call = pool.run(touch, str(ran))
        await await_until(started.exists, WAIT, "the initializer to start")
        call.cancel()
        gate.touch()
        # One worker, one call at a time: had the cancelled call been sent,
        # it would have run before this one.
        assert await asyncio.wait_for(pool.run(square, 3), WAIT) == 9
        assert not ran.exists()
        stats = pool.statistics()
        assert (stats["cancelled"], stats["completed"], stats["running"]) == (1, 1, 0)


def record_then_die(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    os._exit(7)


def die_at(gate: str, started: str) -> None:
    wait_for_file(gate, started)
    os._exit(3)


def fail_to_start(gate: str, started: str) -> None:
    wait_for_file(gate, started)
    raise ValueError("bad config")


async def test_a_call_that_kills_a_worker_whose_first_call_was_cancelled_runs_once(
    tmp_path: Path,
) -> None:
    # The cancelled first call was counted as sent but never written: the
    # worker's counts then looked one call behind, so a later call that
    # crashed it was taken for one it never read, and run again.
    gate, started, runs = tmp_path / "gate", tmp_path / "started", tmp_path / "runs"
    pool = ProcessPool(1, initializer=wait_for_file, initargs=(str(gate), str(started)))
    async with pool:
        first = pool.run(square, 2)
        await await_until(started.exists, WAIT, "the initializer to start")
        first.cancel()
        gate.touch()
        await await_until(lambda: pool.statistics()["idle"] == 1, WAIT, "the worker to be ready")
        with pytest.raises(offloop.WorkerCrashed, match="died with exit code 7"):
            await asyncio.wait_for(pool.run(record_then_die, str(runs)), WAIT)
        assert len(runs.read_text().split()) == 1  # it ran once
        stats = pool.statistics()
        assert (stats["cancelled"], stats["crashed"]) == (1, 1)


async def test_a_worker_crashing_while_the_pool_closes_is_a_crash_not_a_close(
    tmp_path: Path,
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = ProcessPool(1)
    call = pool.run(die_at, str(gate), str(started))
    await await_until(started.exists, WAIT, "the call to start")
    closing = asyncio.ensure_future(pool.aclose())  # no timeout: nothing is killed
    await await_until(lambda: pool.statistics()["state"] == "closing", WAIT)
    gate.touch()
    with pytest.raises(offloop.WorkerCrashed, match="died with exit code 3"):
        await asyncio.wait_for(call, WAIT)  # it used to blame a close timeout
    await asyncio.wait_for(closing, WAIT)
    assert pool.statistics()["crashed"] == 1


async def test_a_cancelled_first_call_whose_worker_fails_to_start_counts_as_cancelled_only(
    tmp_path: Path,
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = ProcessPool(1, initializer=fail_to_start, initargs=(str(gate), str(started)))
    async with pool:
        call = pool.run(square, 2)
        await await_until(started.exists, WAIT, "the initializer to start")
        call.cancel()
        gate.touch()
        await await_until(lambda: pool.statistics()["processes"] == 0, WAIT, "the worker to exit")
        stats = pool.statistics()
        assert (stats["cancelled"], stats["failed"], stats["completed"]) == (1, 0, 0)


async def test_a_worker_that_died_unnoticed_is_not_written_to_with_a_sigpipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A program that restored SIGPIPE's default action (command-line tools do,
    # for `| head`) dies of a write to a pipe whose reader is gone. The pool
    # writes to idle workers that may have died unnoticed: run() handing one
    # a call, aclose() asking it to exit. Those writes must fail with EPIPE
    # instead. SIGPIPE is caught here, to see it without dying of it.
    raised: list[int] = []
    previous = signal.signal(signal.SIGPIPE, lambda signum, frame: raised.append(signum))
    try:
        pool = ProcessPool(1, name="sigpipe")
        try:
            handle_exit = pool._on_exit
            for step in ("run", "aclose"):
                pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
                gate = threading.Event()

                def held(
                    worker: ProcessWorker,
                    selector: selectors.BaseSelector,
                    gate: threading.Event = gate,
                ) -> None:
                    gate.wait(WAIT)
                    handle_exit(worker, selector)

                monkeypatch.setattr(pool, "_on_exit", held)
                try:
                    os.kill(pid, signal.SIGKILL)
                    wait_until(functools.partial(exited, pid), WAIT, "the killed worker to exit")
                    if step == "run":
                        call = pool.run(os.getpid)
                    else:
                        closing = asyncio.ensure_future(pool.aclose(timeout=WAIT))
                        await asyncio.sleep(0)  # aclose() has asked its idle worker to exit
                    assert raised == []
                finally:
                    monkeypatch.undo()
                    gate.set()
                if step == "run":
                    assert await asyncio.wait_for(call, WAIT) != pid
                else:
                    await asyncio.wait_for(closing, 2 * WAIT)
            assert pool.statistics()["crashed"] == 0
        finally:
            await asyncio.wait_for(pool.aclose(timeout=WAIT), 2 * WAIT)
    finally:
        signal.signal(signal.SIGPIPE, previous)


@pytest.mark.parametrize("ending", ["returns", "dies"])
async def test_a_call_cancelled_while_the_pool_closes_is_counted_as_cancelled(
    ending: str, tmp_path: Path
) -> None:
    # The close sets the stop token of every running call; a cancel of its
    # awaiter after that is still a cancel to count, once, whether the call
    # then returns or its worker dies.
    gate, started = tmp_path / "gate", tmp_path / "started"
    pool = ProcessPool(1, name="close-cancel")
    call = pool.run(wait_for_file, str(gate), str(started))
    try:
        await await_until(started.exists, WAIT, "the call to start")
        pid = pool._workers[0].pid
        assert pid is not None
        closing = asyncio.ensure_future(pool.aclose(timeout=WAIT))
        await await_until(lambda: pool.statistics()["state"] != "open", WAIT, "the close")
        call.cancel()
        if ending == "returns":
            gate.touch()
        else:
            os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(closing, 2 * WAIT)
    finally:
        gate.touch()
        await asyncio.wait_for(pool.aclose(timeout=WAIT), 2 * WAIT)
    stats = pool.statistics()
    assert stats["cancelled"] == 1, stats
    assert (stats["completed"], stats["failed"]) == ((1, 0) if ending == "returns" else (0, 0))
    assert stats["crashed"] == 0  # it died after its awaiter left

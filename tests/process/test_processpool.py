"""offloop.ProcessPool and to_process: CPU-bound calls in worker processes that heal.

Process start-up (spawn) is slow, so tests that only need a working pool share
one, started before the leak checker's snapshot; tests that kill or retire
workers, or close the pool, use their own.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import offloop
from offloop._core.cpus import available_cpus
from offloop._process import pickling as _pickling
from offloop._process.pickling import RemoteTraceback
from offloop._process.pool import ProcessPool
from offloop._process.toprocess import default_process_pool
from offloop._process.writer import LARGE_PAYLOAD
from tests.helpers import WAIT, await_until, gone, wait_for_file, wait_until

pytestmark = pytest.mark.usefixtures("resource_tracker")


# -- functions run in the workers (module level: sent by reference) ----------


def square(x: int, *, plus: int = 0) -> int:
    return x * x + plus


def pid_and_token() -> tuple[int, bool, str]:
    token = offloop.current_token()
    return os.getpid(), token.is_set(), type(token).__name__


def touch(path: str) -> None:
    Path(path).touch()


def sleep_long(started: str) -> None:
    Path(started).touch()
    time.sleep(60)


def die(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "segfault":
        ctypes.string_at(0)
    time.sleep(WAIT)


class BadStr(Exception):
    """Unpicklable (a lock) and its str() raises: the worker must still answer."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def __str__(self) -> str:
        raise RuntimeError("str() explodes")


class BadReduce(Exception):
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt("reduce raises a BaseException")


def raise_odd(kind: str) -> None:
    raise BadStr() if kind == "badstr" else BadReduce("x")


def make_lock() -> threading.Lock:
    return threading.Lock()


class Boom(ValueError):
    pass


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def explode(kind: str) -> None:
    if kind == "boom":
        raise Boom("the worker says no")
    raise NeedsTwoArgs("x", "y")


_initialized: list[Any] = []


def remember(*values: Any) -> None:
    _initialized.extend(values)


def initialized() -> list[Any]:
    return _initialized


def bad_initializer() -> None:
    raise LookupError("no config")


async def coroutine_function() -> None:
    pass


def generator_function() -> Iterator[int]:
    yield 1


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[ProcessPool]:
    """A 2-process pool, both workers started before any test's leak snapshot."""
    pool = ProcessPool(2, name="shared")

    async def warm() -> None:
        # Two calls at once start both workers; a large one starts the writer thread.
        await asyncio.gather(pool.run(square, 1), pool.run(square, 2))
        assert await pool.run(len, bytes(LARGE_PAYLOAD + 1)) == LARGE_PAYLOAD + 1

    asyncio.run(warm())
    assert pool.statistics()["processes"] == 2
    yield pool
    asyncio.run(pool.aclose())


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# -- results, pickling, errors ------------------------------------------------


async def test_run_returns_results_from_another_process(shared: ProcessPool) -> None:
    assert await shared.run(square, 7, plus=1) == 50
    pid, token_set, token_type = await shared.run(pid_and_token)
    assert pid != os.getpid()
    assert pid in children()
    assert (token_set, token_type) == (False, "StopToken")  # current_token() works there
    results = await asyncio.gather(*(shared.run(square, i) for i in range(60)))
    assert results == [i * i for i in range(60)]
    assert await asyncio.create_task(shared.run(square, 3)) == 9
    assert await asyncio.wait_for(shared.run(square, 4), WAIT) == 16
    blob = os.urandom(1 << 20)  # larger than a pipe's buffer, both ways
    assert await shared.run(bytes, blob) == blob


@pytest.mark.loops("asyncio")
async def test_lambdas_and_closures_are_accepted(shared: ProcessPool) -> None:
    offset = 100

    def closure(x: int) -> int:
        return x + offset

    assert await shared.run(lambda x: x * 3, 5) == 15
    assert await shared.run(closure, 1) == 101


@pytest.mark.loops("asyncio")
async def test_unpicklable_arguments_and_results_are_named(shared: ProcessPool) -> None:
    lock = threading.Lock()
    with pytest.raises(offloop.NotPicklableError, match=r"argument 1 \(lock") as info:
        shared.run(square, 2, lock)  # type: ignore[call-arg, arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(offloop.NotPicklableError, match=r"keyword argument 'plus' \(lock"):
        shared.run(square, 2, plus=lock)  # type: ignore[arg-type]
    with pytest.raises(offloop.NotPicklableError, match=r"its result \(lock"):
        await shared.run(make_lock)
    assert await shared.run(square, 5) == 25  # the pool keeps working
    assert shared.statistics()["running"] == 0


@pytest.mark.loops("asyncio")
async def test_without_cloudpickle_a_lambda_is_refused_with_the_fix(
    shared: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pickling, "_cloudpickle", None)
    with pytest.raises(offloop.NotPicklableError, match=r"its function .*offloop\[process\]"):
        shared.run(lambda: 1)
    assert await shared.run(square, 3) == 9  # module-level functions still go by reference


@pytest.mark.loops("asyncio")
async def test_remote_exception_keeps_its_type_with_the_remote_traceback(
    shared: ProcessPool,
) -> None:
    with pytest.raises(Boom, match="the worker says no") as info:
        await shared.run(explode, "boom")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert str(cause).startswith('\n(in the worker process)\n"""\nTraceback')
    assert "in explode" in str(cause)
    assert 'raise Boom("the worker says no")' in str(cause)
    # An exception that cannot be rebuilt here is reported, not lost.
    with pytest.raises(offloop.NotPicklableError, match=r"raised .*NeedsTwoArgs: x/y") as info2:
        await shared.run(explode, "other")
    assert "raise NeedsTwoArgs" in str(info2.value.__cause__)
    assert await shared.run(square, 2) == 4


@pytest.mark.loops("asyncio")
async def test_bad_arguments_are_refused_before_anything_runs(shared: ProcessPool) -> None:
    with pytest.raises(TypeError, match="coroutine function"):
        shared.run(coroutine_function)
    # Only the generator's creation would run there, and a generator cannot
    # be sent back: refused before anything is sent.
    with pytest.raises(TypeError, match="a generator function"):
        shared.run(generator_function)
    with pytest.raises(TypeError, match="needs a callable"):
        shared.run(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ProcessPool\(max_workers=...\) must be at least 1"):
        ProcessPool(0)
    with pytest.raises(ValueError, match="unknown start method 'nope'"):
        ProcessPool(mp_context="nope")
    with pytest.raises(TypeError, match=r"mp_context=\.\.\.\) must be a multiprocessing context"):
        ProcessPool(mp_context=3)  # type: ignore[arg-type]
    with pytest.raises(offloop.NotPicklableError, match="initializer"):
        ProcessPool(initializer=remember, initargs=(threading.Lock(),))


def test_run_outside_a_running_loop_says_how_to_call_it() -> None:
    pool = ProcessPool(1)
    with pytest.raises(RuntimeError, match="no event loop running in this thread"):
        pool.run(square, 2)
    assert pool.statistics()["processes"] == 0


@pytest.mark.loops("asyncio")
async def test_repr_and_statistics_show_the_pool(shared: ProcessPool, tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    call = shared.run(wait_for_file, str(gate), str(started))
    await await_until(started.exists, WAIT, "the call to start")
    assert repr(shared) == "<ProcessPool 'shared' open: 1 running, 0 queued, 2/2 processes>"
    stats = shared.statistics()
    assert (stats["running"], stats["idle"], stats["processes"]) == (1, 1, 2)
    assert stats["state"] == "open"
    gate.touch()
    assert await asyncio.wait_for(call, WAIT) in children()


# -- crashes, cancellation, worker lifecycle ------------------------------------


@pytest.mark.loops("asyncio")
async def test_a_dead_worker_fails_only_its_call_and_is_replaced(tmp_path: Path) -> None:
    async with ProcessPool(2, name="crashy") as pool:
        for n, (how, shown, code) in enumerate(
            [("sigkill", "SIGKILL", -9), ("exit", "exit code 3", 3), ("segfault", "SIGSEGV", -11)]
        ):
            gate, started = tmp_path / f"gate{n}", tmp_path / f"started{n}"
            other = pool.run(wait_for_file, str(gate), str(started))
            await await_until(started.exists, WAIT, "the other call to start")
            with pytest.raises(offloop.WorkerCrashed, match=shown) as info:
                await asyncio.wait_for(pool.run(die, how), WAIT)
            assert info.value.exitcode == code
            assert info.value.pid is not None
            assert f"pid {info.value.pid}" in str(info.value)
            assert "running function 'die'" in str(info.value)
            await await_until(lambda: gone(info.value.pid), WAIT, "the dead worker")  # type: ignore[arg-type]
            gate.touch()
            assert await asyncio.wait_for(other, WAIT) != info.value.pid  # unaffected
            assert await pool.run(square, 6) == 36  # a new worker serves
        stats = pool.statistics()
        assert (stats["crashed"], stats["failed"], stats["running"]) == (3, 3, 0)
        assert "3 crashed" in repr(pool)


@pytest.mark.loops("asyncio")
async def test_kill_on_cancel_kills_the_worker_and_replaces_it(tmp_path: Path) -> None:
    async with ProcessPool(1, kill_on_cancel=True) as pool:
        before = children()
        started = tmp_path / "started"
        call = pool.run(sleep_long, str(started))
        await await_until(started.exists, WAIT, "the call to start")
        (victim,) = children() - before
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call, 0.05)
        await await_until(lambda: gone(victim), WAIT, "the cancelled call's worker to die")
        pid, _, _ = await asyncio.wait_for(pool.run(pid_and_token), WAIT)
        assert pid != victim
        stats = pool.statistics()
        assert (stats["cancelled"], stats["crashed"], stats["abandoned"]) == (1, 0, 0)
        # The killed call counts as cancelled only; the next one completed.
        assert (stats["failed"], stats["completed"]) == (0, 1)


@pytest.mark.loops("asyncio")
async def test_cancel_abandons_a_running_call_and_skips_a_queued_one(tmp_path: Path) -> None:
    before = children()
    async with ProcessPool(1) as pool:
        gate, started, never = tmp_path / "gate", tmp_path / "started", tmp_path / "never"
        running = pool.run(wait_for_file, str(gate), str(started))
        await await_until(started.exists, WAIT, "the call to start")
        queued = pool.run(touch, str(never))
        assert pool.statistics()["queued"] == 1
        running.cancel()
        queued.cancel()
        assert "1 running (1 abandoned), 0 queued" in repr(pool)
        with pytest.raises(asyncio.CancelledError):
            await running
        (worker,) = children() - before
        gate.touch()
        # The same worker finished the abandoned call and serves the next one.
        pid, _, _ = await asyncio.wait_for(pool.run(pid_and_token), WAIT)
        assert pid == worker
        assert not never.exists()
        stats = pool.statistics()
        assert (stats["cancelled"], stats["abandoned"], stats["completed"]) == (2, 0, 2)


@pytest.mark.loops("asyncio")
async def test_max_tasks_per_worker_replaces_workers_without_errors() -> None:
    async with ProcessPool(1, max_tasks_per_worker=2) as pool:
        pids = [(await asyncio.wait_for(pool.run(pid_and_token), WAIT))[0] for _ in range(5)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
        assert pool.statistics()["crashed"] == 0


@pytest.mark.loops("asyncio")
async def test_initializer_runs_once_in_each_worker() -> None:
    async with ProcessPool(1, initializer=remember, initargs=("ready", 1)) as pool:
        assert await pool.run(initialized) == ["ready", 1]
        assert await pool.run(initialized) == ["ready", 1]
    async with ProcessPool(1, initializer=bad_initializer) as pool:
        with pytest.raises(offloop.WorkerCrashed, match="initializer function 'bad_init") as info:
            await asyncio.wait_for(pool.run(square, 2), WAIT)
        assert "LookupError: no config" in str(info.value)
        assert isinstance(info.value.__cause__, LookupError)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", ["badstr", "badreduce"])
async def test_an_exception_that_cannot_be_pickled_or_printed_is_still_reported(
    shared: ProcessPool, kind: str
) -> None:
    name = "BadStr: <BadStr whose str\\(\\) raised>" if kind == "badstr" else "BadReduce: x"
    with pytest.raises(offloop.NotPicklableError, match=name):
        await asyncio.wait_for(shared.run(raise_odd, kind), WAIT)
    assert shared.statistics()["crashed"] == 0  # reported, not a dead worker
    assert await asyncio.wait_for(shared.run(square, 3), WAIT) == 9


@pytest.mark.loops("asyncio")
async def test_aclose_finishes_running_calls_refuses_queued_and_stops_workers(
    tmp_path: Path,
) -> None:
    before = children()
    pool = ProcessPool(1, name="closing")
    gate, started = tmp_path / "gate", tmp_path / "started"
    running = pool.run(wait_for_file, str(gate), str(started))
    await await_until(started.exists, WAIT, "the call to start")
    queued = pool.run(square, 3)
    workers = children() - before
    assert len(workers) == 1
    closing = asyncio.create_task(pool.aclose())
    await await_until(lambda: pool.statistics()["state"] == "closing", WAIT, "closing")
    with pytest.raises(offloop.PoolClosedError, match="closed before this call of function 'sq"):
        await queued
    with pytest.raises(offloop.PoolClosedError, match="closing and takes no new calls"):
        pool.run(square, 1)
    gate.touch()
    assert await asyncio.wait_for(running, WAIT) in workers
    await asyncio.wait_for(closing, WAIT)
    assert all(gone(pid) for pid in workers)
    assert not [t for t in threading.enumerate() if t.name.startswith("offloop-process-closing")]
    assert repr(pool) == "<ProcessPool 'closing' closed: 0 running, 0 queued, 0/1 processes>"
    await pool.aclose()  # twice is fine
    with pytest.raises(offloop.PoolClosedError, match="cannot be entered because it is closed"):
        async with pool:
            pass


@pytest.mark.loops("asyncio")
async def test_aclose_timeout_kills_a_stuck_call(tmp_path: Path) -> None:
    pool = ProcessPool(1)
    started = tmp_path / "started"
    stuck = pool.run(sleep_long, str(started))
    await await_until(started.exists, WAIT, "the call to start")
    await asyncio.wait_for(pool.aclose(timeout=0.1), WAIT)
    with pytest.raises(offloop.PoolClosedError, match=r"close\(\) or aclose\(\) timed out"):
        await stuck
    assert pool.statistics()["processes"] == 0


def test_close_from_sync_code_stops_every_worker(tmp_path: Path) -> None:
    before = children()
    pool = ProcessPool(2, name="sync-close")
    started = tmp_path / "started"

    async def use() -> None:
        assert await asyncio.wait_for(pool.run(square, 4), WAIT) == 16
        pool.run(sleep_long, str(started))  # left running when the loop ends
        await await_until(started.exists, WAIT, "the long call to start")

    asyncio.run(use())
    workers = children() - before
    assert workers, "the pool started no worker process"
    closer = threading.Thread(target=pool.close, kwargs={"timeout": 0.1})
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive(), "close(timeout=0.1) did not return"
    assert all(gone(pid) for pid in workers)
    assert pool.statistics()["processes"] == 0
    assert repr(pool) == "<ProcessPool 'sync-close' closed: 0 running, 0 queued, 0/2 processes>"
    assert not [t for t in threading.enumerate() if t.name == "offloop-process-sync-close"]
    pool.close()  # twice is fine


@pytest.mark.loops("asyncio")
async def test_close_on_a_running_loop_says_to_await_aclose() -> None:
    pool = ProcessPool(1)
    with pytest.raises(
        offloop.WouldDeadlockError, match=r"Use 'await pool.aclose\(\)' there instead"
    ):
        pool.close()
    assert pool.statistics()["state"] == "open"
    await pool.aclose()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_the_default_size_follows_the_cpus_this_process_may_use() -> None:
    # A container or taskset limited to one CPU of several: one process, not
    # one per CPU of the machine. Run where the affinity can be set alone.
    script = textwrap.dedent(
        """
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        import offloop
        print(offloop.ProcessPool().max_workers, offloop.default_process_pool().max_workers)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert out.stdout.split() == ["1", "1"], out.stderr


@pytest.mark.loops("asyncio")
async def test_to_process_uses_the_default_pool() -> None:
    try:
        pid, _, _ = await offloop.to_process(pid_and_token)
        assert pid != os.getpid()
        assert await offloop.to_process(square, 9) == 81
        pool = default_process_pool()
        assert pool.max_workers == available_cpus()
        assert repr(pool).startswith("<ProcessPool 'default' open:")
        assert any(t.name == "offloop-process-default" for t in threading.enumerate())
    finally:
        await default_process_pool().aclose()
    assert gone(pid)


# -- orphans --------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from offloop._process.pool import ProcessPool

    def say(line):
        # One write and one flush per line: parent and worker share the pipe,
        # and print() would write the words separately, interleaving them.
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    def block():
        say(f"busy {os.getpid()}")
        time.sleep(60)

    async def main():
        ProcessPool._pdeathsig = sys.argv[1] == "1"
        pool = ProcessPool(2, mp_context=sys.argv[2])
        pool.run(block)
        say(f"idle {await pool.run(os.getpid)}")
        await asyncio.sleep(60)

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "watcher"])
def test_workers_exit_when_their_parent_is_killed(
    pdeathsig: bool, method: str, tmp_path: Path
) -> None:
    # A forkserver worker's parent is the fork server: it must watch the
    # pool's process instead (the "watcher" case has no PDEATHSIG to help).
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), "1" if pdeathsig else "0", method],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert parent.stdout is not None
        pids: dict[str, int] = {}
        timer = threading.Timer(WAIT, parent.kill)  # a stuck parent fails, not hangs
        timer.start()
        try:
            while len(pids) < 2:
                kind, pid = parent.stdout.readline().split()
                pids[kind] = int(pid)
        finally:
            timer.cancel()
        assert not any(gone(pid) for pid in pids.values())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(WAIT)
        if parent.stdout is not None:
            parent.stdout.close()
    wait_until(lambda: all(gone(pid) for pid in pids.values()), WAIT, "orphaned workers to exit")


EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, os
    import offloop

    async def main():
        # Two workers of the default pool, both alive when the interpreter exits.
        pids = await asyncio.gather(offloop.to_process(os.getpid), offloop.to_process(os.getpid))
        assert os.getpid() not in pids

    if __name__ == "__main__":
        asyncio.run(main())
    """
)

#: How many times the exit script runs: the race it guards against (the exit
#: hook and a pool's manager thread both reaping one worker) was lost by
#: about one exit in twenty, so each run is one more chance to catch it.
EXIT_RUNS = 8


def test_interpreter_exit_stops_the_default_pool_without_an_error(tmp_path: Path) -> None:
    script = tmp_path / "uses_to_process.py"
    script.write_text(EXIT_SCRIPT)
    for run in range(EXIT_RUNS):
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 0, (run, done.stderr)
        assert done.stderr == "", f"run {run} of {EXIT_RUNS}: {done.stderr}"

"""ProcessPool with large calls, and workers that die while starting.

A call over ``LARGE_PAYLOAD`` bytes is written by the pool's writer thread, so
neither the event loop nor the manager thread waits for a worker to read it.
The tests make a worker that does not read, deterministically: it is stopped
with SIGSTOP, or held in its initializer until the test creates a file. A
failsafe timer resumes a stopped worker after ``WAIT`` seconds, so a
regression fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import offloop
from offloop._process.pool import ProcessPool
from offloop._process.writer import LARGE_PAYLOAD
from tests.helpers import WAIT, await_until, gone, run_script, wait_for_file

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP (POSIX)"),
    pytest.mark.usefixtures("resource_tracker"),
]

BIG = 8 << 20  # far more than a worker's pipe holds


# -- functions run in the workers (module level: sent by reference) ----------


def digest(data: bytes | bytearray, *ignored: object) -> str:
    return hashlib.sha256(data).hexdigest()


def square(x: int) -> int:
    return x * x


def hold_first_worker(claim: str, gate: str, started: str) -> None:
    """Initializer: the first worker to start waits for ``gate``; later ones start at once."""
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    wait_for_file(gate, started, WAIT)


def exit_at_start() -> None:
    os._exit(3)


# -- fixtures and helpers -------------------------------------------------------


@pytest.fixture(scope="module", params=["bytes", "bytearray"])
def blob(request: pytest.FixtureRequest) -> bytes:
    # bytes travel beside the pickled call (out of band); a bytearray is
    # pickled into it. Both are large calls for the writer thread.
    data = os.urandom(BIG)
    return data if request.param == "bytes" else bytearray(data)  # type: ignore[return-value]


def writer_threads(pool: ProcessPool) -> list[threading.Thread]:
    name = f"offloop-process-{pool.name}-writer"
    return [t for t in threading.enumerate() if t.name == name]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[threading.Event]:
    """Stop process ``pid`` for the block; the event is set if the failsafe resumed it."""
    failsafe = threading.Event()

    def resume() -> None:
        failsafe.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    timer = threading.Timer(WAIT, resume)
    os.kill(pid, signal.SIGSTOP)
    timer.start()
    try:
        yield failsafe
    finally:
        timer.cancel()
        timer.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def started_worker(pool: ProcessPool) -> int:
    """Start the pool's (only) worker and return its pid."""
    pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
    assert pid != os.getpid()
    return pid


# -- large calls ------------------------------------------------------------------


async def test_a_large_call_returns_at_once_while_the_worker_does_not_read(
    blob: bytes,
) -> None:
    async with ProcessPool(1, name="big") as pool:
        pid = await started_worker(pool)
        loop = asyncio.get_running_loop()
        with stopped(pid) as failsafe:
            ticks = 0

            def tick() -> None:
                nonlocal ticks
                ticks += 1

            loop.call_soon(tick)
            # The worker is idle but reads nothing: writing 8 MB from here
            # would block this thread until the failsafe resumes it.
            call = pool.run(digest, blob)
            assert not failsafe.is_set(), "run() blocked until the failsafe resumed the worker"
            assert not call.done()
            await await_until(lambda: ticks == 1, WAIT, "the loop to run a callback")
            assert writer_threads(pool), "the large call did not go to the writer thread"
            # Resuming the worker is itself a callback this loop must run.
            loop.call_soon(os.kill, pid, signal.SIGCONT)
            assert await asyncio.wait_for(call, WAIT) == digest(blob)
            assert not failsafe.is_set()
        assert await asyncio.wait_for(pool.run(square, 5), WAIT) == 25
        assert pool.statistics()["completed"] == 3


@pytest.mark.loops("asyncio")
async def test_only_calls_over_the_threshold_go_through_the_writer_thread() -> None:
    async with ProcessPool(1, name="threshold") as pool:
        small = bytes(LARGE_PAYLOAD // 2)
        assert await asyncio.wait_for(pool.run(digest, small), WAIT) == digest(small)
        assert not writer_threads(pool), "a small call took the writer thread's detour"
        large = bytes(LARGE_PAYLOAD + 1)
        assert await asyncio.wait_for(pool.run(digest, large), WAIT) == digest(large)
        assert writer_threads(pool)
    assert not writer_threads(pool)


@pytest.mark.loops("asyncio")
async def test_a_large_first_call_to_a_slow_starting_worker_does_not_stall_the_pool(
    blob: bytes, tmp_path: Path
) -> None:
    claim, gate, started = tmp_path / "claim", tmp_path / "gate", tmp_path / "started"
    async with ProcessPool(
        2, name="slowstart", initializer=hold_first_worker, initargs=(claim, gate, started)
    ) as pool:
        try:
            big = pool.run(digest, blob)
            await await_until(started.exists, WAIT, "the first worker's initializer")
            # The manager thread starts the second worker and reads its reply
            # only if it is not stuck writing 8 MB to the first one.
            assert await asyncio.wait_for(pool.run(square, 3), WAIT) == 9
            assert not big.done()
        finally:
            gate.touch()
        assert await asyncio.wait_for(big, WAIT) == digest(blob)
        stats = pool.statistics()
        assert (stats["completed"], stats["crashed"], stats["processes"]) == (2, 0, 2)


@pytest.mark.loops("asyncio")
async def test_a_worker_killed_while_reading_a_large_call_fails_only_that_call(
    blob: bytes,
) -> None:
    async with ProcessPool(1, name="killed") as pool:
        pid = await started_worker(pool)
        with stopped(pid):
            call = pool.run(digest, blob)
            await await_until(lambda: bool(writer_threads(pool)), WAIT, "the writer thread")
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(offloop.WorkerCrashed, match=r"running function 'digest' died"):
                await asyncio.wait_for(call, WAIT)
        await await_until(lambda: gone(pid), WAIT, "the killed worker")
        # A new worker gets the next large call through the same writer.
        assert await asyncio.wait_for(pool.run(digest, blob), WAIT) == digest(blob)
        assert await asyncio.wait_for(pool.run(square, 4), WAIT) == 16
        stats = pool.statistics()
        assert (stats["crashed"], stats["failed"], stats["running"]) == (1, 1, 0)


@pytest.mark.loops("asyncio")
async def test_kill_on_cancel_kills_a_worker_still_reading_a_large_call(blob: bytes) -> None:
    async with ProcessPool(1, name="killcancel", kill_on_cancel=True) as pool:
        pid = await started_worker(pool)
        with stopped(pid):
            call = pool.run(digest, blob)
            call.cancel()
            await await_until(lambda: gone(pid), WAIT, "the cancelled call's worker to die")
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.wait_for(pool.run(digest, blob), WAIT) == digest(blob)
        stats = pool.statistics()
        assert (stats["cancelled"], stats["crashed"], stats["failed"]) == (1, 0, 0)


@pytest.mark.loops("asyncio")
async def test_a_cancelled_large_call_is_abandoned_like_a_running_one(blob: bytes) -> None:
    async with ProcessPool(1, name="abandon") as pool:
        pid = await started_worker(pool)
        with stopped(pid):
            call = pool.run(digest, blob)
            call.cancel()
            assert "1 running (1 abandoned)" in repr(pool)
        with pytest.raises(asyncio.CancelledError):
            await call
        # The same worker reads the abandoned call, runs it, and serves the next.
        assert await asyncio.wait_for(pool.run(os.getpid), WAIT) == pid
        stats = pool.statistics()
        assert (stats["cancelled"], stats["abandoned"], stats["crashed"]) == (1, 0, 0)


@pytest.mark.loops("asyncio")
async def test_aclose_with_a_large_write_in_progress_stops_the_writer(blob: bytes) -> None:
    pool = ProcessPool(1, name="closewrite")
    pid = await started_worker(pool)
    with stopped(pid):
        big = pool.run(digest, blob)
        await await_until(lambda: bool(writer_threads(pool)), WAIT, "the writer thread")
        # The worker never reads: the timeout kills it, and the write is dropped.
        await asyncio.wait_for(pool.aclose(timeout=0.1), WAIT)
    with pytest.raises(offloop.PoolClosedError, match=r"close\(\) or aclose\(\) timed out"):
        await big
    assert not writer_threads(pool)
    assert pool.statistics()["processes"] == 0


def test_close_from_sync_code_stops_the_writer(blob: bytes) -> None:
    pool = ProcessPool(1, name="syncwriter")

    async def use() -> None:
        assert await asyncio.wait_for(pool.run(digest, blob), WAIT) == digest(blob)

    asyncio.run(use())
    assert writer_threads(pool)
    pool.close(timeout=WAIT)
    assert not writer_threads(pool)
    assert not [t for t in threading.enumerate() if t.name == "offloop-process-syncwriter"]


FORKING = textwrap.dedent(
    """
    import asyncio, os, sys, warnings
    import offloop
    from offloop._process.pool import ProcessPool

    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, Python 3.12+
    BIG = 1 << 20

    async def big_call(pool):
        return await asyncio.wait_for(pool.run(len, bytes(BIG)), 30)

    def main():
        pool = ProcessPool(1, name="forked")
        assert asyncio.run(big_call(pool)) == BIG  # the writer thread now runs
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(big_call(pool))
            except offloop.PoolClosedError:
                pass  # the child's copy is closed: the workers are the parent's
            else:
                raise AssertionError("the child sent a call to its parent's worker")
            own = ProcessPool(1, name="own")
            assert asyncio.run(big_call(own)) == BIG, "a new pool in the child"
            own.close()
            print("child ok", flush=True)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert asyncio.run(big_call(pool)) == BIG, "the parent's pool and writer still work"
        pool.close()
        print("parent ok", flush=True)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_neither_uses_nor_waits_for_its_parents_writer(tmp_path: Path) -> None:
    done = run_script(tmp_path, "forking.py", FORKING, 60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["child ok", "parent ok"]


# -- workers that die while starting -------------------------------------------


@pytest.mark.loops("asyncio")
async def test_a_worker_that_dies_in_its_initializer_is_reported_as_dying_at_start() -> None:
    async with ProcessPool(1, name="diesatstart", initializer=exit_at_start) as pool:
        with pytest.raises(offloop.WorkerCrashed, match="died while starting") as info:
            await asyncio.wait_for(pool.run(square, 2), WAIT)
        message = str(info.value)
        assert info.value.exitcode == 3
        assert "with exit code 3, before it ran the call of function 'square'" in message
        assert "initializer" in message
        assert 'if __name__ == "__main__":' in message
        assert "running" not in message
        assert pool.statistics()["crashed"] == 1


UNGUARDED = textwrap.dedent(
    """
    import asyncio
    import offloop
    from offloop._process.pool import ProcessPool

    if __name__ != "__main__":
        # What a spawned worker sees when it imports this script again: a
        # script that cannot be imported twice (here, deliberately).
        raise ImportError("this script cannot be imported by a worker")

    async def main():
        async with ProcessPool(1) as pool:
            try:
                await asyncio.wait_for(pool.run(abs, -1), 30)
            except offloop.WorkerCrashed as exc:
                print(exc)

    asyncio.run(main())
    """
)


def test_a_spawned_worker_that_cannot_import_main_is_reported_as_dying_at_start(
    tmp_path: Path,
) -> None:
    done = run_script(tmp_path, "unguarded.py", UNGUARDED, 60)
    assert done.returncode == 0, done.stderr
    assert "died while starting, with exit code 1" in done.stdout, done.stdout + done.stderr
    assert 'if __name__ == "__main__":' in done.stdout

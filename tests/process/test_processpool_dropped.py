"""A ProcessPool its user dropped without closing it: warned about, and stopped.

Its manager thread holds it only weakly, so an unclosed pool that nobody
references any more is collected: a ResourceWarning names it, and its worker
processes, manager thread and writer thread exit. A call in flight keeps it
alive until that call is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import threading
import weakref
from pathlib import Path

import psutil
import pytest

from offloop._process import manager as _process_manager
from offloop._process.pool import ProcessPool
from offloop._process.workers import WorkerSet
from offloop._process.writer import LARGE_PAYLOAD
from tests.helpers import (
    WAIT,
    await_until,
    collected,
    open_fds,
    resource_warnings,
    the_warning,
    wait_for_file,
    wait_until,
    warned,
)

WARNING = (
    r"ProcessPool '{name}' was garbage collected without being closed; .* 'await pool.aclose\(\)'"
)

pytestmark = pytest.mark.loops("asyncio")


@pytest.fixture(scope="module", autouse=True)
def _counter_arena(resource_tracker: None) -> None:
    # The shared memory arena that each worker's counter lives in (two fds)
    # lives as long as the interpreter, like the resource tracker: create it
    # before any test's fd count.
    multiprocessing.get_context("spawn").RawValue(ctypes.c_uint64, 0)


def pool_threads(name: str) -> list[threading.Thread]:
    prefix = f"offloop-process-{name}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def gone(pid: int) -> bool:
    # Reaped, not a zombie: the pool joined it.
    return not psutil.pid_exists(pid)


def touch(path: str) -> None:
    Path(path).touch()


async def test_a_dropped_open_pool_warns_and_stops_its_workers_and_threads() -> None:
    fds_before = open_fds()
    pool = ProcessPool(2, name="dropped")
    # Two calls at once start both workers; the large one starts the writer thread.
    results = await asyncio.wait_for(
        asyncio.gather(pool.run(len, bytes(LARGE_PAYLOAD + 1)), pool.run(os.getpid)), WAIT
    )
    assert results[0] == LARGE_PAYLOAD + 1
    pids = [w.pid for w in pool._workers if w.pid is not None]
    assert len(pids) == 2
    threads = pool_threads("dropped")
    assert sorted(t.name for t in threads) == [
        "offloop-process-dropped",
        "offloop-process-dropped-writer",
    ]
    ref = weakref.ref(pool)
    with resource_warnings() as found:
        del pool, results
        await await_until(
            lambda: collected(ref) and warned(found, WARNING.format(name="dropped")),
            WAIT,
            "the dropped pool to be collected and warn",
        )
        # The manager thread warns once the finalizer woke it, then exits.
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} still runs"
    message = the_warning(found, WARNING.format(name="dropped"))
    assert "its manager thread and 2 worker processes are being stopped now" in message
    wait_until(lambda: not any(map(psutil.pid_exists, pids)), WAIT, f"workers {pids} to exit")
    assert open_fds() <= fds_before


async def test_a_dropped_pool_with_a_call_running_lives_until_the_call_is_done(
    tmp_path: Path,
) -> None:
    gate, started = str(tmp_path / "gate"), str(tmp_path / "started")
    pool = ProcessPool(1, name="dropped-busy")
    call = pool.run(wait_for_file, gate, started, WAIT)
    ref = weakref.ref(pool)
    del pool
    await await_until(lambda: os.path.exists(started), WAIT, "the call to start")
    with resource_warnings() as found:
        gc.collect()
        assert ref() is not None, "a pool running an awaited call was collected"
        touch(gate)
        pid = await asyncio.wait_for(call, WAIT)
    assert found == []
    threads = pool_threads("dropped-busy")
    with resource_warnings() as found:
        del call  # the last reference: the call's future holds its pool
        await await_until(
            lambda: collected(ref) and warned(found, WARNING.format(name="dropped-busy")),
            WAIT,
            "the dropped pool to be collected and warn",
        )
    the_warning(found, WARNING.format(name="dropped-busy"))
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"{thread.name} still runs"
    wait_until(lambda: gone(pid), WAIT, f"worker {pid} to exit")


async def test_a_pool_dropped_on_its_own_manager_thread_stops_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The finalizer runs on whichever thread drops the last reference: here
    # the manager thread, at the end of a batch of events it was held in.
    pool = ProcessPool(1, name="dropped-on-manager")
    pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
    (manager,) = pool_threads("dropped-on-manager")
    in_batch, release = threading.Event(), threading.Event()
    maintain = WorkerSet._maintain

    def held(self: WorkerSet, selector: object) -> bool:
        if threading.current_thread() is manager:
            in_batch.set()
            release.wait(WAIT)
        return maintain(self, selector)  # type: ignore[arg-type]

    monkeypatch.setattr(WorkerSet, "_maintain", held)
    pool._wake()
    assert in_batch.wait(WAIT), "the manager thread never handled the wake-up"
    ref = weakref.ref(pool)
    del pool
    for _ in range(3):  # the loop's callbacks for the finished call drop their references
        await asyncio.sleep(0)
    gc.collect()
    assert ref() is not None  # the manager thread holds it for its batch
    with resource_warnings() as found:
        release.set()
        manager.join(WAIT)
        assert not manager.is_alive(), "the manager thread of a dropped pool still runs"
    the_warning(found, WARNING.format(name="dropped-on-manager"))
    # Warned on the manager thread, as it let go of the pool after its batch.
    assert found[0].filename == _process_manager.__file__
    assert ref() is None
    wait_until(lambda: gone(pid), WAIT, f"worker {pid} to exit")


async def test_a_dropped_pool_kills_a_worker_that_does_not_exit_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_process_manager, "STOP_GRACE", 0.1)
    pool = ProcessPool(1, name="dropped-stuck")
    pid = await asyncio.wait_for(pool.run(os.getpid), WAIT)
    (manager,) = pool_threads("dropped-stuck")
    os.kill(pid, signal.SIGSTOP)  # it cannot read the request to exit
    try:
        ref = weakref.ref(pool)
        with resource_warnings() as found:
            del pool
            await await_until(
                lambda: collected(ref) and warned(found, WARNING.format(name="dropped-stuck")),
                WAIT,
                "the dropped pool to be collected and warn",
            )
        the_warning(found, WARNING.format(name="dropped-stuck"))
        manager.join(WAIT)
        assert not manager.is_alive(), "the manager thread of a dropped pool still runs"
        wait_until(lambda: gone(pid), WAIT, f"worker {pid} to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_never_used_pool_is_collected_silently() -> None:
    # No worker, no thread, no pipe: nothing to stop, so nothing to warn about.
    with resource_warnings() as found:
        ref = weakref.ref(ProcessPool(2, name="never-used"))
        assert collected(ref)
    assert found == []

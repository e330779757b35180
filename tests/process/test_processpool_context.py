"""ProcessPool(mp_context=...): a multiprocessing context object, or a start method's name."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import subprocess
import sys
from multiprocessing.context import BaseContext, SpawnContext, SpawnProcess
from pathlib import Path

import pytest

from offloop import ProcessPool
from tests.helpers import WAIT

pytestmark = pytest.mark.loops("asyncio")

# Names of the processes the recording context below started (in this process).
started: list[str] = []


class RecordingProcess(SpawnProcess):
    """A spawn process that notes its start; the worker sees its own type too."""

    def start(self) -> None:
        started.append(self.name)
        super().start()


class RecordingSpawnContext(SpawnContext):
    Process = RecordingProcess


@pytest.fixture(scope="module", autouse=True)
def _helper_processes() -> None:
    # multiprocessing starts these on first use and keeps them for the life of
    # the interpreter; start them before any test's leak snapshot so that they
    # are not taken for leaked workers.
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


def worker_process() -> tuple[int, str]:
    # Runs in the worker: which process is this, and of which Process class?
    return os.getpid(), type(multiprocessing.current_process()).__name__


async def test_workers_are_started_from_the_context_object_given() -> None:
    started.clear()
    pool = ProcessPool(1, mp_context=RecordingSpawnContext(), name="recording")
    try:
        pid, kind = await asyncio.wait_for(pool.run(worker_process), WAIT)
    finally:
        await asyncio.wait_for(pool.aclose(), WAIT)
    assert pid != os.getpid()
    assert kind == "RecordingProcess"
    assert len(started) == 1


@pytest.mark.parametrize(
    "mp_context",
    [multiprocessing.get_context("spawn"), "spawn"],
    ids=["spawn context object", "spawn method name"],
)
async def test_spawn_as_a_context_object_or_a_name(mp_context: BaseContext | str) -> None:
    async with ProcessPool(1, mp_context=mp_context, name="spawned") as pool:
        pid, kind = await asyncio.wait_for(pool.run(worker_process), WAIT)
        assert await asyncio.wait_for(pool.run(divmod, 7, 2), WAIT) == (3, 1)
    assert pid != os.getpid()
    assert kind == "SpawnProcess"


async def test_forkserver_workers_run_calls() -> None:
    # A forkserver worker's parent is the fork server, not this process: its
    # check that the pool's process is alive must not take that for a death.
    async with ProcessPool(2, mp_context="forkserver", name="forked") as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(worker_process) for _ in range(4))), WAIT
        )
        assert await asyncio.wait_for(pool.run(divmod, 7, 2), WAIT) == (3, 1)
        assert pool.statistics()["crashed"] == 0
    assert {kind for _, kind in results} == {"ForkServerProcess"}
    assert os.getpid() not in {pid for pid, _ in results}


# A script run with ``python -c``: a spawned child cannot import its __main__,
# so what __main__ defines must travel by value, arguments included.
MAIN_CLASS_ARGUMENT = """
import asyncio, offloop

class Point:
    def __init__(self, x):
        self.x = x

async def main():
    async with offloop.ProcessPool(1, mp_context="spawn") as pool:
        print(await pool.run(vars, Point(3)))

asyncio.run(main())
"""


def test_an_argument_of_a_class_defined_in_an_unimportable_main_is_sent_by_value() -> None:
    done = subprocess.run(
        [sys.executable, "-c", MAIN_CLASS_ARGUMENT],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'x': 3}"


# The classic initializer pattern: set a global of the main script once per
# worker, read it in later calls. The initializer must reach the same module
# as the calls (by reference), not a copy of it sent by value.
INITIALIZER_SETS_MAIN_GLOBALS = """
import asyncio, sys, offloop

CONFIG = {}

def init(value):
    CONFIG["value"] = value

def read():
    return CONFIG.get("value")

async def main():
    pool = offloop.ProcessPool(1, initializer=init, initargs=(42,), mp_context=sys.argv[1])
    async with pool:
        print(await asyncio.wait_for(pool.run(read), 30))

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_an_initializer_in_the_main_script_sets_the_globals_calls_see(
    method: str, tmp_path: Path
) -> None:
    script = tmp_path / "init_main.py"
    script.write_text(INITIALIZER_SETS_MAIN_GLOBALS)
    done = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=WAIT * 6,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"

"""What interpreter exit cleans up: the shared loop thread and busy process workers."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import psutil

from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import run_script

SHARED_LOOP = textwrap.dedent(
    """
    import asyncio, threading
    import offloop

    started = threading.Event()

    async def forever():
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            print("cleaned up on the shared loop", flush=True)

    threading.Thread(target=offloop.from_thread, args=(forever,), daemon=True).start()
    assert started.wait(10)
    print("exiting", flush=True)
    """
)


def test_exit_closes_the_shared_loop_and_runs_its_finally_blocks(tmp_path: Path) -> None:
    done = run_script(tmp_path, "shared_loop.py", SHARED_LOOP, WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["exiting", "cleaned up on the shared loop"]


BUSY_WORKER = textwrap.dedent(
    """
    import asyncio, os, pathlib, sys, time
    import offloop
    from offloop._process.pool import ProcessPool

    def busy():
        # Written whole, then renamed into place: the parent may see the file
        # (and exit, killing this worker) the moment it exists.
        pathlib.Path("worker.pid.tmp").write_text(str(os.getpid()))
        os.replace("worker.pid.tmp", "worker.pid")
        time.sleep(60)

    async def main():
        offloop.to_process(busy)  # left running: exit must not wait a minute for it
        while not pathlib.Path("worker.pid").exists():
            await asyncio.sleep(0.01)

    if __name__ == "__main__":
        ProcessPool._pdeathsig = False  # only the exit hook may end the worker here
        asyncio.run(main())
        print("exiting", flush=True)  # a normal exit: atexit hooks run
    """
)


def test_exit_kills_busy_process_workers_instead_of_waiting(tmp_path: Path) -> None:
    done = run_script(tmp_path, "busy.py", BUSY_WORKER, WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"
    pid = int((tmp_path / "worker.pid").read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(WAIT)
    assert not psutil.pid_exists(pid)

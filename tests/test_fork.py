"""A child made by os.fork() gets working pools of its own and leaves the parent's alone."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, warnings
    import offloop
    from offloop._threads.tothread import service_pool  # where services start and stop servers

    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, Python 3.12+

    async def ping():
        return os.getpid()

    async def use():
        # Bounded: a pool that lost its threads in the fork would hang here.
        in_thread = await asyncio.wait_for(offloop.to_thread(os.getpid), 10)
        assert await asyncio.wait_for(service_pool().run(os.getpid), 10) == in_thread
        return in_thread, await asyncio.wait_for(offloop.to_process(os.getppid), 30)

    def crossing():
        return offloop.from_thread(ping)

    def main():
        parent = os.getpid()
        assert asyncio.run(use())[0] == parent
        assert crossing() == parent  # starts the shared loop thread in the parent
        pid = os.fork()
        if pid == 0:
            in_thread, worker_parent = asyncio.run(use())
            assert in_thread == os.getpid(), "to_thread in the child"
            assert worker_parent == os.getpid(), "the child's own process worker"
            assert crossing() == os.getpid(), "from_thread on the child's shared loop"
            print("child ok", flush=True)
            sys.exit(0)  # runs the child's atexit hooks: they must spare the parent's workers
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert asyncio.run(use()) == (parent, parent), "the parent's pools still work"
        print("parent ok", flush=True)

    if __name__ == "__main__":  # the process workers are spawned: they import this file
        main()
    """
)


def test_pools_work_in_a_forked_child_and_the_parent_keeps_its_own(tmp_path: Path) -> None:
    done = run_script(tmp_path, "forking.py", SCRIPT, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["child ok", "parent ok"]

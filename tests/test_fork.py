"""A child made by os.fork() gets working pools of its own and leaves the parent's alone."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")

#: The parent's side of a fork in the scripts below: wait for the child, at
#: most 20 s, and say how it went.
WAITED_FOR = textwrap.dedent(
    """
    import os, time

    def waited_for(pid):
        deadline = time.monotonic() + 20
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "the child hung"
            time.sleep(0.01)
        return "parent ok"
    """
)


def printed(tmp_path: Path, name: str, script: str, timeout: float = 60) -> tuple[list[str], str]:
    """Run ``script``; its lines of output, and all it wrote (for messages)."""
    done = run_script(tmp_path, name, script, timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done.stdout.splitlines(), output


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
    lines, output = printed(tmp_path, "forking.py", SCRIPT, 120)
    assert lines == ["child ok", "parent ok"], output


FORK_IN_A_WORKER = WAITED_FOR + textwrap.dedent(
    """
    import asyncio, os, sys, time, warnings
    import offloop

    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, Python 3.12+

    async def ping():
        return os.getpid()

    def fork_and_cross():
        pid = os.fork()
        if pid == 0:
            # The worker's call (its token, its parent's loop) is the parent's.
            try:
                ok = offloop.from_thread(ping) == os.getpid()
                print("child from_thread", "ok" if ok else "wrong loop", flush=True)
                print("child token", offloop.current_token(), flush=True)
            finally:
                os._exit(0)
        return waited_for(pid)  # bounded: the child used to block forever

    async def main():
        return await offloop.to_thread(fork_and_cross)

    print(asyncio.run(main()), flush=True)
    """
)


def test_a_child_forked_in_a_worker_can_cross_into_async_code(tmp_path: Path) -> None:
    lines, output = printed(tmp_path, "fork_in_worker.py", FORK_IN_A_WORKER)
    assert lines == [
        "child from_thread ok",
        "child token <StopToken not set>",
        "parent ok",
    ], output


FORK_BESIDE_A_GIL_HOLDER = WAITED_FOR + textwrap.dedent(
    """
    import asyncio, os, threading, time, warnings
    import offloop
    from offloop._threads.gil import GIL_AFTER

    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, Python 3.12+

    def work(gate):
        gate.wait(30)
        return os.getpid()

    async def in_child():
        pool = offloop.default_thread_pool()
        # The parent's call never ends here: it must not hold this one back.
        print("child holders", len(pool._gil_calls), flush=True)
        gate = threading.Event()
        gate.set()
        return await asyncio.wait_for(offloop.to_thread(work, gate), 10) == os.getpid()

    def fork():
        pid = os.fork()
        if pid == 0:
            try:
                print("child ok" if asyncio.run(in_child()) else "child wrong", flush=True)
            finally:
                os._exit(0)
        return waited_for(pid)

    async def main():
        pool = offloop.default_thread_pool()
        pool._gil_fns[work.__code__] = GIL_AFTER  # as if learnt: its calls hold the GIL
        gate = threading.Event()
        running = offloop.to_thread(work, gate)
        print("parent holders", len(pool._gil_calls), flush=True)
        try:
            return await asyncio.to_thread(fork)  # not from a worker of the pool
        finally:
            gate.set()
            await running

    print(asyncio.run(main()), flush=True)
    """
)


def test_a_child_forked_beside_a_gil_holding_call_is_not_held_back_by_it(tmp_path: Path) -> None:
    lines, output = printed(tmp_path, "fork_gil.py", FORK_BESIDE_A_GIL_HOLDER)
    assert lines == ["parent holders 1", "child holders 0", "child ok", "parent ok"], output


FORK_BESIDE_A_LOOP_THREAD = WAITED_FOR + textwrap.dedent(
    """
    import os, warnings
    import offloop

    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, Python 3.12+

    async def ping():
        return os.getpid()

    # Started before the fork, as by an app that gunicorn --preload imports.
    lt = offloop.LoopThread(name="preloaded").start()
    assert lt.call(ping) == os.getpid()
    pid = os.fork()
    if pid == 0:
        # Its thread is the parent's: a call would wait for it forever.
        try:
            lt.call(ping)
            print("child ran it", flush=True)
        except offloop.PoolClosedError:
            print("child refused", lt.state.value, flush=True)
        finally:
            lt.close()
            os._exit(0)
    print(waited_for(pid), flush=True)
    print("parent", "ok" if lt.call(ping) == os.getpid() else "wrong loop", flush=True)
    lt.close()
    """
)


def test_a_loop_thread_started_before_a_fork_refuses_calls_in_the_child(tmp_path: Path) -> None:
    lines, output = printed(tmp_path, "fork_loop_thread.py", FORK_BESIDE_A_LOOP_THREAD)
    assert lines == ["child refused closed", "parent ok", "parent ok"], output

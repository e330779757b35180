"""Ctrl-C (a real SIGINT, in a child process) while sync code waits on a crossing."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.helpers import SPAWN_WAIT, run_script

# The child's loop side sends SIGINT to its own process once the main thread
# is blocked in the named offloop function: the KeyboardInterrupt is raised
# there, as when a user presses Ctrl-C at that moment.
_PRELUDE = """
import asyncio, os, signal, sys, threading, time
import offloop

MAIN = threading.main_thread().ident


async def ctrl_c_once_main_waits_in(name):
    deadline = time.monotonic() + 10
    while True:
        frame = sys._current_frames()[MAIN]
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        if name in names:
            break
        assert time.monotonic() < deadline, "the main thread never waited in " + name
        await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGINT)
"""


def test_ctrl_c_while_a_context_is_entered_does_not_leave_it_open(tmp_path: Path) -> None:
    # enter() failed, so nobody can exit the context: it must not be entered later.
    script = _PRELUDE + textwrap.dedent(
        """
        import contextlib
        steps = []
        gate = None

        @contextlib.asynccontextmanager
        async def resource():
            global gate
            gate = asyncio.Event()
            steps.append("entering")
            await ctrl_c_once_main_waits_in("ready")
            await gate.wait()
            steps.append("entered")
            try:
                yield "r"
            finally:
                steps.append("exited")

        with offloop.LoopThread(name="ctx") as lt:
            portal = offloop.Portal(lt)
            bound = portal.context(resource)
            try:
                bound.enter()
            except KeyboardInterrupt:
                print("interrupted", bound.state.name)
            portal.call_sync(lambda: gate.set())
            handle = bound._handle
            try:
                handle.result(timeout=10)
            except BaseException as exc:
                print("task", type(exc).__name__)
            print("open", lt.state.name, steps)
        print("closed", steps)
        """
    )
    done = run_script(tmp_path, "ctx.py", script, timeout=SPAWN_WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "interrupted EXITED",
        "task CancelledError",
        "open RUNNING ['entering']",
        "closed ['entering']",
    ], done.stderr

"""A loop thread never keeps the process alive, not even through its default executor."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import SPAWN_WAIT, run_script

# The stuck call is asyncio.to_thread's on the loop thread's loop, left
# running in a task of its own: the crossing that started it has returned.
_PRELUDE = """
import asyncio, threading
import offloop

started = threading.Event()
leftovers = set()


def stuck():
    started.set()
    threading.Event().wait()


async def leave_stuck():
    task = asyncio.ensure_future(asyncio.to_thread(stuck))
    leftovers.add(task)
"""

_SENDERS = {
    # Left open: its daemon thread simply ends with the process.
    "unclosed LoopThread": """
        lt = offloop.LoopThread(name="stuck").start()
        lt.call(leave_stuck)
    """,
    # Closed at interpreter exit, with a bounded wait.
    "from_thread": """
        offloop.from_thread(leave_stuck)
    """,
    "to_loop": """
        asyncio.run(offloop.to_loop(leave_stuck))
    """,
}

_LEAVE = """
assert started.wait(10), "the stuck call never started"
print("leaving", flush=True)
"""


@pytest.mark.parametrize("sender", list(_SENDERS))
def test_a_stuck_to_thread_on_a_loop_thread_does_not_hang_interpreter_exit(
    tmp_path: Path, sender: str
) -> None:
    script = _PRELUDE + textwrap.dedent(_SENDERS[sender]) + _LEAVE
    # Hangs for good (TimeoutExpired, the child killed) if exit joins the
    # thread of the stuck call, as it joins a ThreadPoolExecutor's.
    done = run_script(tmp_path, "stuck.py", script, timeout=SPAWN_WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["leaving"], done.stderr
    # What was left behind is named at exit.
    assert "function 'stuck'" in done.stderr
    assert "still running at interpreter exit and was abandoned" in done.stderr

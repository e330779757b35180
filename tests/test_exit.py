"""A program whose loop ends while a worker is stuck exits promptly, with a warning."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.helpers import run_script

STUCK_PROGRAM = """
import asyncio, time, offloop

async def main():
    try:
        await asyncio.wait_for(offloop.to_thread(time.sleep, 60), 0.1)
    except asyncio.TimeoutError:
        print("gave up waiting", flush=True)

asyncio.run(main())
print("loop finished", flush=True)
"""


def test_stuck_worker_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    # asyncio.to_thread would keep this process alive for the full 60 s
    # (asyncio.run joins the default executor); the bound below is far shorter.
    proc = run_script(tmp_path, "stuck.py", textwrap.dedent(STUCK_PROGRAM), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gave up waiting", "loop finished"]
    assert "builtin_function_or_method 'sleep'" in proc.stderr
    assert "offloop-default-1" in proc.stderr
    assert "still running at interpreter exit and was abandoned" in proc.stderr


# The call's token is set by the timeout; the call then returns only once the
# exit hook is running, so it is certain to be running when exit begins.
TOLD_PROGRAM = """
import asyncio, sys, threading, time
import offloop

def in_exit_hook():
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "_warn_stuck_at_exit":
            return True
        frame = frame.f_back
    return False

def slow_query():
    token = offloop.current_token()
    token.wait()
    deadline = time.monotonic() + 30
    while not in_exit_hook():
        if time.monotonic() > deadline:
            print("the exit hook never ran", flush=True)
            return
        time.sleep(0.0005)
    print("returned during the exit hook", flush=True)

async def main():
    try:
        await asyncio.wait_for(offloop.to_thread(slow_query), 0.05)
    except asyncio.TimeoutError:
        print("gave up waiting", flush=True)

asyncio.run(main())
"""


def test_a_call_told_to_stop_that_returns_as_exit_begins_is_not_reported(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "told.py", textwrap.dedent(TOLD_PROGRAM))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gave up waiting", "returned during the exit hook"]
    assert "abandoned" not in proc.stderr, proc.stderr


def test_a_call_told_to_stop_that_ignores_its_token_is_still_reported(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        "deaf.py",
        textwrap.dedent(
            """
            import asyncio, threading
            import offloop

            def deaf():
                threading.Event().wait()  # never polls current_token()

            async def main():
                try:
                    await asyncio.wait_for(offloop.to_thread(deaf), 0.05)
                except asyncio.TimeoutError:
                    print("gave up waiting", flush=True)

            asyncio.run(main())
            """
        ),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gave up waiting"]
    assert (
        "offloop: function 'deaf' in thread offloop-default-1 of pool 'default' is still "
        "running at interpreter exit and was abandoned" in proc.stderr
    ), proc.stderr

"""The default failure action under ``asyncio.run`` once the task that called ``start()`` ended.

The loop is run by ``run_until_complete`` (asyncio.run's main task), not
``run_forever``: stopping it would end the program with asyncio's "Event loop
stopped before Future completed". The supervisor cancels the main task instead,
once its services have stopped, so the failure reaches the program.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import SPAWN_WAIT, run_script

APP = """
import asyncio
import logging
import sys

import offloop

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

sv = offloop.Supervisor(name="bg", grace=1)
crash = None


@sv.service(restart="no", startup_window=0)
async def flaky():
    await crash.wait()
    raise ConnectionResetError("the gateway closed the connection")


async def boot():
    await sv.start()


async def main():
    global crash
    crash = asyncio.Event()
    await asyncio.create_task(boot(), name="boot")  # the task that called start() ends
    crash.set()
    try:
        await asyncio.Event().wait()  # the program's own work, forever
    finally:
        print("main ended", file=sys.stderr, flush=True)
        {finally_}


asyncio.run(main())
"""


@pytest.mark.parametrize("finally_", ["pass", "await sv.aclose()"])
def test_the_failure_ends_asyncio_run_clearly_when_the_start_task_has_ended(
    tmp_path: Path, finally_: str
) -> None:
    done = run_script(
        tmp_path, "app.py", textwrap.dedent(APP.format(finally_=finally_)), timeout=SPAWN_WAIT
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Event loop stopped before Future completed" not in out
    # The services were stopped, then the main task was cancelled (its finally ran).
    assert done.stderr.index("bg: stopped") < done.stderr.index("main ended"), out
    last = done.stderr.strip().splitlines()[-1]
    if finally_ == "pass":
        # Nobody awaited aclose(): the cancellation itself says what happened
        # (its last line from Python 3.11 on; chained before it on 3.10).
        said = "CancelledError: offloop: Service 'flaky' failed: it crashed"
        assert said in done.stderr, out
        assert "because the task that called start() had ended; await sv.aclose()" in out
    else:
        assert last.startswith("offloop.ServiceFailed: Service 'flaky' failed: it crashed"), out


STOPPING = """
import asyncio
import threading

import offloop

sv = offloop.Supervisor(name="bg", grace=5)
told, release = threading.Event(), threading.Event()


@sv.service(restart="no")
def slow(token):
    token.wait()
    told.set()
    release.wait(5)  # until main() awaits aclose()


@sv.service(restart="no", startup_window=0)
async def flaky():
    raise ConnectionResetError("the gateway closed the connection")


async def main():
    await asyncio.create_task(sv.start())  # the task that called start() ends
    await asyncio.to_thread(told.wait, 5)  # the failure's stop is under way
    asyncio.get_running_loop().call_soon(release.set)
    await sv.aclose()


asyncio.run(main())
"""


def test_main_awaiting_aclose_as_the_failure_stop_ends_gets_the_failure(tmp_path: Path) -> None:
    # main() awaits aclose() while the failure's stop runs: the cancellation
    # meant for a main task that would never hear of the failure must not
    # land in that aclose(), which raises the failure itself.
    done = run_script(tmp_path, "app.py", STOPPING, timeout=SPAWN_WAIT)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("offloop.ServiceFailed: Service 'flaky' failed"), done.stderr
    assert done.returncode == 1, done.stderr

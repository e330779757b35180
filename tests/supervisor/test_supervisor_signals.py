"""sv.run() in a real subprocess, stopped by real signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import Proc, wait_until

SCRIPT = """
import logging
import sys
import threading

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=float(sys.argv[1]), name="script")


@sv.service
def worker(token):
    print("worker running", flush=True)
    token.wait()
    print("worker got its token", flush=True)


@sv.service
async def bot():
    import asyncio

    while True:
        await asyncio.sleep(3600)


if "--deaf" in sys.argv:

    @sv.service
    def deaf():
        print("deaf running", flush=True)
        threading.Event().wait()  # ignores its token: only abandoning it ends the run


code = sv.run()
print(f"run() returned {code}", flush=True)
sys.exit(code)
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_stops_gracefully_with_exit_code_0(script: Path, sig: signal.Signals) -> None:
    with Proc([str(script), "5"], script.parent) as proc:
        proc.wait_for("script: all 2 service")
        proc.send(sig)
        assert proc.exit_code() == 0
        out = proc.output
    assert f"WARNING script: received {sig.name}, stopping gracefully within 5s" in out
    assert "worker got its token" in out
    assert "INFO script: service 'bot' stopped" in out
    # The signal's line is logged from a thread, waited for only briefly so that
    # a blocked stderr cannot hold the stop: on a busy machine it may come later.
    assert out.endswith("\nrun() returned 0")
    assert out.index("INFO script: stopped\n") < out.index("run() returned 0")


def test_a_sigint_ignored_when_the_process_started_stays_ignored(script: Path) -> None:
    with Proc([str(script), "5"], script.parent, ignore_sigint=True) as proc:
        proc.wait_for("script: all 2 service")
        # Both are pending before the child runs again, and SIGINT is handled
        # first: it used to start the stop, and SIGTERM then forced the exit.
        proc.send(signal.SIGINT)
        proc.send(signal.SIGTERM)
        assert proc.exit_code() == 0
        out = proc.output
    assert "WARNING script: received SIGTERM, stopping gracefully within 5s" in out
    assert "received SIGINT" not in out
    # Said once at the start, so a 'kill -INT' that does nothing is no mystery.
    assert (
        f"WARNING script: SIGINT is ignored: this process started with it ignored (a "
        f"background job of a shell, nohup), so Ctrl-C and 'kill -INT' do nothing. Stop it "
        f"with SIGTERM ('kill {proc.popen.pid}')." in out
    )


def test_shutdown_is_bounded_by_grace_and_names_the_abandoned_thread(script: Path) -> None:
    with Proc([str(script), "0.3", "--deaf"], script.parent) as proc:
        proc.wait_for("script: all 3 service")
        proc.send(signal.SIGINT)
        # The deaf thread never returns: only the grace bound lets the process exit,
        # about 0.3 s later (3 s of slack for a loaded machine; the default wait is 15 s).
        assert proc.exit_code(timeout=0.3 + 3.0) == 0
        out = proc.output
    assert "WARNING script: service 'deaf' did not stop within the grace period" in out
    assert "script: service 'deaf' abandoned thread 'offloop-service-deaf', currently at:" in out
    assert "in deaf\n    threading.Event().wait()" in out
    assert "worker got its token" in out  # the others were still stopped politely
    assert "run() returned 0" in out


def test_second_signal_exits_at_once_with_non_zero_code(script: Path) -> None:
    with Proc([str(script), "3600", "--deaf"], script.parent) as proc:
        proc.wait_for("script: all 3 service")
        proc.send(signal.SIGINT)
        proc.wait_for("stopping service 'deaf'")  # stuck there for up to an hour of grace
        proc.send(signal.SIGTERM)
        assert proc.exit_code() == 128 + signal.SIGTERM
        out = proc.output
    assert "ERROR script: received SIGTERM again, exiting now" in out
    assert "run() returned" not in out


BLOCKING = """
import logging
import sys
import time

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=float(sys.argv[1]), name="blocked")


@sv.service
async def http_service():
    print("blocking the loop", flush=True)
    while True:
        time.sleep(0.05)  # the bug: blocking inside async def


sys.exit(sv.run())
"""


@pytest.fixture
def blocking_script(tmp_path: Path) -> Path:
    path = tmp_path / "blocking.py"
    path.write_text(textwrap.dedent(BLOCKING))
    return path


def test_second_signal_exits_at_once_even_while_a_coroutine_blocks_the_loop(
    blocking_script: Path,
) -> None:
    with Proc([str(blocking_script), "3600"], blocking_script.parent) as proc:
        proc.wait_for("blocking the loop")
        proc.send(signal.SIGINT)
        # Logged by the handler's watchdog thread, so it shows while the loop is blocked
        # (and a second signal sent before the first is handled would merge with it).
        proc.wait_for("received SIGINT, stopping gracefully")
        proc.send(signal.SIGINT)
        # Handlers on the loop would never run: the loop never gets a turn.
        assert proc.exit_code(timeout=5.0) == 128 + signal.SIGINT
    assert "ERROR blocked: received SIGINT again, exiting now" in proc.output


def test_a_blocked_loop_still_exits_after_grace_naming_the_blocking_line(
    blocking_script: Path,
) -> None:
    from offloop._supervisor.signals import FORCE_MARGIN

    with Proc([str(blocking_script), "0.2"], blocking_script.parent) as proc:
        proc.wait_for("blocking the loop")
        proc.send(signal.SIGTERM)
        assert proc.exit_code(timeout=0.2 + FORCE_MARGIN + 5.0) == 128 + signal.SIGTERM
        out = proc.output
    assert f"blocked: still not stopped {0.2 + FORCE_MARGIN:g}s after SIGTERM" in out
    assert "in http_service\n    time.sleep(0.05)  # the bug" in out


def test_ctrl_c_under_plain_asyncio_run_still_stops_every_service(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            import offloop

            sv = offloop.Supervisor(name="plain")

            @sv.service
            def worker(token):
                print("worker running", flush=True)
                token.wait()
                print("worker got its token", flush=True)

            try:
                asyncio.run(sv.serve())
            except KeyboardInterrupt:
                print("KeyboardInterrupt after", sv.state, sv.status()["worker"].state, flush=True)
            """
        )
    )
    with Proc([str(script)], tmp_path) as proc:
        proc.wait_for("worker running")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
    assert "worker got its token" in proc.output
    assert "KeyboardInterrupt after stopped stopped" in proc.output


def test_run_raises_service_failed_out_of_the_script(tmp_path: Path) -> None:
    script = tmp_path / "failing.py"
    script.write_text(
        textwrap.dedent(
            """
            import offloop

            sv = offloop.Supervisor(name="failing")

            @sv.service
            def config_loader():
                raise KeyError("DATABASE_URL")

            sv.run()
            """
        )
    )
    with Proc([str(script)], tmp_path) as proc:
        assert proc.exit_code() == 1
    out = proc.output
    assert "KeyError: 'DATABASE_URL'" in out
    assert "The above exception was the direct cause of the following exception" in out
    # At once, within its start-up window: a start-up error, not retried.
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        r"offloop\.ServiceFailed: Service 'config_loader' failed: it crashed \d+\.\d\ds after "
        r"it started, within its startup_window=1s, so it failed to start, which is not "
        r"retried; .*; last error: KeyError\('DATABASE_URL'\)\.",
        last,
    ), last
    assert "restarting service" not in out


EXECUTOR = """
import asyncio
import contextvars
import logging
import threading

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=0.3, name="executor")
var = contextvars.ContextVar("var")


def stuck_client_call():
    print("the stuck call started", flush=True)
    threading.Event().wait()  # a blocking call without a timeout


@sv.service
async def poller():
    var.set("from the task")
    assert await asyncio.to_thread(var.get) == "from the task"
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, int, "not a number")
    except ValueError:
        print("the default executor works", flush=True)
    await asyncio.to_thread(stuck_client_call)


print(f"run() returned {sv.run()}", flush=True)
"""


def test_a_call_stuck_in_the_default_executor_does_not_keep_the_process_alive(
    tmp_path: Path,
) -> None:
    # asyncio.to_thread() and run_in_executor(None, ...) in a service: asyncio's
    # executor threads are joined at exit, so run() returned and the process
    # then hung until the stuck call returned (here: never).
    script = tmp_path / "executor.py"
    script.write_text(textwrap.dedent(EXECUTOR))
    with Proc([str(script)], tmp_path) as proc:
        proc.wait_for("the default executor works")
        proc.wait_for("executor: all 1 service")
        # Not before: a stop that came first would leave nothing stuck.
        proc.wait_for("the stuck call started")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
        out = proc.output
    assert "run() returned 0" in out
    assert (
        "function 'stuck_client_call' in thread offloop-executor-1 of pool 'executor' is still "
        "running after waiting 0.1 s in close() and was abandoned" in out
    )


STUCK_STDERR = """
import asyncio
import fcntl
import logging
import os
import sys

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=float(sys.argv[1]), name="stuck")


def fill_stderr():
    # Its reader never reads: from now on every write to stderr blocks.
    flags = fcntl.fcntl(2, fcntl.F_GETFL)
    fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(2, b"x" * 65536)
    except BlockingIOError:
        pass
    finally:
        fcntl.fcntl(2, fcntl.F_SETFL, flags)


@sv.service
async def bot():
    await asyncio.sleep(0.05)  # after the start-up lines
    fill_stderr()
    print("stderr is full", flush=True)
    await asyncio.sleep(3600)


sv.run()
"""


def test_one_signal_ends_the_process_in_bounded_time_even_when_stderr_blocks(
    tmp_path: Path,
) -> None:
    # A log reader that stopped reading (a full pipe) blocks every log call:
    # the graceful stop cannot finish, so only the watchdog's timer can end the
    # process, and neither arming it nor the forced exit may wait for a log line.
    from offloop._supervisor.signals import FORCE_MARGIN

    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(STUCK_STDERR))
    grace = 0.3
    child = subprocess.Popen(
        [sys.executable, str(script), str(grace)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: "stderr is full\n" in lines, WAIT, "the child to fill its stderr")
        child.send_signal(signal.SIGINT)
        # The documented bound (grace + FORCE_MARGIN), plus slack for a loaded machine.
        try:
            code = child.wait(grace + FORCE_MARGIN + 3.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"one SIGINT did not end the process within {grace + FORCE_MARGIN + 3.0}s")
        assert code == 128 + signal.SIGINT
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT)
        reader.join(WAIT)
        for stream in (child.stdout, child.stderr):
            assert stream is not None
            stream.close()


STUBBORN = """
import asyncio
import logging
import sys
import time

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=float(sys.argv[1]), name="stubborn")
began = []


@sv.service
async def stubborn():
    print("stubborn running", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # swallowed, every time
            if not began:
                began.append(time.monotonic())  # the stop has begun


code = sv.run()
print(f"run() returned {code} after {time.monotonic() - began[0]:.3f}s", flush=True)
"""


def test_run_returns_within_grace_plus_the_overrun_with_a_task_that_ignores_cancellation(
    tmp_path: Path,
) -> None:
    # The documented bound: the shutdown overruns grace by SHUTDOWN_OVERRUN at
    # most, and run()'s wait for the tasks left on its loop is part of it.
    from offloop._supervisor.supervised import SHUTDOWN_OVERRUN

    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(STUBBORN))
    grace = 0.5
    with Proc([str(script), str(grace)], tmp_path) as proc:
        proc.wait_for("stubborn: all 1 service")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
        took = float(proc.wait_for(r"run\(\) returned 0 after ([\d.]+)s").group(1))
        out = proc.output
    # Measured in the child from the first cancellation; 0.3 s of slack for a loaded machine.
    assert took < grace + SHUTDOWN_OVERRUN + 0.3, out
    assert "stubborn: service 'stubborn' abandoned task 'offloop-service-stubborn'" in out

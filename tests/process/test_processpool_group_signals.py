"""Process workers and signals sent to the whole process group (systemd, an init, Ctrl-C).

The program runs in a session of its own; the test signals its group with
``os.killpg`` once a worker is known to be running a call, as systemd's
``KillMode=control-group`` or ``kill -TERM -- -PGID`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import offloop
from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import Proc, gone, wait_until

SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, os, pathlib, sys, time
    import offloop

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sv = offloop.Supervisor(grace=30, name="script")

    def work():
        # Written whole, then renamed into place: the test signals the group
        # the moment the file exists.
        pathlib.Path("worker.pid.tmp").write_text(str(os.getpid()))
        os.replace("worker.pid.tmp", "worker.pid")
        deadline = time.monotonic() + 30
        while not os.path.exists("gate"):
            if time.monotonic() > deadline:
                raise TimeoutError("the test never created the file 'gate'")
            time.sleep(0.002)
        return "finished"

    @sv.service
    async def bot():
        call = offloop.to_process(work)
        if sys.argv[1] == "cancel":
            await call  # the stop cancels it: abandoned, the worker is killed at exit
            return
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            # A graceful stop that lets the running call finish.
            print(f"call {await call}", flush=True)
            raise

    if __name__ == "__main__":
        code = sv.run()
        print(f"run() returned {code}", flush=True)
        sys.exit(code)
    """
)


def _run_and_signal_group(tmp_path: Path, mode: str, sig: signal.Signals) -> tuple[str, int]:
    """Run the script, signal its group while ``work`` runs; its output and the worker's pid."""
    script = tmp_path / "group.py"
    script.write_text(SCRIPT)
    pid_file = tmp_path / "worker.pid"
    with Proc([str(script), mode], tmp_path, new_session=True) as proc:
        wait_until(pid_file.exists, WAIT, "the worker to start the call")
        worker = int(pid_file.read_text())
        os.killpg(proc.popen.pid, sig)
        proc.wait_for(f"received {sig.name}, stopping gracefully")
        # killpg() makes the signal pending in every process of the group at
        # once: the parent has handled it, so the worker has it too.
        (tmp_path / "gate").touch()
        code = proc.exit_code()
        out = proc.output
    assert code == 0, out
    # A worker that outlived its program would be in the group still.
    wait_until(lambda: gone(worker), WAIT, f"the worker (pid {worker}) to exit")
    return out, worker


def test_group_sigterm_leaves_the_running_call_to_the_parent(tmp_path: Path) -> None:
    out, _ = _run_and_signal_group(tmp_path, "finish", signal.SIGTERM)
    assert "call finished" in out
    assert "WorkerCrashed" not in out
    assert out.endswith("run() returned 0")


def test_group_sigint_leaves_the_running_call_to_the_parent(tmp_path: Path) -> None:
    out, _ = _run_and_signal_group(tmp_path, "finish", signal.SIGINT)
    assert "call finished" in out
    assert "WorkerCrashed" not in out


def test_group_sigterm_stops_a_supervisor_whose_service_awaits_a_call(tmp_path: Path) -> None:
    out, _ = _run_and_signal_group(tmp_path, "cancel", signal.SIGTERM)
    assert "ERROR" not in out
    assert "WorkerCrashed" not in out
    assert "INFO script: service 'bot' stopped" in out
    assert out.endswith("run() returned 0")


def _child_signals() -> str:
    # A program the worker starts: SIGTERM and Ctrl-C must stop it as usual.
    # (Python installs its KeyboardInterrupt handler unless SIGINT came ignored.)
    code = (
        "import signal; h = signal.getsignal; "
        "print(h(signal.SIGTERM).name, getattr(h(signal.SIGINT), '__name__', h(signal.SIGINT)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    return done.stdout.strip()


async def test_programs_a_worker_starts_keep_the_default_signal_handling() -> None:
    async with offloop.ProcessPool(1) as pool:
        assert await pool.run(_child_signals) == "SIG_DFL default_int_handler"

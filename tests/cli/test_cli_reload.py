"""offloop run --reload: a real child process, restarted when a real source file changes."""

from __future__ import annotations

import re
import signal
import textwrap
import time
from pathlib import Path

import pytest

from offloop._cli.main import build_parser
from offloop._cli.reload import child_argv
from tests.helpers import SPAWN_WAIT, Proc, gone, wait_until

APP = """
import os
import offloop

sv = offloop.Supervisor(name="app", grace=2)

@sv.service
def main(token):
    # One write: a log line from another thread may come between two.
    print(f"{version} running in pid {os.getpid()}", flush=True)
    token.wait()
    print("{version} stopped by its token", flush=True)
"""


def write(folder: Path, version: str, text: str = APP) -> None:
    path = folder / "app.py"
    path.write_text(textwrap.dedent(text.replace("{version}", version)))


def pid_of(proc: Proc, version: str) -> int:
    return int(proc.wait_for(rf"^{version} running in pid (\d+)").group(1))


def test_changes_restart_the_program_and_broken_code_waits_for_the_fix(tmp_path: Path) -> None:
    write(tmp_path, "v1")
    with Proc(["-m", "offloop", "run", "app:sv", "--reload", "--plain"], tmp_path) as proc:
        first = pid_of(proc, "v1")
        proc.wait_for("watching .* for changes")
        # A burst of saves (an editor's temporary files, a checkout): one restart.
        for n in range(5):
            (tmp_path / f"helper{n}.py").write_text("x = 1\n")
        write(tmp_path, "v2")
        second = pid_of(proc, "v2")
        # The old program got the supervisor's graceful stop, and is gone.
        proc.wait_for("v1 stopped by its token")
        assert first != second
        assert gone(first)
        # Broken code: its error is shown, the reloader keeps watching.
        (tmp_path / "app.py").write_text("def broken(:\n")
        proc.wait_for("SyntaxError")
        proc.wait_for("the program exited with code 1; fix the error")
        assert proc.popen.poll() is None
        write(tmp_path, "v3")
        third = pid_of(proc, "v3")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
        proc.wait_for("v3 stopped by its token")
        assert gone(third)
    # v1 -> v2, v2 -> broken, broken -> v3.
    assert proc.output.count("restarting the program") == 3
    assert re.search(r"changed: app\.py, helper0\.py, .*helper4\.py; restarting", proc.output)
    assert gone(second)  # every program stopped (the leak check covers the rest)


def test_the_child_gets_the_arguments_without_the_reloaders_own() -> None:
    argv = ["run", "app:sv", "--reload", "--reload-dir", "src", "--plain", "--reload-dir=lib"]
    assert child_argv(argv) == ["run", "app:sv", "--plain"]


@pytest.mark.parametrize(
    "given",
    [
        ["--reload", "--reload-d", "src"],
        ["--reload", "--reload-", "src"],
        ["--reload", "--reload-di=src"],
        ["--reload-dir", "src", "--reload"],
    ],
)
def test_the_child_gets_no_reload_option_however_argparse_let_it_be_spelled(
    given: list[str],
) -> None:
    # argparse takes any unique prefix of --reload-dir, and a child run without
    # --reload refuses any --reload-dir ("--reload-dir needs --reload"), so no
    # spelling of it may reach the child.
    argv = ["run", "app:sv", *given, "--plain"]
    parsed = build_parser().parse_args(argv)
    assert (parsed.reload, parsed.reload_dir) == (True, ["src"])
    child = build_parser().parse_args(child_argv(argv))
    assert (child.target, child.reload, child.reload_dir, child.plain) == (
        "app:sv",
        False,
        None,
        True,
    )


def test_reload_dir_must_exist(tmp_path: Path) -> None:
    write(tmp_path, "v1")
    started = time.monotonic()
    with Proc(
        ["-m", "offloop", "run", "app:sv", "--reload", "--reload-dir", "nowhere"], tmp_path
    ) as proc:
        assert proc.exit_code(SPAWN_WAIT) == 2
    assert "--reload-dir" in proc.output
    assert "nowhere is not a directory" in proc.output
    assert "v1 running" not in proc.output
    assert time.monotonic() - started < SPAWN_WAIT


def test_the_program_stops_gracefully_when_the_reloader_is_killed(tmp_path: Path) -> None:
    write(tmp_path, "v1")
    with Proc(["-m", "offloop", "run", "app:sv", "--reload"], tmp_path) as proc:
        child = pid_of(proc, "v1")
        proc.popen.kill()  # SIGKILL: the reloader cannot stop its child itself
        proc.exit_code()
        wait_until(lambda: gone(child), SPAWN_WAIT, "the orphaned program to stop")
    assert "v1 stopped by its token" in proc.output


def test_a_program_that_ends_by_itself_is_not_reported_as_an_error(tmp_path: Path) -> None:
    done = """
import offloop

sv = offloop.Supervisor(name="app", grace=2)

@sv.service
def once():
    print("{version} did its job", flush=True)
"""
    write(tmp_path, "v1", done)
    with Proc(["-m", "offloop", "run", "app:sv", "--reload", "--plain"], tmp_path) as proc:
        proc.wait_for("v1 did its job")
        proc.wait_for("the program ended with exit code 0")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
    assert "fix the error" not in proc.output

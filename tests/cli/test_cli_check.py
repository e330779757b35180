"""``python -m offloop check``: real subprocesses running small scripts from tmp_path."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import IO

import pytest

from offloop._cli.check import BLOCKED_EXIT_CODE, render_report
from offloop._cli.main import build_parser
from tests.helpers import line_of

TIMEOUT = 60


def check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offloop", "check", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def test_check_names_the_blocking_line_and_fails_the_run(tmp_path: Path) -> None:
    app = write(
        tmp_path / "app.py",
        """\
        import asyncio
        import time


        async def handler():
            time.sleep(0.3)  # BLOCK


        async def main():
            await handler()
            await asyncio.sleep(0)


        asyncio.run(main())
        """,
    )
    proc = check(tmp_path, "--threshold", "0.05", app.name)
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(n for n, text in enumerate(lines) if text.startswith("path:line"))
    assert header > 0
    assert "over 50 ms at 1 site(s)" in lines[0]
    assert lines[header].split() == ["path:line", "function", "count", "total", "ms", "max", "ms"]
    row = lines[header + 1].split()
    assert row[:2] == [f"app.py:{line_of('BLOCK', app)}", "handler"]
    assert int(row[2]) >= 1


def test_json_report_shows_the_helper_module_and_the_chain(tmp_path: Path) -> None:
    helpers = write(
        tmp_path / "helpers.py",
        """\
        import time


        def load_settings():
            time.sleep(0.3)  # BLOCK
        """,
    )
    app = write(
        tmp_path / "app.py",
        """\
        import asyncio

        import helpers  # found next to the script, as with 'python app.py'


        async def main():
            helpers.load_settings()  # CALL
            await asyncio.sleep(0)


        asyncio.run(main())  # RUN
        """,
    )
    proc = check(tmp_path, "--json", "--threshold", "0.05", "app.py")
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_code"] == BLOCKED_EXIT_CODE  # what the process exits with
    assert report["script_exit_code"] == 0
    assert report["threshold"] == 0.05
    assert report["loops"] == 1
    (site,) = report["sites"]
    assert set(site) == {"file", "line", "function", "count", "total_ms", "max_ms", "stack"}
    assert (site["file"], site["line"], site["function"]) == (
        str(helpers),
        line_of("BLOCK", helpers),
        "load_settings",
    )
    assert site["count"] >= 1
    assert site["total_ms"] >= site["max_ms"] > 0
    # The stack starts at the script (offloop's and runpy's frames are trimmed)
    # and shows the chain down to the helper.
    stack = [entry.split(" in ")[0] for entry in site["stack"]]
    assert stack[0] == f"{app}:{line_of('RUN', app)}"
    assert stack[-2:] == [f"{app}:{line_of('CALL', app)}", f"{helpers}:{line_of('BLOCK', helpers)}"]


def test_a_clean_script_reports_nothing_and_keeps_its_exit_code_and_args(tmp_path: Path) -> None:
    write(
        tmp_path / "clean.py",
        """\
        import asyncio
        import sys
        import time


        async def main():
            await asyncio.to_thread(time.sleep, 0.3)
            print("argv", sys.argv[1:], flush=True)


        if __name__ == "__main__":  # run as the main program, like python script.py
            asyncio.run(main())
            sys.exit(int(sys.argv[1]))
        print("imported instead of run: __name__ is", __name__)
        """,
    )
    proc = check(tmp_path, "clean.py", "0", "--json")  # options after the script are its own
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "argv ['0', '--json']",
        "offloop check: no event loop blocked for more than 100 ms (1 event loop(s) watched).",
    ]
    out = tmp_path / "report.json"
    proc = check(tmp_path, "--json", "-o", str(out), "clean.py", "5")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "argv ['5']\n"
    assert json.loads(out.read_text())["sites"] == []


def test_uvloop_and_a_loop_in_another_thread_are_both_watched(tmp_path: Path) -> None:
    app = write(
        tmp_path / "loops.py",
        """\
        import asyncio
        import threading
        import time

        import uvloop


        async def worker():
            time.sleep(0.3)  # WORKER


        async def main():
            end = time.monotonic() + 0.3
            sum(1 for _ in iter(lambda: time.monotonic() < end, False))  # MAIN


        thread = threading.Thread(target=lambda: asyncio.run(worker()))
        thread.start()
        uvloop.run(main())
        thread.join()
        """,
    )
    proc = check(tmp_path, "--json", "--threshold", "0.05", "loops.py")
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loops"] == 2
    assert sorted(s["line"] for s in report["sites"]) == sorted(
        [line_of("WORKER", app), line_of("MAIN", app)]
    )


def test_a_failing_script_shows_its_traceback_and_exit_code(tmp_path: Path) -> None:
    write(
        tmp_path / "broken.py",
        """\
        import asyncio


        async def main():
            raise ValueError("no such table: users")


        asyncio.run(main())
        """,
    )
    proc = check(tmp_path, "broken.py")
    assert proc.returncode == 1
    assert "ValueError: no such table: users" in proc.stderr
    assert 'broken.py", line 8, in <module>' in proc.stderr
    assert "runpy" not in proc.stderr  # the traceback starts at the script
    assert "no event loop blocked" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "0", "x.py"], "--threshold must be between 0.01 and 86400 seconds, got 0"),
        (
            ["--threshold", "-1", "x.py"],
            "got -1; below 0.01 s even an idle loop looks blocked. "
            "Pass for example --threshold 0.1 (the default).",
        ),
        (["--threshold", "nan", "x.py"], "--threshold must be between 0.01 and 86400 seconds"),
        (["missing.py"], "there is no file 'missing.py'"),
        # A Supervisor's MODULE:ATTR, as offloop run takes it: say which command does that.
        (
            ["app:sv"],
            "there is no file 'app:sv' (from {tmp_path}); offloop check runs a Python script. "
            "To watch the Supervisor 'app:sv' for blocks, run: offloop run app:sv "
            "--detect-blocking",
        ),
        (["--threshold", "1e300", "x.py"], "--threshold must be between 0.01 and 86400 seconds"),
        (["--threshold", "0.001", "x.py"], "--threshold must be between 0.01 and 86400 seconds"),
    ],
)
def test_bad_command_lines_exit_2_with_a_message(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from offloop._cli.main import main

    (tmp_path / "x.py").write_text("")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["check", *args]) == 2
    finally:
        os.chdir(cwd)
    assert message.format(tmp_path=tmp_path) in capsys.readouterr().err


def test_check_is_listed_in_the_help() -> None:
    assert "check" in build_parser().format_help()


@pytest.mark.parametrize("output", ["missing-dir/report.txt", "."], ids=["no-dir", "a-dir"])
def test_an_unwritable_output_is_refused_before_the_script_runs(
    tmp_path: Path, output: str
) -> None:
    script = write(tmp_path / "app.py", 'open("ran", "w").close()\n')
    result = check(tmp_path, "-o", output, str(script))
    assert result.returncode == 2
    assert result.stderr.startswith(f"offloop check: error: cannot write the report to {output!r}")
    assert "Pass the path of a file in an existing directory to --output." in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()  # refused up front, not after running it


def test_loops_in_threads_that_outlive_the_script_are_watched(tmp_path: Path) -> None:
    app = write(
        tmp_path / "background.py",
        """\
        import asyncio
        import concurrent.futures
        import threading
        import time

        module_done = threading.Event()


        async def worker():
            time.sleep(0.5)  # BLOCK
            print("worker done", flush=True)


        def run():
            # Only once the module has returned: `python background.py` waits
            # for this thread, and so must offloop check.
            assert module_done.wait(30)
            asyncio.run(worker())


        threading.Thread(target=run).start()
        # An executor never shut down: its idle worker must not be waited for
        # forever (the interpreter tells it to exit first).
        concurrent.futures.ThreadPoolExecutor(1).submit(print, "executor ran", flush=True).result()
        module_done.set()
        """,
    )
    proc = check(tmp_path, "--json", "--threshold", "0.05", app.name)
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    head, _, document = proc.stdout.partition("worker done\n")
    assert head == "executor ran\n"
    report = json.loads(document)
    assert report["loops"] == 1
    assert [(s["line"], s["function"]) for s in report["sites"]] == [
        (line_of("BLOCK", app), "worker")
    ]


def test_a_script_that_changes_directory_keeps_its_report_and_paths(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    app = write(
        tmp_path / "daemon.py",
        """\
        import asyncio
        import os
        import time

        os.chdir("elsewhere")  # as daemons and some servers do


        async def main():
            time.sleep(0.5)  # BLOCK


        asyncio.run(main())  # RUN
        """,
    )
    proc = check(tmp_path, "--stacks", "--threshold", "0.05", "-o", "report.txt", app.name)
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    assert not (tmp_path / "elsewhere" / "report.txt").exists()
    lines = (tmp_path / "report.txt").read_text().splitlines()
    at = f"daemon.py:{line_of('BLOCK', app)}"
    assert any(text.split()[:2] == [at, "main"] for text in lines), lines
    # The stack is trimmed to start at the script, as without the chdir.
    header = lines.index(f"Stack of the longest block at {at} (most recent call last):")
    assert lines[header + 1].startswith(f"  {app}:{line_of('RUN', app)} in <module>")


def test_a_read_only_directory_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offloop._cli.check import _unwritable

    real_access = os.access
    # Root may write anywhere: make the directory read-only in the eyes of os.access.
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )
    assert (
        _unwritable(str(tmp_path / "r.txt")) == f"the directory {str(tmp_path)!r} is not writable"
    )


def test_a_report_that_cannot_be_written_after_the_run_is_printed_instead(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write(
        tmp_path / "app.py",
        f"""\
        import shutil
        shutil.rmtree({str(out)!r})  # the report's directory is gone by the end
        """,
    )
    result = check(tmp_path, "-o", str(out / "report.txt"), str(script))
    assert result.returncode == 2
    assert "no event loop blocked" in result.stdout  # the report, not lost
    assert "it was printed above instead" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wait_for_the_script_s_threads_says_what_it_waits_for(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    app = write(
        tmp_path / "lingers.py",
        f"""\
        import os
        import threading
        import time


        def linger():
            deadline = time.monotonic() + 30
            while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
                time.sleep(0.01)


        threading.Thread(target=linger, name="gatekeeper").start()
        """,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read_errors(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)

    with subprocess.Popen(
        [sys.executable, "-m", "offloop", "check", app.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as proc:
        assert proc.stderr is not None
        assert proc.stdout is not None
        reader = threading.Thread(target=read_errors, args=(proc.stderr,), name="test-stderr")
        reader.start()
        try:
            notice = lines.get(timeout=TIMEOUT)  # it says so instead of looking hung
            assert "waiting for its thread(s) 'gatekeeper' to end, as Python would" in notice
            gate.touch()
            assert proc.wait(TIMEOUT) == 0
            assert "no event loop blocked" in proc.stdout.read()
        finally:
            gate.touch()
            proc.kill()
            reader.join(TIMEOUT)


UNTIL_SIGNALLED = {
    # No handler of its own: SIGTERM would end the interpreter on the spot.
    "plain": """\
        import asyncio
        import time


        async def main():
            time.sleep(0.3)  # BLOCK
            print("serving", flush=True)
            await asyncio.sleep(3600)


        asyncio.run(main())
        """,
    # uvicorn catches SIGINT/SIGTERM, shuts down, then raises the signal again
    # with the handlers it found restored.
    "uvicorn": """\
        import asyncio
        import time

        import uvicorn


        async def app(scope, receive, send):
            pass


        async def main():
            time.sleep(0.3)  # BLOCK
            server = uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="error")
            )
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            print("serving", flush=True)
            await serving


        asyncio.run(main())
        """,
}


@pytest.mark.parametrize("kind", sorted(UNTIL_SIGNALLED))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_script_ended_by_a_signal_still_gets_its_report(
    tmp_path: Path, kind: str, sig: signal.Signals
) -> None:
    app = write(tmp_path / "app.py", UNTIL_SIGNALLED[kind])
    report = tmp_path / "report.json"
    options = ["--json", "--threshold", "0.05", "-o", str(report)]
    with subprocess.Popen(
        [sys.executable, "-m", "offloop", "check", *options, app.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "serving\n"  # bounded by the test's timeout
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
    assert proc.returncode == BLOCKED_EXIT_CODE, err
    document = json.loads(report.read_text())
    assert document["exit_code"] == BLOCKED_EXIT_CODE  # what the process exited with
    assert document["script_exit_code"] == 128 + sig  # what the signal made of the script
    # uvicorn's own start-up (it imports its protocol modules on the loop) may
    # block too, on a loaded machine: only the script's block must be there.
    sites = [(s["file"], s["line"]) for s in document["sites"]]
    assert (str(app), line_of("BLOCK", app)) in sites, sites


def test_a_script_that_starts_no_loop_is_told_why_nothing_was_watched() -> None:
    # A module that only defines a Supervisor (for 'offloop run app:sv') runs nothing.
    assert render_report([], 0.1, 0) == (
        "offloop check: no event loop blocked for more than 100 ms (0 event loop(s) watched).\n"
        "The script started no event loop, so there was nothing to watch. If it only "
        "defines a Supervisor for 'offloop run app:sv', check that with "
        "'offloop run app:sv --detect-blocking', or call sv.run() under "
        "'if __name__ == \"__main__\":'.\n"
    )
    assert "started no event loop" not in render_report([], 0.1, 1)


@pytest.mark.parametrize("stdout", ["closed", "broken pipe"])
def test_the_report_reaches_stderr_when_stdout_cannot_take_it(tmp_path: Path, stdout: str) -> None:
    # `offloop check app.py >&-` (sys.stdout is None) or `| head -0` (the
    # reader went away): the verdict still comes back as the exit code, and
    # the report goes to stderr instead of ending in a traceback.
    app = write(
        tmp_path / "app.py",
        """\
        import asyncio
        import time


        async def main():
            time.sleep(0.2)  # BLOCK


        asyncio.run(main())
        """,
    )
    command = f"{sys.executable} -m offloop check --threshold 0.05 {app.name}"
    shell = (
        f"exec {command} >&-"
        if stdout == "closed"
        else f"{command} | true; exit ${{PIPESTATUS[0]}}"
    )
    proc = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path
    )
    assert proc.returncode == BLOCKED_EXIT_CODE, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"app.py:{line_of('BLOCK', app)}" in proc.stderr, proc.stderr

"""``offloop run``: what it tells a user who wrote a file path, or whose Ctrl-C is ignored."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from offloop._cli.main import main as cli_main
from offloop._cli.run import TargetError, load_supervisor
from tests.helpers import WAIT, Proc

APP = """
import offloop

print("app imported", flush=True)
sv = offloop.Supervisor(grace=2, name="app")


@sv.service
def worker(token):
    token.wait()
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "usage_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "usage_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "usage_app.py:sv",
            "MODULE is a module name, not a file: got 'usage_app.py'. Write "
            "'usage_app:sv' (the module is imported as 'import usage_app' would).",
        ),
        (
            f"sub{os.sep}usage_app.py:sv",
            f"MODULE is a module name, not a file: got 'sub{os.sep}usage_app.py'. Run "
            f"'offloop run usage_app:sv' from the folder 'sub' (or write 'sub.usage_app:sv' if "
            f"'sub' is a package).",
        ),
    ],
)
def test_a_file_path_as_module_says_what_to_write_instead(
    app_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    message: str,
) -> None:
    monkeypatch.chdir(app_dir)
    monkeypatch.syspath_prepend(str(app_dir))
    monkeypatch.delitem(sys.modules, "usage_app", raising=False)
    with pytest.raises(TargetError) as info:
        load_supervisor(target)
    assert str(info.value) == message
    assert cli_main(["run", target]) == 2
    assert capsys.readouterr() == ("", f"offloop run: error: {message}\n")
    # Refused before importing anything: the file's code never ran.
    assert "usage_app" not in sys.modules


def test_an_ignored_sigint_is_logged_with_the_signal_that_works(app_dir: Path) -> None:
    # As a background job of a non-interactive shell starts it: SIGINT ignored.
    args = ["-m", "offloop", "run", "usage_app:sv", "--plain"]
    with Proc(args, app_dir, ignore_sigint=True) as proc:
        proc.wait_for("all 1 service")
        proc.send(signal.SIGINT)  # ignored, as the parent meant
        proc.send(signal.SIGTERM)
        assert proc.exit_code() == 0
        out = proc.output
    pid = proc.popen.pid
    assert (
        f"app: SIGINT is ignored: this process started with it ignored (a background job of "
        f"a shell, nohup), so Ctrl-C and 'kill -INT' do nothing. Stop it with SIGTERM "
        f"('kill {pid}')." in out
    )
    assert "received SIGTERM, stopping gracefully" in out
    assert "received SIGINT" not in out


@pytest.mark.parametrize(
    ("ignored", "says"),
    [
        ([signal.SIGTERM], "app: SIGTERM is ignored: this process started with it ignored"),
        ([signal.SIGTERM], "Stop it with SIGINT (Ctrl-C, or 'kill -INT {pid}')."),
        ([signal.SIGINT, signal.SIGTERM], "app: SIGINT and SIGTERM are ignored"),
        ([signal.SIGINT, signal.SIGTERM], "only stop() or SIGKILL ('kill -KILL {pid}', which"),
    ],
)
def test_every_combination_of_ignored_signals_names_what_still_works(
    caplog: pytest.LogCaptureFixture, ignored: list[signal.Signals], says: str
) -> None:
    from offloop._supervisor.signals import _say_which_signals_are_ignored

    with caplog.at_level("WARNING", logger="offloop.supervisor"):
        _say_which_signals_are_ignored("app", ignored)
        _say_which_signals_are_ignored("app", [])  # nothing ignored: nothing said
    (record,) = caplog.records
    assert says.format(pid=os.getpid()) in record.getMessage()


RUNS_AT_IMPORT = """
import pathlib

import offloop

sv = offloop.Supervisor(grace=1, name="app")


@sv.service
async def bot():
    pathlib.Path("ran.txt").write_text("the program ran")
    sv.stop()


sv.run()  # at the top level, as a script would: importing the module runs it
"""

STARTS_AT_IMPORT = """
import asyncio
import pathlib

import offloop

sv = offloop.Supervisor(grace=1, name="app")


@sv.service
async def bot():
    pathlib.Path("ran.txt").write_text("the program ran")


async def main():
    async with sv:
        sv.stop()


asyncio.run(main())  # the same, with the supervisor entered in the module's own loop
"""


@pytest.mark.parametrize(
    ("source", "call"),
    [(RUNS_AT_IMPORT, r"\.run\(\)"), (STARTS_AT_IMPORT, "Starting <Supervisor 'app'")],
    ids=["run", "async-with"],
)
def test_a_module_that_runs_its_supervisor_when_imported_is_refused_before_it_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    call: str,
) -> None:
    (tmp_path / "runs_app.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    message = (
        rf"{call}.* was called while 'offloop run runs_app:sv' imported the module "
        r"'runs_app' to find its supervisor: the module starts it when it is imported "
        r"\(sv.run\(\) or asyncio.run\(...\) at its top level\). Put that call under "
        r"'if __name__ == \"__main__\":' so that 'python runs_app.py' still runs it and "
        r"'offloop run runs_app:sv' can.$"
    )
    with pytest.raises(TargetError, match=message):
        load_supervisor("runs_app:sv")
    # Refused as it started: no service ran inside the import.
    assert not (tmp_path / "ran.txt").exists()
    assert "runs_app" not in sys.modules  # a failed import leaves nothing: imported afresh
    assert cli_main(["run", "runs_app:sv", "--plain"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"offloop run: error: .*" + message, err, re.MULTILINE), err
    assert not (tmp_path / "ran.txt").exists()


def test_a_supervisor_started_by_the_import_some_other_way_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A supervisor the module ran in a thread of its own (the import does not
    # start it, so nothing refused it there) has run once it is found.
    (tmp_path / "threaded_app.py").write_text(
        textwrap.dedent(
            """
            import threading

            import offloop

            sv = offloop.Supervisor(grace=1, name="app")


            @sv.service
            async def bot():
                sv.stop()


            thread = threading.Thread(target=lambda: __import__("asyncio").run(sv.serve()))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("threaded_app")
    module.thread.start()
    module.thread.join(WAIT)
    assert not module.thread.is_alive()
    with pytest.raises(TargetError, match=r"already started 'threaded_app:sv'"):
        load_supervisor("threaded_app:sv")


MADE_UNDER_MAIN = """
import offloop

if __name__ == "__main__":
    sv = offloop.Supervisor(name="app")
    sv.run()
"""


def test_a_supervisor_made_under_the_main_guard_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "guarded_app.py").write_text(textwrap.dedent(MADE_UNDER_MAIN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "guarded_app", raising=False)
    with pytest.raises(TargetError) as info:
        load_supervisor("guarded_app:sv")
    assert str(info.value) == (
        "the module 'guarded_app' has no attribute 'sv'. It is made under "
        "'if __name__ == \"__main__\":', which an import skips. Make it at the top level and "
        "keep only sv.run() under the guard."
    )
    # A name the guard does not make gets no such hint.
    with pytest.raises(TargetError) as info:
        load_supervisor("guarded_app:other")
    assert str(info.value) == "the module 'guarded_app' has no attribute 'other'."


WATCHED = """
import offloop

sv = offloop.Supervisor(grace=1, name="app")


@sv.service
async def bot():
    print(f"detector threshold {sv.detector and sv.detector.threshold}", flush=True)
    sv.stop()
"""


@pytest.mark.parametrize(
    ("argv", "threshold"),
    [
        (["--detect-blocking", "watched_app:sv"], "0.1"),
        (["--detect", "watched_app:sv", "--plain"], "0.1"),  # argparse's abbreviation
        (["--detect-blocking", "0.05", "watched_app:sv"], "0.05"),
        (["--detect-blocking=0.05", "watched_app:sv"], "0.05"),
        (["watched_app:sv", "--detect-blocking"], "0.1"),
        (["watched_app:sv", "--detect-blocking", "0.05"], "0.05"),
    ],
)
def test_detect_blocking_takes_its_default_when_the_target_follows_it(
    tmp_path: Path, argv: list[str], threshold: str
) -> None:
    (tmp_path / "watched_app.py").write_text(textwrap.dedent(WATCHED))
    with Proc(["-m", "offloop", "run", *argv], tmp_path) as proc:
        assert proc.exit_code() == 0, proc.output
    assert f"detector threshold {threshold}\n" in proc.output + "\n"


@pytest.mark.parametrize(
    "argv", [["--detect-blocking", "fast", "watched_app:sv"], ["--detect-blocking", "fast"]]
)
def test_a_detect_blocking_value_that_is_neither_seconds_nor_a_target_is_refused(
    tmp_path: Path, argv: list[str]
) -> None:
    (tmp_path / "watched_app.py").write_text(textwrap.dedent(WATCHED))
    with Proc(["-m", "offloop", "run", *argv], tmp_path) as proc:
        assert proc.exit_code() == 2
    assert (
        "offloop run: error: argument --detect-blocking: expected a number of seconds "
        "such as 0.1, got 'fast'" in proc.output
    )
    assert "detector threshold" not in proc.output

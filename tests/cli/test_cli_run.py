"""``python -m offloop run module:attr``: a real subprocess, real HTTP, real signals."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from offloop import Supervisor
from offloop._cli.main import main as cli_main
from offloop._cli.run import TargetError, load_supervisor, render_table
from offloop._supervisor.statusserver import (
    status_json,
)
from tests.helpers import Proc, wait_until

HTTP_TIMEOUT = 5.0

APP = '''
import asyncio
import os

import offloop

sv = offloop.Supervisor(grace=2, name="app")


class Gate(offloop.Service):
    """Ready once the test creates the file 'open'; ends when it creates 'close'."""

    name = "gate"

    async def start(self):
        while not os.path.exists("open"):
            await asyncio.sleep(0.01)
        self._stopped = asyncio.Event()

    async def wait(self):
        while not (self._stopped.is_set() or os.path.exists("close")):
            await asyncio.sleep(0.01)

    async def stop(self):
        self._stopped.set()


@sv.service
async def bot():
    while True:
        await asyncio.sleep(3600)


@sv.service
def worker(token):
    token.wait()
    print("worker saw its token", flush=True)


sv.add(Gate())


def make_failing():
    failing = offloop.Supervisor(name="failing")

    # retry_startup: a crash (not a failure to start) although it comes at once.
    @failing.service(restart="no", retry_startup=True)
    def crash():
        raise RuntimeError("cannot connect to the database")

    return failing


number = 42


class registry:
    main = sv


def make_nothing():
    return None


def make_for(env):
    return sv
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def _get(port: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT)


def test_run_serves_status_and_healthz_and_stops_on_sigint(app_dir: Path) -> None:
    args = ["-m", "offloop", "run", "cli_app:sv", "--status-port", "0"]
    with Proc(args, app_dir) as proc:
        port = int(proc.wait_for(r"status on http://127\.0\.0\.1:(\d+)/status").group(1))
        proc.wait_for("starting service 'gate'")
        # The gate holds the start-up: the supervisor is alive but not ready yet.
        assert _get(port, "/healthz").json() == {"live": True, "state": "starting"}
        unready = _get(port, "/readyz")
        assert unready.status_code == 503
        assert unready.json() == {"ready": False, "state": "starting", "not_ready": ["gate"]}
        starting = _get(port, "/status").json()
        assert starting["services"]["gate"]["state"] == "starting"
        assert starting["services"]["bot"]["state"] == "running"

        (app_dir / "open").touch()
        proc.wait_for("all 3 service")
        ready = _get(port, "/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "state": "running", "not_ready": []}
        status = _get(port, "/status").json()
        assert status["supervisor"] == "app"
        assert status["state"] == "running"
        assert list(status["services"]) == ["bot", "worker", "gate"]
        for name, st in status["services"].items():
            assert st["name"] == name
            assert st["state"] == "running"
            assert st["restarts"] == 0
            assert st["last_error"] is None
        assert _get(port, "/nope").status_code == 404
        post = requests.post(f"http://127.0.0.1:{port}/status", timeout=HTTP_TIMEOUT)
        assert post.status_code == 405

        # A service that ends makes the process unready while the others run on.
        (app_dir / "close").touch()
        proc.wait_for("app: service 'gate' returned; it is stopped")
        ended = _get(port, "/readyz")
        assert ended.status_code == 503
        assert ended.json() == {"ready": False, "state": "running", "not_ready": ["gate"]}
        assert _get(port, "/healthz").status_code == 200  # still live
        assert _get(port, "/status").json()["services"]["gate"]["state"] == "stopped"

        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
        out = proc.output
    assert "offloop.supervisor: app: received SIGINT, stopping gracefully within 2s" in out
    assert "worker saw its token" in out
    assert "app: service 'gate' returned; it is stopped" in out
    assert out.rstrip().endswith("app: stopped")


def test_an_idle_status_client_neither_holds_up_nor_spoils_the_stop(app_dir: Path) -> None:
    # A TCP health check that connects and has sent nothing yet when Ctrl-C
    # comes: its connection is ended with the server. Before, Python 3.11
    # logged its cancelled handler as an asyncio ERROR, and Python >= 3.12
    # waited for it in wait_closed() until the watchdog exited with 130,
    # blaming a blocked event loop.
    args = ["-m", "offloop", "run", "cli_app:sv", "--status-port", "0"]
    with Proc(args, app_dir) as proc:
        port = int(proc.wait_for(r"status on http://127\.0\.0\.1:(\d+)/status").group(1))
        (app_dir / "open").touch()
        proc.wait_for("all 3 service")
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as idle:
            # Accepted in order: once a later client is answered, the idle one is being served.
            assert _get(port, "/healthz").status_code == 200
            proc.send(signal.SIGINT)
            assert proc.exit_code() == 0
            assert idle.recv(1) == b""  # closed without an answer
        out = proc.output
    assert "ERROR" not in out
    assert "Traceback" not in out
    assert out.rstrip().endswith("app: stopped")


DEAF_APP = """
import threading

import offloop

sv = offloop.Supervisor(grace=3600, name="deafapp")


@sv.service
def deaf():
    print("deaf running", flush=True)
    threading.Event().wait()  # ignores its token: only a forced exit ends the run
"""


def test_a_forced_exit_from_the_live_table_shows_the_terminal_cursor_again(
    tmp_path: Path,
) -> None:
    # In a terminal the live table hides the cursor; a second Ctrl-C exits with
    # os._exit, which skipped Live.stop(), so the user's shell had no cursor.
    (tmp_path / "deaf_app.py").write_text(textwrap.dedent(DEAF_APP))
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "offloop", "run", "deaf_app:sv"],
        cwd=tmp_path,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "COLUMNS": "200"},
    )
    os.close(terminal)
    shown = bytearray()
    changed = threading.Condition()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child is gone
                return
            if not chunk:
                return
            with changed:
                shown.extend(chunk)
                changed.notify_all()

    reader = threading.Thread(target=read, name="test-pty-reader")
    reader.start()

    def wait_for(text: bytes) -> None:
        with changed:
            if not changed.wait_for(lambda: text in shown, HTTP_TIMEOUT * 3):
                pytest.fail(f"no {text!r} on the terminal; it shows:\n{bytes(shown)!r}")

    try:
        wait_for(b"deaf running")
        proc.send_signal(signal.SIGINT)
        wait_for(b"stopping gracefully")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(HTTP_TIMEOUT * 3) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(HTTP_TIMEOUT * 3)
        os.close(controller)
    hidden = shown.rfind(b"\x1b[?25l")
    assert hidden >= 0, "the live table never hid the cursor: is rich installed?"
    assert shown.rfind(b"\x1b[?25h") > hidden


def test_the_console_script_imports_the_target_from_the_current_directory(
    app_dir: Path,
) -> None:
    # The `offloop` script's own folder, not the current one, is first on its
    # sys.path: finding cli_app.py proves the CLI adds the current directory.
    script = Path(sys.executable).parent / "offloop"
    assert script.is_file(), "the [project.scripts] entry point is not installed"
    done = subprocess.run(
        [str(script), "run", "cli_app:make_failing"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Service 'crash' failed: it crashed and its policy is restart='no'" in done.stderr


def test_run_calls_a_factory_and_exits_1_when_a_service_fails(app_dir: Path) -> None:
    with Proc(["-m", "offloop", "run", "cli_app:make_failing"], app_dir) as proc:
        assert proc.exit_code() == 1
        out = proc.output
    assert "failing: service 'crash' crashed: RuntimeError('cannot connect to the database')" in out
    assert "Traceback (most recent call last)" in out  # the crash is logged with its traceback
    assert "Service 'crash' failed: it crashed and its policy is restart='no'" in out


def test_second_signal_forces_the_cli_out(app_dir: Path) -> None:
    (app_dir / "stuck.py").write_text(
        textwrap.dedent(
            """
            import threading
            import offloop

            sv = offloop.Supervisor(grace=3600, name="stuck")

            @sv.service
            def deaf():
                threading.Event().wait()
            """
        )
    )
    with Proc(["-m", "offloop", "run", "stuck:sv"], app_dir) as proc:
        proc.wait_for("all 1 service")
        proc.send(signal.SIGINT)
        proc.wait_for("stopping service 'deaf'")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 128 + signal.SIGINT
    assert "received SIGINT again, exiting now" in proc.output


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("cli_app", "expected MODULE:ATTR (e.g. 'app:sv'), got 'cli_app'."),
        ("no_such_module:sv", "could not import the module 'no_such_module': there is no such"),
        ("cli_app:svv", "the module 'cli_app' has no attribute 'svv'. Supervisors in it: sv."),
        ("cli_app:number", "'cli_app:number' is int 42, not an offloop.Supervisor"),
        ("cli_app:make_nothing", "calling it returned NoneType None, not an offloop.Supervisor"),
        (
            "cli_app:make_for",
            "'cli_app:make_for' is function 'make_for', which cannot be called without "
            "arguments (missing a required argument: 'env'). Name an offloop.Supervisor, or a "
            "function that takes no arguments and returns one.",
        ),
        (
            "toolsapp:sv",
            "could not import the module 'toolsapp': it needs the module 'tools' (imported at ",
        ),
    ],
)
def test_bad_targets_are_explained(
    app_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    message: str,
) -> None:
    # Exists, but imports a missing module whose name is a prefix of its own.
    (app_dir / "toolsapp.py").write_text("import tools\n")
    monkeypatch.chdir(app_dir)
    monkeypatch.syspath_prepend(str(app_dir))
    monkeypatch.delitem(sys.modules, "cli_app", raising=False)
    with pytest.raises(TargetError) as info:
        load_supervisor(target)
    assert message in str(info.value)
    # The command line turns it into exit code 2 and one line on stderr.
    assert cli_main(["run", target]) == 2
    assert capsys.readouterr().err == f"offloop run: error: {info.value}\n"
    monkeypatch.delitem(sys.modules, "cli_app", raising=False)


def test_load_supervisor_finds_dotted_attributes(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(app_dir)
    monkeypatch.syspath_prepend(str(app_dir))
    monkeypatch.delitem(sys.modules, "cli_app", raising=False)
    sv = load_supervisor("cli_app:sv")
    assert isinstance(sv, Supervisor)
    assert list(sv.services) == ["bot", "worker", "gate"]
    assert load_supervisor("cli_app:registry.main") is sv
    monkeypatch.delitem(sys.modules, "cli_app", raising=False)


def test_live_table_renders_every_service() -> None:
    from rich.console import Console

    sv = Supervisor(name="tbl")

    @sv.service
    def worker() -> None:
        pass

    @sv.service
    async def bot() -> None:
        pass

    console = Console(record=True, width=100, color_system=None)
    console.print(render_table(sv))
    text = console.export_text()
    assert "tbl (new)" in text
    assert "worker" in text
    assert "bot" in text
    assert text.count("stopped") == 2
    assert status_json(sv) == {
        "supervisor": "tbl",
        "state": "new",
        "services": {
            name: {
                "name": name,
                "state": "stopped",
                "restarts": 0,
                "started_at": None,
                "uptime": None,
                "last_error": None,
                "url": None,
                "dependency_restarts": 0,
                "restarting_with": None,
                "waiting_for": [],
                "killed": False,
            }
            for name in ("worker", "bot")
        },
        "loop_lag": {
            "p50_ms": None,
            "p99_ms": None,
            "max_ms": None,
            "samples": 0,
            "window_s": 60.0,
        },
        "blocks": [],
    }


def test_status_port_in_use_is_refused(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["-m", "offloop", "run", "cli_app:sv", "--status-port", str(port)]
        with Proc(args, app_dir) as proc:
            assert proc.exit_code() == 2
    assert f"offloop run: error: cannot serve the status on 127.0.0.1:{port}" in proc.output
    assert "pick another --status-port" in proc.output
    assert "starting service" not in proc.output  # nothing was started


def _ported_app(folder: Path, port: int) -> None:
    (folder / "ported.py").write_text(
        textwrap.dedent(f"""
            import asyncio

            import offloop

            sv = offloop.Supervisor(grace=1, name="ported", status_port={port})


            @sv.service
            async def idle():
                await asyncio.Event().wait()
        """)
    )


def test_a_status_port_in_the_code_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _ported_app(tmp_path, port)
        with Proc(["-m", "offloop", "run", "ported:sv", "--plain"], tmp_path) as proc:
            assert proc.exit_code() == 2
    assert f"offloop run: error: cannot serve the status on 127.0.0.1:{port}" in proc.output
    assert "pick another status_port in the code, or 0 for any free port" in proc.output
    assert "starting service" not in proc.output


def test_status_port_overrides_the_one_in_the_code(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _ported_app(tmp_path, taken.getsockname()[1])
        args = ["-m", "offloop", "run", "ported:sv", "--plain", "--status-port", "0"]
        with Proc(args, tmp_path) as proc:
            found = proc.wait_for(r"status on http://127\.0\.0\.1:(\d+)/status")
            port = int(found.group(1))
            proc.wait_for("all 1 service")
            assert port != taken.getsockname()[1]
            assert _get(port, "/readyz").status_code == 200
            proc.send(signal.SIGINT)
            assert proc.exit_code() == 0


def test_status_port_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "x:y", "--status-port", "70000"]) == 2
    assert "--status-port must be between 0 and 65535, got 70000" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0.005", "-1", "nan"])
def test_detect_blocking_outside_the_detector_range_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0.005 used to pass here and crash the run when the detector started.
    assert cli_main(["run", "x:y", "--detect-blocking", value]) == 2
    assert "--detect-blocking must be between 0.01 and 86400 seconds" in capsys.readouterr().err


def test_detect_blocking_logs_the_line_that_blocked_the_loop_and_counts_it_in_metrics(
    tmp_path: Path,
) -> None:
    (tmp_path / "hoggy.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import time
            import offloop

            sv = offloop.Supervisor(name="hoggy")

            @sv.service
            async def hog():
                await asyncio.sleep(0)
                time.sleep(0.5)  # the line to name
                print("hog done blocking", flush=True)
                await asyncio.sleep(3600)
            """
        )
    )
    args = ["-m", "offloop", "run", "hoggy:sv", "--detect-blocking", "0.05", "--status-port", "0"]
    with Proc(args, tmp_path) as proc:
        port = int(proc.wait_for(r"status on http://127\.0\.0\.1:(\d+)/status").group(1))
        proc.wait_for("hog done blocking")
        proc.wait_for(r"offloop\.detector")
        # The flag's detector is the supervisor's own: its blocks are in /metrics
        # as they are with Supervisor(detect_blocking=...), not only in /status.
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT).text
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    (sample,) = families["offloop_detector_blocks"].samples
    assert sample.labels["file"].endswith("hoggy.py")
    assert (sample.labels["line"], sample.labels["function"], sample.value) == ("11", "hog", 1)
    assert "hoggy.py:11" in proc.output
    assert "time.sleep(0.5)  # the line to name" in proc.output


def test_many_deaf_services_still_stop_gracefully_with_exit_code_0(app_dir: Path) -> None:
    # Their last chances used to add up past the watchdog's margin: a forced exit, 130.
    (app_dir / "many.py").write_text(
        textwrap.dedent(
            """
            import threading
            import offloop

            sv = offloop.Supervisor(grace=1, name="many")
            for i in range(30):
                def deaf():
                    threading.Event().wait()  # ignores its token

                sv.service(deaf, name=f"deaf{i}")
            """
        )
    )
    with Proc(["-m", "offloop", "run", "many:sv", "--plain"], app_dir) as proc:
        proc.wait_for("all 30 service")
        proc.send(signal.SIGINT)
        assert proc.exit_code() == 0
        out = proc.output
    assert "many: stopped" in out
    assert "still not stopped" not in out


ORPHANS = """
import asyncio
import os
import threading
import time

import offloop

sv = offloop.Supervisor(grace=float(os.environ["GRACE"]), name="orphans")


def child(token):
    print(f"child pid {os.getpid()}", flush=True)
    token.wait()


# Registered first, so stopped last: the shutdown is still busy with the next one.
sv.service(child, isolate="process")


if os.environ["HOW"] == "watchdog":

    @sv.service
    async def hog():
        await asyncio.sleep(0)
        print("blocking the loop", flush=True)
        time.sleep(3600)  # only the watchdog's forced exit ends this

else:

    @sv.service
    def hog():
        threading.Event().wait()  # ignores its token: the shutdown waits out the grace
"""


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["second-signal", "watchdog", "parent-killed"])
def test_a_forced_exit_leaves_no_process_service_child_behind(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    (app_dir / "orphans.py").write_text(textwrap.dedent(ORPHANS))
    monkeypatch.setenv("GRACE", "0.2" if how == "watchdog" else "3600")
    monkeypatch.setenv("HOW", how)
    with Proc(["-m", "offloop", "run", "orphans:sv", "--plain"], app_dir) as proc:
        pid = int(proc.wait_for(r"child pid (\d+)").group(1))
        try:
            proc.wait_for("blocking the loop" if how == "watchdog" else "all 2 service")
            if how == "parent-killed":
                proc.send(signal.SIGKILL)  # no handler runs: only the child can notice
                assert proc.exit_code() == -signal.SIGKILL
            elif how == "second-signal":
                proc.send(signal.SIGINT)
                proc.wait_for("stopping service 'hog'")
                proc.send(signal.SIGINT)
                assert proc.exit_code() == 128 + signal.SIGINT
            else:
                proc.send(signal.SIGINT)
                assert proc.exit_code() == 128 + signal.SIGINT
                assert "still not stopped" in proc.output
            wait_until(lambda: _dead(pid), 10.0, f"the service's child {pid} to die")
        finally:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()  # the old behaviour: do not leak it into other tests

"""``python -m offloop demo``: the chat-bot program of examples/, run as a real subprocess."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import SPAWN_WAIT as WAIT

ROOT = Path(__file__).resolve().parents[2]
# Ctrl-C is promised to stop the demo within a second; 3 s leaves room for a
# loaded machine and still fails a stop that sits out a grace period (5 s).
STOP_BOUND = 3.0


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "offloop", "demo", "--interval", "0.2", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_demo_runs_every_part_and_stops_by_itself() -> None:
    proc = subprocess.run(
        demo_command("--seconds", "3"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env(),
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    urls = re.findall(r"open (http://127\.0\.0\.1:\d+)/", out)
    assert len(urls) == 2  # it tells the user where Flask and aiohttp listen
    # ... and where its probes are, and the bot asks /readyz once.
    probes = re.findall(r"^probes +\| (http://127\.0\.0\.1:\d+)/(\w+)  \(", out, re.M)
    assert [path for _, path in probes] == ["healthz", "readyz", "metrics"]
    base = probes[0][0]
    assert {url for url, _ in probes} == {base}
    assert re.search(rf"^probes +\| GET {base}/readyz -> 200, ready=True$", out, re.M)
    assert re.search(r"^bot +\| tick 2 \(event loop\)$", out, re.M)
    # Both web apps answered the bot's requests, Flask from offloop's request threads.
    assert re.search(
        r"^flask +\| GET .* -> 200, thread='offloop-wsgi-flask-request-\d+'$", out, re.M
    )
    assert re.search(r"^aiohttp +\| GET .* -> 200, files_seen=\d+$", out, re.M)
    # The while-True loop wrote files in its thread and the watcher saw them on the loop.
    assert re.search(r"^loop +\| wrote note-1\.txt \(thread offloop-service-loop\)$", out, re.M)
    assert re.search(r"^watcher +\| saw note-1\.txt created$", out, re.M)
    assert "3 seconds are up: stopping" in out
    # The while-True loop is a periodic service now.
    assert re.search(r"^demo +\| the loop writes a note every 0\.2s \(@sv\.every", out, re.M)
    assert re.search(r"stopped cleanly: bot ticked [1-9]\d* times, [1-9]\d* HTTP requests", out)
    states = re.search(r"final states: (.*)$", out, re.M)
    assert states is not None
    assert set(re.findall(r"=(\w+)", states.group(1))) == {"stopped"}
    # The supervisor told its own story on stderr, through logging.
    assert "service 'flask' is ready" in proc.stderr
    assert "abandoned" not in proc.stderr


def _read_lines(stream: object, lines: queue.Queue[str | None]) -> None:
    assert hasattr(stream, "readline")
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    proc = subprocess.Popen(
        demo_command(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env(),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), name="test-reader")
    reader.start()
    seen: list[str] = []
    probes: dict[str, str] = {}
    try:
        while True:
            line = lines.get(timeout=WAIT)
            assert line is not None, f"the demo ended before it was ready:\n{''.join(seen)}"
            seen.append(line)
            printed = re.match(r"probes +\| (http://127\.0\.0\.1:\d+/(\w+))  \(", line)
            if printed:
                probes[printed.group(2)] = printed.group(1)
            if line.startswith("bot") and "tick 1" in line:  # ready, and ticking
                break
        # The URLs the demo printed answer, from outside the process.
        answers = {path: _fetch(url) for path, url in probes.items()}
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=STOP_BOUND)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(WAIT)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        proc.stderr.close()
        assert proc.stdout is not None
        proc.stdout.close()
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    out = "".join(seen)
    assert code == 0, f"{out}\n{stderr}"
    assert set(answers) == {"healthz", "readyz", "metrics"}, out
    assert answers["healthz"][0] == 200
    assert '"live": true' in answers["healthz"][1]
    assert answers["readyz"][0] == 200
    assert '"ready": true' in answers["readyz"][1]
    assert answers["metrics"][0] == 200
    assert "offloop_service_state{" in answers["metrics"][1]
    assert "received SIGINT, stopping gracefully" in stderr
    assert "stopped cleanly" in out
    assert "abandoned" not in stderr


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=WAIT) as resp:
        return resp.status, resp.read().decode()


def test_a_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    from offloop._cli.demo import load_demo_program

    with pytest.raises(FileNotFoundError, match="or run the demo from a source checkout"):
        load_demo_program(tmp_path / "chatbot.py")


def test_every_missing_extra_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # One install line, not one round trip per package.
    from offloop import MissingExtraError
    from offloop._cli.demo import load_demo_program

    monkeypatch.setitem(sys.modules, "flask", None)  # its import now fails
    monkeypatch.setitem(sys.modules, "watchdog", None)
    with pytest.raises(MissingExtraError) as info:
        load_demo_program()
    assert str(info.value) == (
        "offloop demo needs the packages 'flask' and 'watchdog', which are not installed. "
        "Install them with: pip install 'offloop[flask,watch]'"
    )


def test_without_a_checkout_the_demo_loads_the_installed_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel puts examples/chatbot.py under <data>/share/offloop/examples
    # (pyproject's data-files); the demo falls back to it outside a checkout.
    import sysconfig

    from offloop._cli import demo as _demo

    pyproject = (_demo.DEMO_PROGRAM.parents[1] / "pyproject.toml").read_text()
    assert '"share/offloop/examples" = ["examples/chatbot.py"]' in pyproject
    installed = tmp_path / "share" / "offloop" / "examples" / "chatbot.py"
    installed.parent.mkdir(parents=True)
    installed.write_text(_demo.DEMO_PROGRAM.read_text() + "\nINSTALLED_COPY = True\n")
    monkeypatch.setattr(_demo, "DEMO_PROGRAM", tmp_path / "no-checkout" / "chatbot.py")
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *scheme: str(tmp_path))
    module = _demo.load_demo_program()
    assert module.INSTALLED_COPY is True
    assert callable(module.run)


@pytest.mark.parametrize(
    "args",
    [
        ("--interval", "0"),
        ("--interval", "-1"),
        ("--interval", "nan"),
        ("--seconds", "-1"),
        ("--seconds", "nan"),
        ("--seconds", "inf"),
    ],
    ids=" ".join,
)
def test_bad_durations_are_usage_errors(
    args: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from offloop._cli.main import main

    assert main(["demo", *args]) == 2  # refused before anything starts
    flag, value = args
    assert capsys.readouterr().err == (
        f"offloop demo: error: {flag} must be a positive, finite number of seconds, got "
        f"{float(value)}; for example {flag} 5.\n"
    )

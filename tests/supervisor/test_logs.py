"""Logging set up by sv.run() and --log-format json: one JSON object per line, with events."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop import Supervisor
from offloop._supervisor.logs import EVENTS, make_handler
from tests.helpers import QUICK_WAIT, SPAWN_WAIT, await_until, bounded, run_script

SOURCE = Path(offloop.__file__).parent


def test_every_event_format_is_still_logged_by_offloop() -> None:
    # The JSON fields come from matching log calls' format strings: a message
    # reworded in the code must be reworded in EVENTS too.
    code = "".join(
        "".join(line.strip().strip('"') for line in path.read_text().splitlines())
        for path in SOURCE.rglob("*.py")
        if path.name != "logs.py"
    )
    missing = [fmt for fmt in EVENTS if fmt.replace('"', "") not in code]
    assert missing == []


@bounded(10)
async def test_json_lines_carry_state_changes_crashes_and_restarts() -> None:
    out = io.StringIO()
    handler = make_handler("json", out)
    logger = logging.getLogger("offloop")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    calls: list[int] = []
    sv = Supervisor(name="json")

    @sv.service(backoff=0, max_backoff=0, retry_startup=True)
    async def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("no route")
        await asyncio_forever()

    try:
        async with sv:
            await await_until(lambda: len(calls) == 2, QUICK_WAIT, "the restart")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(obj) for obj in lines)
    services = [(o["service"], o["state"]) for o in lines if o.get("event") == "service"]
    assert services[:2] == [("flaky", "starting"), ("flaky", "running")]
    assert services[-1] == ("flaky", "stopped")
    (crash,) = [o for o in lines if o.get("event") == "crash"]
    assert crash["error"] == "ConnectionError('no route')"
    assert "ConnectionError: no route" in crash["exc_info"]
    assert crash["level"] == "ERROR"
    (restart,) = [o for o in lines if o.get("event") == "restart"]
    assert (restart["service"], restart["restart"], restart["delay"]) == ("flaky", 1, 0.0)
    states = [o["state"] for o in lines if o.get("event") == "supervisor"]
    assert states == ["starting", "running", "stopping", "stopped"]


async def asyncio_forever() -> None:
    import asyncio

    await asyncio.Event().wait()


SCRIPT = """
import logging, sys, time
import offloop

{config}
sv = offloop.Supervisor(name="script", detect_blocking=0.05)

@sv.service(restart="no")
async def blocker():
    time.sleep(0.3)  # blocks the loop: the detector logs it

sys.exit(sv.run({kwargs}))
"""


def run(tmp_path: Path, config: str = "", kwargs: str = "") -> list[str]:
    text = SCRIPT.format(config=config, kwargs=kwargs)
    done = run_script(tmp_path, "app.py", textwrap.dedent(text), timeout=SPAWN_WAIT)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_run_logs_text_lines_when_the_application_did_not_configure_logging(
    tmp_path: Path,
) -> None:
    lines = run(tmp_path)
    assert any(
        " INFO    offloop.supervisor: script: service 'blocker' is ready" in x for x in lines
    )
    assert any(" WARNING offloop.detector: " in x for x in lines)


def test_run_log_format_json_writes_one_object_per_line_with_the_block(tmp_path: Path) -> None:
    objs = [json.loads(x) for x in run(tmp_path, kwargs="log_format='json'")]
    (block,) = [o for o in objs if o.get("event") == "block" and not o["ongoing"]]
    assert block["file"].endswith("app.py")
    assert block["function"] == "blocker"
    assert block["duration_ms"] >= 250
    assert {"service": "blocker", "state": "running"}.items() <= next(
        o for o in objs if o.get("state") == "running" and o.get("service")
    ).items()


def test_run_keeps_the_applications_own_logging(tmp_path: Path) -> None:
    config = "logging.basicConfig(format='APP %(name)s %(message)s', level=logging.INFO)"
    lines = run(tmp_path, config=config, kwargs="log_format='json'")
    assert "APP offloop.supervisor script: stopped" in lines
    assert not [x for x in lines if x.startswith("{")]  # no JSON line of offloop's own


def test_cli_log_format_json(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(
        textwrap.dedent(
            """
            import offloop
            sv = offloop.Supervisor(name="cli")

            @sv.every(0.01, name="tick")
            def tick():
                sv.stop()
            """
        )
    )
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "offloop", "run", "svc:sv", "--log-format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SPAWN_WAIT,
    )
    assert done.returncode == 0, done.stderr
    objs: list[dict[str, Any]] = [json.loads(x) for x in done.stderr.splitlines()]
    assert ("tick", "running") in [(o.get("service"), o.get("state")) for o in objs]


def test_bad_log_format_is_refused_before_anything_runs() -> None:
    sv = Supervisor(name="bad-format")
    with pytest.raises(ValueError, match=r"log_format to be 'text'.*got 'yaml'"):
        sv.run(log_format="yaml")  # type: ignore[arg-type]
    assert sv.state == "new"


@bounded(10)
async def test_json_lines_name_an_abandoned_thread() -> None:
    out = io.StringIO()
    handler = make_handler("json", out)
    logger = logging.getLogger("offloop")
    logger.addHandler(handler)
    sv = Supervisor(name="deaf", grace=0.05)
    release, started = threading.Event(), threading.Event()

    @sv.service
    def deaf() -> None:  # ignores its token: abandoned once the grace is up
        started.set()
        release.wait(QUICK_WAIT)

    try:
        async with sv:
            await await_until(started.is_set, QUICK_WAIT, "the thread")
    finally:
        logger.removeHandler(handler)
        release.set()
    await await_until(
        lambda: not any(t.name == "offloop-service-deaf" for t in threading.enumerate()),
        QUICK_WAIT,
        "the released thread to end",
    )
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (abandoned,) = [o for o in lines if o.get("event") == "abandoned"]
    assert abandoned["service"] == "deaf"
    assert abandoned["what"].startswith("thread 'offloop-service-deaf', currently at:")
    assert abandoned["level"] == "WARNING"


@bounded(10)
async def test_a_missed_run_is_logged_with_the_supervisor_whose_job_it_was(
    log_lines: io.StringIO,
) -> None:
    from tests.services.test_periodic import HandClock, every

    def report() -> None:
        pass

    # Two supervisors with a job of the same name: only the name tells them apart.
    clocks = {"north": HandClock(0.0), "south": HandClock(0.0)}
    async with contextlib.AsyncExitStack() as stack:
        for name, clock in clocks.items():
            sv = Supervisor(name=name)
            sv.add(every(report, 100, clock, first=100))
            await stack.enter_async_context(sv)
        await clocks["north"].wake_at(395)  # asleep through 100, 200 and 300
        await clocks["north"].asleep(2)
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (missed,) = [o for o in lines if o.get("event") == "missed"]
    assert missed["message"] == (
        "north: service 'report' missed 3 run(s) of every 100s (the program was blocked or asleep)"
    )
    assert (missed["supervisor"], missed["service"], missed["missed"]) == ("north", "report", 3)

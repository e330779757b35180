"""A dependency restarted by its policy while the supervisor is still starting.

The start goes through the services in order, each once the one before is
ready; a dependency that crashes and restarts meanwhile must not let a
service start beside it while it is down, whether that service is being
started (the cascade holds it), not started yet, or further down a chain.
"""

from __future__ import annotations

import asyncio
import io
import signal
import textwrap
import threading
from pathlib import Path

import pytest

from offloop import ServiceFailed, StopToken, Supervisor, SupervisorState
from offloop._supervisor.supervised import SHUTDOWN_OVERRUN
from tests.helpers import QUICK_WAIT, Proc, await_until, bounded
from tests.supervisor.test_supervisor import Recorder
from tests.supervisor.test_supervisor_cascade import (
    Crashable,
    FirstStartWaits,
    SlowStop,
    events,
    offloop_tasks,
)


class HeldStart(Recorder):
    """A Recorder whose ``start()`` waits for ``release``: the supervisor's start waits with it."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.began = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.began.set()
        await self.release.wait()
        await super().start()


def cascade(out: io.StringIO) -> list[tuple[object, object, object]]:
    """The ``"cascade"`` events logged so far: (state, service, dependency)."""
    return [(e["state"], e["service"], e["dependency"]) for e in events(out, "cascade")]


def waiting(out: io.StringIO) -> list[tuple[object, object]]:
    return [(s, d) for state, s, d in cascade(out) if state == "waiting"]


async def leave(sv: Supervisor, entering: asyncio.Future[Supervisor]) -> None:
    """End what ``__aenter__`` began, however the test went."""
    if not entering.done():
        entering.cancel()  # __aenter__ stops what it started before it raises
        await asyncio.wait({entering})
    elif not entering.cancelled() and entering.exception() is None:
        await sv.__aexit__(None, None, None)


def start_api_behind_slow(
    name: str, journal: list[str]
) -> tuple[Supervisor, Crashable, HeldStart, asyncio.Future[Supervisor]]:
    """Begin the start of db, slow (held in its start()) and api (depends on db).

    Returns the supervisor, db, slow and the future of ``__aenter__`` (end it with :func:`leave`).
    """
    sv = Supervisor(name=name)
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    slow = sv.add(HeldStart("slow", journal))
    sv.add(Recorder("api", journal), depends_on=["db"])
    return sv, db, slow, asyncio.ensure_future(sv.__aenter__())


@pytest.mark.parametrize("on_dependency_restart", ["restart", "keep"])
@bounded(10)
async def test_a_service_not_started_yet_waits_for_a_dependency_restarted_meanwhile(
    on_dependency_restart: str, log_lines: io.StringIO
) -> None:
    journal: list[str] = []
    sv = Supervisor(name="waits")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    slow = sv.add(HeldStart("slow", journal))
    sv.add(
        Recorder("api", journal),
        depends_on=["db"],
        on_dependency_restart=on_dependency_restart,  # type: ignore[arg-type]
    )
    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        db.gate.clear()  # hold db's restart in its start()
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        slow.release.set()  # the start goes on to api, whose dependency is down
        await await_until(lambda: waiting(log_lines) == [("api", "db")], QUICK_WAIT, "api waits")
        assert journal == ["start db", "crash db", "start slow"]
        assert sv.state.value == "starting"
        assert sv.status()["api"].state == "stopped"  # not started
        db.gate.set()
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert journal == ["start db", "crash db", "start slow", "start db", "start api"]
        assert sv.state is SupervisorState.RUNNING
        status = sv.status()
        assert status["db"].restarts == 1
        # api started once, after db's restart: no restart of its own nor with db.
        assert (status["api"].restarts, status["api"].dependency_restarts) == (0, 0)
    finally:
        await leave(sv, entering)


@bounded(10)
async def test_a_dependency_crashing_as_the_start_goes_on_is_waited_for(
    log_lines: io.StringIO,
) -> None:
    journal: list[str] = []
    sv, db, slow, entering = start_api_behind_slow("same", journal)
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        db.gate.clear()
        # Together: the start makes api's runner in the loop iteration in which db's
        # runner then handles the crash, so the cascade finds api's runner not begun.
        slow.release.set()
        db.crash()
        await await_until(lambda: waiting(log_lines) == [("api", "db")], QUICK_WAIT, "api waits")
        assert journal == ["start db", "start slow", "crash db"]
        db.gate.set()
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert journal == ["start db", "start slow", "crash db", "start db", "start api"]
        status = sv.status()
        assert (status["api"].restarts, status["api"].dependency_restarts) == (0, 0)
    finally:
        await leave(sv, entering)


@bounded(10)
async def test_a_chain_waits_for_the_dependent_the_cascade_holds(log_lines: io.StringIO) -> None:
    journal: list[str] = []
    sv = Supervisor(name="chain")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db"])
    slow = sv.add(HeldStart("slow", journal))
    worker_up = threading.Event()

    @sv.service(depends_on=["api"])
    def worker(token: StopToken) -> None:
        journal.append("start worker")
        worker_up.set()
        token.wait()

    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        db.gate.clear()
        db.crash()  # api, ready already, is stopped and held; worker is not started yet
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        slow.release.set()
        await await_until(
            lambda: waiting(log_lines) == [("worker", "api")], QUICK_WAIT, "worker waits"
        )
        assert journal == ["start db", "start api", "crash db", "stop api", "start slow"]
        assert sv.status()["api"].state == "restarting"
        db.gate.set()
        await asyncio.wait_for(entering, QUICK_WAIT)
        await await_until(worker_up.is_set, QUICK_WAIT, "worker's thread running")
        assert journal == [
            "start db",
            "start api",
            "crash db",
            "stop api",
            "start slow",
            "start db",
            "start api",
            "start worker",
        ]
        assert cascade(log_lines) == [
            ("stopping", "api", "db"),
            ("waiting", "worker", "api"),
            ("starting", "api", "db"),
        ]
        status = sv.status()
        assert sv.state is SupervisorState.RUNNING
        assert status["db"].restarts == 1
        assert (status["api"].restarts, status["api"].dependency_restarts) == (0, 1)
        assert (status["worker"].restarts, status["worker"].dependency_restarts) == (0, 0)
    finally:
        await leave(sv, entering)
    assert journal[-3:] == ["stop slow", "stop api", "stop db"]


@bounded(10)
async def test_a_chain_still_starting_stops_and_starts_again_in_order(
    log_lines: io.StringIO,
) -> None:
    journal: list[str] = []
    sv = Supervisor(name="starting")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db"])
    bot = sv.add(FirstStartWaits("bot", journal), depends_on=["api"])
    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await await_until(lambda: bot.starts == 1, QUICK_WAIT, "bot starting")
        db.crash()  # bot's start() is cut short; api stops; both start again once db is
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert journal == [
            "start db",
            "start api",
            "start bot",
            "crash db",
            "stop bot",
            "stop api",
            "start db",
            "start api",
            "start bot",
        ]
        assert cascade(log_lines) == [
            ("stopping", "bot", "db"),
            ("stopping", "api", "db"),
            ("starting", "api", "db"),
            ("starting", "bot", "db"),
        ]
        status = sv.status()
        assert sv.state is SupervisorState.RUNNING
        assert bot.starts == 2
        assert status["db"].restarts == 1
        for name in ("api", "bot"):
            assert (status[name].restarts, status[name].dependency_restarts) == (0, 1)
            assert status[name].state == "running"
    finally:
        await leave(sv, entering)


async def _dependency_down_during_start(
    where: str, journal: list[str], log_lines: io.StringIO
) -> tuple[Supervisor, Crashable, asyncio.Future[Supervisor]]:
    """db restarts (held in its start()) while api waits to start, or is held by the cascade."""
    sv = Supervisor(name=where, grace=1)
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01, max_restarts=1)
    if where == "waiting":
        slow = sv.add(HeldStart("slow", journal))
        sv.add(Recorder("api", journal), depends_on=["db"])
    else:
        api = sv.add(FirstStartWaits("api", journal), depends_on=["db"])
    entering = asyncio.ensure_future(sv.__aenter__())
    if where == "waiting":
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
    else:
        await await_until(lambda: api.starts == 1, QUICK_WAIT, "api starting")
    db.gate.clear()
    db.crash()
    await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
    if where == "waiting":
        slow.release.set()
        await await_until(lambda: waiting(log_lines) == [("api", "db")], QUICK_WAIT, "api waits")
        assert journal == ["start db", "crash db", "start slow"]
    else:
        assert journal == ["start db", "start api", "crash db", "stop api"]
        assert sv.status()["api"].state == "restarting"
    assert sv.state.value == "starting"
    return sv, db, entering


@pytest.mark.parametrize("how", ["stop", "cancel"])
@pytest.mark.parametrize("where", ["waiting", "held"])
@bounded(10)
async def test_a_stop_during_start_while_a_dependency_restarts_is_bounded(
    where: str, how: str, log_lines: io.StringIO
) -> None:
    journal: list[str] = []
    sv, db, entering = await _dependency_down_during_start(where, journal, log_lines)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        if how == "stop":
            sv.stop()
            assert await asyncio.wait_for(entering, QUICK_WAIT) is sv
            await sv.__aexit__(None, None, None)
        else:  # Ctrl-C under asyncio.run() cancels the task in __aenter__
            entering.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(entering, QUICK_WAIT)
        # Everything stops at once (nothing hangs in its stop), well within the bound.
        assert loop.time() - began < sv.grace + SHUTDOWN_OVERRUN
    finally:
        await leave(sv, entering)
    assert sv.state is SupervisorState.STOPPED
    status = sv.status()
    assert {n: st.state for n, st in status.items()} == dict.fromkeys(status, "stopped")
    # db's restart was cut short in its start() (its stop() cleans up); api never started again.
    if where == "waiting":
        assert journal == ["start db", "crash db", "start slow", "stop slow", "stop db"]
    else:
        assert journal == ["start db", "start api", "crash db", "stop api", "stop db"]
    assert db.starts == 2
    assert (status["api"].dependency_restarts, status["api"].restarting_with) == (0, None)
    assert offloop_tasks() == []


@pytest.mark.parametrize("where", ["waiting", "held"])
@bounded(10)
async def test_a_dependency_failing_its_restart_during_start_fails_the_start(
    where: str, log_lines: io.StringIO
) -> None:
    journal: list[str] = []
    sv, db, entering = await _dependency_down_during_start(where, journal, log_lines)
    try:
        db.start_failures = 1  # its restart fails too: beyond max_restarts=1
        db.gate.set()
        with pytest.raises(ServiceFailed, match=r"Service 'db' failed: it needed more than max_"):
            await asyncio.wait_for(entering, QUICK_WAIT)
    finally:
        await leave(sv, entering)
    assert sv.state is SupervisorState.FAILED
    status = sv.status()
    assert status["db"].state == "failed"
    assert status["api"].state == "stopped"
    assert "start api" not in journal[journal.index("crash db") :]  # never started again
    assert status["api"].dependency_restarts == 0
    assert offloop_tasks() == []


@bounded(10)
async def test_a_service_not_started_yet_waits_while_the_cascade_stops_its_dependency(
    log_lines: io.StringIO,
) -> None:
    # db restarts during the start, and the cascade stops api (db's dependent),
    # whose stop takes a while. worker (depends on api) comes up for its start
    # meanwhile: api is going down, so worker must wait for it, not start.
    journal: list[str] = []
    sv = Supervisor(name="transitive")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    api = sv.add(SlowStop("api", journal), depends_on=["db"])
    slow = sv.add(HeldStart("slow", journal))
    sv.add(Recorder("worker", journal), depends_on=["api"])
    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        db.gate.clear()  # hold db's restart
        db.crash()
        await asyncio.wait_for(api.stopping.wait(), QUICK_WAIT)
        slow.release.set()  # the start goes on to worker
        await await_until(
            lambda: "start worker" in journal or waiting(log_lines) == [("worker", "api")],
            QUICK_WAIT,
            "worker started or waiting",
        )
        assert "start worker" not in journal, journal
        assert sv.state is SupervisorState.STARTING
        api.release.set()
        db.gate.set()
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert journal[-3:] == ["start db", "start api", "start worker"]
        status = sv.status()
        assert (status["worker"].restarts, status["worker"].dependency_restarts) == (0, 0)
    finally:
        api.release.set()
        db.gate.set()
        await leave(sv, entering)


SCRIPT = """
import asyncio
import logging

import offloop

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sv = offloop.Supervisor(grace=5, name="script")
restarting = []


def db_restarting():
    if not restarting:
        restarting.append(asyncio.Event())
    return restarting[0]


class Restarting(logging.Handler):
    # db's restart is scheduled (in an hour): slow's start may end.
    def emit(self, record):
        if str(record.msg).startswith("%s: restarting service %r in"):
            db_restarting().set()


logging.getLogger("offloop.supervisor").addHandler(Restarting())


@sv.service(backoff=3600, max_backoff=3600, startup_window=0)
async def db():
    raise ConnectionResetError("db lost its socket")


class Slow(offloop.Service):
    name = "slow"

    async def start(self):
        self.ended = asyncio.Event()
        await db_restarting().wait()

    async def wait(self):
        await self.ended.wait()

    async def stop(self):
        self.ended.set()


sv.add(Slow())


@sv.service(depends_on=["db"])
async def api():
    print("api running", flush=True)
    await asyncio.Event().wait()


print(f"run() returned {sv.run()}", flush=True)
"""


def test_ctrl_c_while_the_start_waits_for_a_restarting_dependency_stops_at_once(
    tmp_path: Path,
) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    with Proc([str(script)], tmp_path) as proc:
        proc.wait_for("service 'api' waits for its dependency 'db'")
        proc.send(signal.SIGINT)
        # db's backoff is an hour and the grace 5 s: only a prompt stop ends it in time.
        assert proc.exit_code(timeout=4.0) == 0
        out = proc.output
    assert "WARNING script: received SIGINT, stopping gracefully within 5s" in out
    assert "starting service 'api'" not in out
    assert "api running" not in out
    assert out.index("INFO script: stopped") < out.index("run() returned 0")

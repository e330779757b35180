"""A restarted dependency stops its dependents first and starts them again once it is ready."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest

from offloop import StopToken, Supervisor, SupervisorState, WSGIService
from offloop._supervisor.metrics import metrics_text
from offloop._supervisor.supervised import SHUTDOWN_OVERRUN
from tests.helpers import QUICK_WAIT, await_until, bounded, http_get
from tests.supervisor.test_supervisor import Recorder


class Crashable(Recorder):
    """A Recorder whose ``wait()`` raises on ``crash()``; ``gate`` holds its restarts."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.starts = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self._boom: asyncio.Event | None = None

    async def start(self) -> None:
        self.starts += 1
        if self.starts > 1:
            await self.gate.wait()
        await super().start()
        self._boom = asyncio.Event()

    async def wait(self) -> None:
        assert self._boom is not None
        assert self._ended is not None
        boom = asyncio.ensure_future(self._boom.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        await asyncio.wait({boom, ended}, return_when=asyncio.FIRST_COMPLETED)
        boom.cancel()
        ended.cancel()
        if self._boom.is_set():
            self.journal.append(f"crash {self.name}")
            raise ConnectionResetError(f"{self.name} lost its connection")

    def crash(self) -> None:
        assert self._boom is not None
        self._boom.set()


def offloop_tasks() -> list[str]:
    """The names of offloop's own tasks still alive on this loop (none once a stop ended)."""
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("offloop-")]


def events(out: io.StringIO, kind: str) -> list[dict[str, object]]:
    """The events of ``kind`` that ``log_lines`` (conftest.py) holds so far, in order."""
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [e for e in lines if e.get("event") == kind]


@bounded(10)
async def test_dependents_stop_in_reverse_order_and_start_again_once_it_is_ready(
    log_lines: io.StringIO,
) -> None:
    journal: list[str] = []
    sv = Supervisor(name="cascade")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db"])
    sv.add(Recorder("bot", journal), depends_on=["api"])
    sv.add(Recorder("cache", journal))
    async with sv:
        del journal[:]
        db.gate.clear()  # hold db's restart, to see its dependents held meanwhile
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        assert journal == ["crash db", "stop bot", "stop api"]
        held = sv.status()
        assert (held["api"].state, held["api"].restarting_with) == ("restarting", "db")
        assert held["bot"].to_dict()["restarting_with"] == "db"
        assert held["cache"].state == "running"  # not a dependent
        db.gate.set()
        await await_until(
            lambda: all(st.state == "running" for st in sv.status().values()),
            QUICK_WAIT,
            "every service running again",
        )
        assert journal == ["crash db", "stop bot", "stop api", "start db", "start api", "start bot"]
        status = {n: st.to_dict() for n, st in sv.status().items()}
        assert status["db"]["restarts"] == 1
        for name in ("api", "bot"):
            # The dependency's restart, not theirs: their own budget is untouched.
            assert status[name]["restarts"] == 0
            assert status[name]["dependency_restarts"] == 1
            assert status[name]["restarting_with"] is None
        assert status["cache"]["dependency_restarts"] == 0
        metrics = metrics_text(sv).splitlines()
        name = "offloop_service_dependency_restarts_total"
        assert f'{name}{{supervisor="cascade",service="api"}} 1' in metrics
        assert f'{name}{{supervisor="cascade",service="cache"}} 0' in metrics
        assert 'offloop_service_restarts_total{supervisor="cascade",service="api"} 0' in metrics
    cascade = [(e["state"], e["service"], e["dependency"]) for e in events(log_lines, "cascade")]
    assert cascade == [
        ("stopping", "bot", "db"),
        ("stopping", "api", "db"),
        ("starting", "api", "db"),
        ("starting", "bot", "db"),
    ]


@bounded(10)
async def test_a_dependent_with_keep_stays_running_and_the_cascade_does_not_go_through_it() -> None:
    journal: list[str] = []
    sv = Supervisor(name="keep")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("pool", journal), depends_on=["db"], on_dependency_restart="keep")
    sv.add(Recorder("api", journal), depends_on=["pool"])
    sv.add(Recorder("audit", journal), depends_on=["db"])
    async with sv:
        del journal[:]
        db.crash()
        await await_until(
            lambda: sv.status()["audit"].dependency_restarts == 1, QUICK_WAIT, "audit again"
        )
        await await_until(lambda: sv.status()["audit"].state == "running", QUICK_WAIT, "audit")
        assert journal == ["crash db", "stop audit", "start db", "start audit"]
        assert sv.status()["pool"].dependency_restarts == 0
        assert sv.status()["api"].dependency_restarts == 0


@bounded(10)
async def test_real_async_wsgi_and_thread_services_restart_with_their_dependency(
    log_lines: io.StringIO,
) -> None:
    import flask

    sv = Supervisor(name="real")
    crash = asyncio.Event()
    runs: list[str] = []
    app = flask.Flask("api")

    app.add_url_rule("/", "index", lambda: "ok")

    @sv.service(backoff=0.01, max_backoff=0.01, startup_window=0)
    async def db() -> None:
        runs.append("db")
        await crash.wait()
        crash.clear()
        raise ConnectionResetError("db went away")

    api = sv.add(WSGIService(app, port=0, host="127.0.0.1", name="api"), depends_on=["db"])
    worker_stops = threading.Event()

    @sv.service(depends_on=["api"])
    def worker(token: StopToken) -> None:
        runs.append("worker")
        token.wait()
        worker_stops.set()

    async with sv:
        first_url = api.url
        assert first_url is not None
        assert await http_get(first_url + "/") == (200, "ok")
        crash.set()
        await await_until(
            lambda: (
                sv.status()["worker"].dependency_restarts == 1
                and all(st.state == "running" for st in sv.status().values())
            ),
            QUICK_WAIT,
            "the services running again",
        )
        assert worker_stops.is_set()
        assert runs == ["db", "worker", "db", "worker"]
        assert api.url is not None
        assert await http_get(api.url + "/") == (200, "ok")
    order = [
        (e["state"], e["service"])
        for e in events(log_lines, "service")
        if e["service"] in ("db", "api", "worker")
    ]
    # From the crash on: the dependents stop last first, db restarts, then they start in order.
    after = order[order.index(("stopping", "worker")) :]
    assert [s for s in after if s[0] in ("stopping", "starting", "running")][:7] == [
        ("stopping", "worker"),
        ("stopping", "api"),
        ("starting", "db"),
        ("running", "db"),
        ("starting", "api"),
        ("running", "api"),
        ("starting", "worker"),
    ]


class SlowStop(Recorder):
    """A Recorder whose ``stop()`` waits for ``release`` (or its cancellation)."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def stop(self) -> None:
        self.stopping.set()
        await self.release.wait()
        await super().stop()


@bounded(10)
async def test_a_stop_during_the_cascade_is_bounded_and_leaves_nothing_running() -> None:
    journal: list[str] = []
    sv = Supervisor(name="interrupted", grace=0.3)
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    api = sv.add(SlowStop("api", journal), depends_on=["db"])  # its stop() never ends
    sv.add(Recorder("bot", journal), depends_on=["api"])
    loop = asyncio.get_running_loop()
    async with sv:
        del journal[:]
        db.crash()
        await asyncio.wait_for(api.stopping.wait(), QUICK_WAIT)  # the cascade is stopping api
        assert journal == ["crash db", "stop bot"]
        began = loop.time()
        sv.stop()
    # The shutdown waited for the cascade's stop of api, which began earlier
    # with the same grace and killed api when it ran out: the usual bound holds.
    assert loop.time() - began < sv.grace + SHUTDOWN_OVERRUN
    assert sv.state is SupervisorState.STOPPED
    assert {n: st.state for n, st in sv.status().items()} == dict.fromkeys(
        ("db", "api", "bot"), "stopped"
    )
    assert journal == ["crash db", "stop bot"]  # nothing was started again
    assert db.starts == 1
    assert offloop_tasks() == []


@bounded(10)
async def test_a_stop_while_dependents_are_held_stops_them_without_starting_them() -> None:
    journal: list[str] = []
    sv = Supervisor(name="held")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db"])
    async with sv:
        del journal[:]
        db.gate.clear()
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
    # db's restart was cut short (its stop() cleans up); api was not started again.
    assert journal == ["crash db", "stop api", "stop db"]
    assert {n: st.state for n, st in sv.status().items()} == {"db": "stopped", "api": "stopped"}
    assert sv.status()["api"].restarting_with is None  # stopped for good now


@bounded(10)
async def test_a_done_one_shot_dependent_is_not_run_again() -> None:
    journal: list[str] = []
    sv = Supervisor(name="oneshot")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    migrations: list[int] = []

    @sv.service(depends_on=["db"], oneshot=True)
    async def migrate() -> None:
        migrations.append(1)

    sv.add(Recorder("api", journal), depends_on=["migrate"])
    async with sv:
        await await_until(lambda: sv.status()["migrate"].state == "done", QUICK_WAIT, "done")
        del journal[:]
        db.crash()
        await await_until(lambda: journal[-1:] == ["start db"], QUICK_WAIT, "db again")
        await await_until(lambda: sv.status()["db"].state == "running", QUICK_WAIT, "db")
        assert migrations == [1]
        assert sv.status()["migrate"].state == "done"
        # Done, so the cascade did not go through it to api either.
        assert journal == ["crash db", "start db"]


@pytest.mark.parametrize("bad", ["always", True, None])
def test_on_dependency_restart_must_be_restart_or_keep(bad: object) -> None:
    sv = Supervisor(name="bad")
    with pytest.raises(ValueError, match=r"on_dependency_restart of the service 'api' must be"):
        sv.add(Recorder("api", []), on_dependency_restart=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be 'restart' \(stop it while"):
        sv.every(1, on_dependency_restart=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'keep' \\(leave it running"):
        sv.service(on_dependency_restart=bad)  # type: ignore[call-overload]
    assert sv.services == {}


@bounded(10)
async def test_the_dependents_own_restart_budget_is_untouched() -> None:
    journal: list[str] = []
    sv = Supervisor(name="budget")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    # No restart of its own allowed: a restart counted against it would fail the supervisor.
    sv.add(Recorder("api", journal), depends_on=["db"], max_restarts=0)
    async with sv:
        for n in (1, 2):
            db.crash()
            await await_until(
                lambda n=n: (
                    sv.status()["api"].dependency_restarts == n  # type: ignore[misc]
                    and sv.status()["api"].state == "running"
                ),
                QUICK_WAIT,
                f"api started again after db's restart #{n}",
            )
        assert sv.state is SupervisorState.RUNNING
        assert sv.status()["api"].restarts == 0
        assert sv.status()["db"].restarts == 2


@bounded(10)
async def test_a_dependent_of_two_restarting_services_starts_once_both_are_ready() -> None:
    journal: list[str] = []
    sv = Supervisor(name="two")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    cache = sv.add(Crashable("cache", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db", "cache"])
    async with sv:
        del journal[:]
        db.gate.clear()
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        cache.crash()
        await await_until(
            lambda: sv.status()["cache"].restarts == 1 and sv.status()["cache"].state == "running",
            QUICK_WAIT,
            "cache restarted",
        )
        assert sv.status()["api"].state == "restarting"  # db is not ready yet
        db.gate.set()
        await await_until(lambda: sv.status()["api"].state == "running", QUICK_WAIT, "api")
        assert journal == [
            "crash db",
            "stop api",
            "crash cache",
            "start cache",
            "start db",
            "start api",
        ]
        assert sv.status()["api"].dependency_restarts == 1


class GatedStart(Recorder):
    """A Recorder whose restarts wait in ``start()`` until ``gate`` is set."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.starts = 0
        self.gate = asyncio.Event()

    async def start(self) -> None:
        self.starts += 1
        await super().start()
        if self.starts > 1:
            await self.gate.wait()


@bounded(10)
async def test_a_dependency_that_restarts_again_while_its_dependents_start_stops_them_again() -> (
    None
):
    journal: list[str] = []
    sv = Supervisor(name="again")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    api = sv.add(GatedStart("api", journal), depends_on=["db"])
    sv.add(Recorder("bot", journal), depends_on=["api"])
    async with sv:
        del journal[:]
        db.crash()
        await await_until(lambda: api.starts == 2, QUICK_WAIT, "api starting again")
        db.crash()  # while api is still starting, bot not yet
        api.gate.set()
        await await_until(
            lambda: (
                all(st.state == "running" for st in sv.status().values())
                and sv.status()["bot"].dependency_restarts == 1
            ),
            QUICK_WAIT,
            "everything running again",
        )
        assert journal == [
            "crash db",
            "stop bot",
            "stop api",
            "start db",
            "start api",  # cut short by db's second crash: stop() cleans up
            "crash db",
            "stop api",
            "start db",
            "start api",
            "start bot",
        ]
        assert sv.status()["api"].dependency_restarts == 2
        assert sv.status()["api"].restarts == 0


@bounded(10)
async def test_the_live_table_shows_a_restart_with_a_dependency() -> None:
    from rich.console import Console

    from offloop._cli.run import render_table

    journal: list[str] = []
    sv = Supervisor(name="table")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(Recorder("api", journal), depends_on=["db"])
    async with sv:
        db.gate.clear()
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        console = Console(record=True, width=120, color_system=None)
        console.print(render_table(sv))
        assert "restarting (with db)" in console.export_text()
        db.gate.set()
        await await_until(lambda: sv.status()["api"].state == "running", QUICK_WAIT, "api")
        console.print(render_table(sv))
        assert "0 (+1 with deps)" in console.export_text()


class FirstStartWaits(Recorder):
    """A Recorder whose first ``start()`` waits (for ever, unless cut short)."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        await super().start()
        if self.starts == 1:
            await asyncio.Event().wait()


@bounded(10)
async def test_a_restart_while_the_supervisor_starts_holds_the_dependent_it_waits_for() -> None:
    journal: list[str] = []
    sv = Supervisor(name="early")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    api = sv.add(FirstStartWaits("api", journal), depends_on=["db"])
    sv.add(Recorder("bot", journal), depends_on=["api"])
    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await await_until(lambda: api.starts == 1, QUICK_WAIT, "api starting")
        db.crash()  # the start waits for api, which the cascade stops and starts again
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert journal == [
            "start db",
            "start api",
            "crash db",
            "stop api",
            "start db",
            "start api",
            "start bot",
        ]
        assert sv.state is SupervisorState.RUNNING
        assert sv.status()["api"].dependency_restarts == 1
    finally:
        await sv.__aexit__(None, None, None)

"""What a service waiting for its dependencies shows, and a dependency that never comes back.

``ServiceStatus.waiting_for`` names the dependencies a service waits for
before it starts (again). A dependency whose backoff is infinite never
restarts: a supervisor's start that waits for it fails with ``ServiceFailed``
at once instead of waiting until a stop; after the start its dependents stay
down until the stop.
"""

from __future__ import annotations

import asyncio
import io
import math

import pytest

from offloop import ServiceFailed, Supervisor, SupervisorState
from offloop._supervisor.cascade import parked_message
from offloop._supervisor.statusserver import status_json
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_supervisor import Recorder
from tests.supervisor.test_supervisor_cascade import (
    Crashable,
    FirstStartWaits,
    SlowStop,
    offloop_tasks,
)
from tests.supervisor.test_supervisor_cascade_start import (
    HeldStart,
    leave,
    start_api_behind_slow,
    waiting,
)


def table(sv: Supervisor) -> str:
    from rich.console import Console

    from offloop._cli.run import render_table

    console = Console(record=True, width=140, color_system=None)
    console.print(render_table(sv))
    return console.export_text()


@pytest.mark.parametrize("end", ["ready", "stop", "cancel"])
@bounded(10)
async def test_a_service_waiting_before_its_first_start_names_the_dependency(
    end: str, log_lines: io.StringIO
) -> None:
    journal: list[str] = []
    sv, db, slow, entering = start_api_behind_slow("names", journal)
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        assert sv.status()["api"].waiting_for == ()  # not begun yet: waits for nothing
        db.gate.clear()  # hold db's restart in its start()
        db.crash()
        await await_until(lambda: db.starts == 2, QUICK_WAIT, "db restarting")
        slow.release.set()
        await await_until(lambda: waiting(log_lines) == [("api", "db")], QUICK_WAIT, "api waits")
        api = sv.status()["api"]
        assert (api.state, api.waiting_for) == ("stopped", ("db",))
        assert "waiting_for=('db',)" in repr(api)
        assert status_json(sv)["services"]["api"]["waiting_for"] == ["db"]
        assert "stopped (waiting for db)" in table(sv)
        assert sv.status()["db"].waiting_for == ()
        if end == "ready":
            db.gate.set()
            await asyncio.wait_for(entering, QUICK_WAIT)
            assert sv.status()["api"].state == "running"
        elif end == "stop":
            sv.stop()
            await asyncio.wait_for(entering, QUICK_WAIT)
            await sv.__aexit__(None, None, None)
        else:
            entering.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(entering, QUICK_WAIT)
        status = sv.status()
        assert {n: st.waiting_for for n, st in status.items()} == dict.fromkeys(status, ())
        assert status["api"].to_dict()["waiting_for"] == []
        assert "waiting_for" not in repr(status["api"])
    finally:
        db.gate.set()
        await leave(sv, entering)
    assert offloop_tasks() == []


@bounded(10)
async def test_a_service_the_cascade_starts_again_names_the_dependency_it_waits_for() -> None:
    journal: list[str] = []
    sv = Supervisor(name="again")
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    api = sv.add(Crashable("api", journal), depends_on=["db"])
    sv.add(Recorder("bot", journal), depends_on=["api"])
    async with sv:
        api.gate.clear()  # api's start again waits: bot waits for api meanwhile
        db.crash()
        await await_until(lambda: api.starts == 2, QUICK_WAIT, "api starting again")
        bot = sv.status()["bot"]
        assert (bot.state, bot.restarting_with, bot.waiting_for) == ("restarting", "db", ("api",))
        assert "restarting (with db; waiting for api)" in table(sv)
        api.gate.set()
        await await_until(lambda: sv.status()["bot"].state == "running", QUICK_WAIT, "bot")
        assert sv.status()["bot"].waiting_for == ()
        assert journal[-3:] == ["start db", "start api", "start bot"]


async def _parked_during_start(
    where: str, journal: list[str], log_lines: io.StringIO
) -> tuple[Supervisor, asyncio.Future[Supervisor], dict[str, object]]:
    """Enter a supervisor whose 'db' (infinite backoff) crashes while the start is under way.

    ``where``: how the start waits for it: ``parked`` (api comes up for its
    first start after db parked), ``waiting`` (api waits for db's restart
    before db parks), ``held`` (api was starting: the cascade holds it), or
    ``chain`` (worker waits for api, which db's crash holds stopped).
    """
    sv = Supervisor(name=where, grace=1)
    db = sv.add(Crashable("db", journal), backoff=math.inf, max_backoff=math.inf)
    found: dict[str, object] = {"db": db}
    if where == "held":
        found["api"] = sv.add(FirstStartWaits("api", journal), depends_on=["db"])
    else:
        if where == "waiting":  # its stop keeps db from parking until it is released
            found["audit"] = sv.add(SlowStop("audit", journal), depends_on=["db"])
        if where == "chain":
            sv.add(Recorder("api", journal), depends_on=["db"])
        found["slow"] = sv.add(HeldStart("slow", journal))
        if where == "chain":
            sv.add(Recorder("worker", journal), depends_on=["api"])
        else:
            sv.add(Recorder("api", journal), depends_on=["db"])
    return sv, asyncio.ensure_future(sv.__aenter__()), found


@pytest.mark.parametrize("where", ["parked", "waiting", "held", "chain"])
@bounded(10)
async def test_a_dependency_parked_by_an_infinite_backoff_fails_the_start_at_once(
    where: str, log_lines: io.StringIO
) -> None:
    journal: list[str] = []
    sv, entering, found = await _parked_during_start(where, journal, log_lines)
    db = found["db"]
    assert isinstance(db, Crashable)
    try:
        if where == "held":
            api = found["api"]
            assert isinstance(api, FirstStartWaits)
            await await_until(lambda: api.starts == 1, QUICK_WAIT, "api starting")
            db.crash()  # api is cut short and held; the start waits for it
        else:
            slow = found["slow"]
            assert isinstance(slow, HeldStart)
            await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
            db.crash()
            if where == "waiting":
                audit = found["audit"]
                assert isinstance(audit, SlowStop)
                await asyncio.wait_for(audit.stopping.wait(), QUICK_WAIT)
                slow.release.set()
                await await_until(
                    lambda: waiting(log_lines) == [("api", "db")], QUICK_WAIT, "api waits"
                )
                assert sv.status()["api"].waiting_for == ("db",)
                assert not entering.done()
                audit.release.set()  # db parks now: api, waiting already, fails the start
            else:
                await await_until(
                    lambda: sv.status()["db"].state == "restarting", QUICK_WAIT, "db parked"
                )
                assert not entering.done()  # nothing waits for db yet
                slow.release.set()
        with pytest.raises(ServiceFailed) as failed:
            await asyncio.wait_for(entering, QUICK_WAIT)
    finally:
        await leave(sv, entering)
    waiter = "worker" if where == "chain" else "api"
    error = "ConnectionResetError('db lost its connection')"
    if where == "chain":
        whose = "its dependency 'api' waits for 'db', which"
        drop = "drop the dependency on 'db'"
    else:
        whose = "its dependency 'db'"
        drop = "drop 'db' from the depends_on of 'api'"
    assert str(failed.value) == (
        f"Service {waiter!r} cannot start: {whose} crashed ({error}) during the supervisor's "
        f"start and never restarts, because its backoff is infinite. Give 'db' a finite "
        f"backoff, or {drop}."
    )
    assert failed.value.service == waiter
    assert isinstance(failed.value.__cause__, ConnectionResetError)
    assert sv.state is SupervisorState.FAILED
    status = sv.status()
    assert status[waiter].state == "failed"
    assert status["db"].state == "stopped"
    assert {n: st.waiting_for for n, st in status.items()} == dict.fromkeys(status, ())
    after = journal[journal.index("crash db") :]
    assert f"start {waiter}" not in after
    assert "start db" not in after
    assert offloop_tasks() == []


@bounded(10)
async def test_a_service_the_start_waits_for_that_parks_itself_fails_the_start() -> None:
    journal: list[str] = []
    sv = Supervisor(name="itself")
    sv.add(
        Recorder("db", journal, start_failures=1),
        retry_startup=True,
        backoff=math.inf,
        max_backoff=math.inf,
    )
    sv.add(Recorder("api", journal), depends_on=["db"])
    with pytest.raises(ServiceFailed) as failed:
        await asyncio.wait_for(sv.__aenter__(), QUICK_WAIT)
    assert str(failed.value) == (
        "Service 'db' cannot start: it crashed (ConnectionRefusedError('db cannot start')) "
        "during the supervisor's start and never restarts, because its backoff is infinite. "
        "Give it a finite backoff so that it restarts."
    )
    assert failed.value.service == "db"
    assert {n: st.state for n, st in sv.status().items()} == {"db": "failed", "api": "stopped"}
    assert journal == ["start db"]
    assert offloop_tasks() == []


@bounded(10)
async def test_after_the_start_a_parked_dependency_keeps_its_dependents_down_until_the_stop() -> (
    None
):
    journal: list[str] = []
    sv = Supervisor(name="after")
    db = sv.add(Crashable("db", journal), backoff=math.inf, max_backoff=math.inf)
    sv.add(Recorder("api", journal), depends_on=["db"])
    sv.add(Recorder("cache", journal))
    async with sv:
        del journal[:]
        db.crash()
        await await_until(lambda: sv.status()["db"].state == "restarting", QUICK_WAIT, "db")
        # The journal has "stop api" as its stop() begins; the state follows once it returned.
        await await_until(
            lambda: (
                journal == ["crash db", "stop api"] and sv.status()["api"].state == "restarting"
            ),
            QUICK_WAIT,
            "api stopped",
        )
        status = sv.status()
        assert (status["api"].state, status["api"].restarting_with) == ("restarting", "db")
        assert status["cache"].state == "running"
        assert sv.state is SupervisorState.RUNNING  # nothing waits for db: no failure
    assert sv.state.value == "stopped"
    assert journal == ["crash db", "stop api", "stop cache"]
    assert {st.state for st in sv.status().values()} == {"stopped"}
    assert offloop_tasks() == []


async def api_starting(api: FirstStartWaits) -> None:
    await await_until(lambda: api.starts == 1, QUICK_WAIT, "api starting")


@bounded(10)
async def test_wait_ready_and_start_raise_once_the_start_fails_on_a_parked_dependency() -> None:
    journal: list[str] = []
    failures: list[str] = []
    for how in ("serve", "start"):
        sv = Supervisor(name=how)
        db = sv.add(Crashable("db", journal), backoff=math.inf, max_backoff=math.inf)
        api = sv.add(FirstStartWaits("api", journal), depends_on=["db"])
        ready = asyncio.ensure_future(sv.wait_ready())
        running = asyncio.ensure_future(sv.serve() if how == "serve" else sv.start())
        await asyncio.wait_for(api_starting(api), QUICK_WAIT)
        db.crash()
        for task in (ready, running):
            with pytest.raises(ServiceFailed, match=r"^Service 'api' cannot start: its depend"):
                await asyncio.wait_for(task, QUICK_WAIT)
        failures.append(sv.state.value)
        if how == "start":
            with pytest.raises(ServiceFailed):
                await sv.aclose()
    assert failures == ["failed", "failed"]
    assert offloop_tasks() == []


@bounded(10)
async def test_a_parked_dependency_that_returned_is_not_said_to_have_crashed() -> None:
    # restart="always" restarts a service that returned, so an infinite
    # backoff parks it as it parks one that crashed; the message says which.
    journal: list[str] = []
    sv = Supervisor(name="returned")
    batch_done = asyncio.Event()

    @sv.service(restart="always", backoff=math.inf, max_backoff=math.inf)
    async def feeder() -> None:
        await batch_done.wait()  # a batch that ends normally

    slow = sv.add(HeldStart("slow", journal))
    sv.add(Recorder("api", journal), depends_on=["feeder"])
    entering = asyncio.ensure_future(sv.__aenter__())
    try:
        await asyncio.wait_for(slow.began.wait(), QUICK_WAIT)
        batch_done.set()
        await await_until(
            lambda: sv.status()["feeder"].state == "restarting", QUICK_WAIT, "feeder parked"
        )
        slow.release.set()
        with pytest.raises(ServiceFailed) as failed:
            await asyncio.wait_for(entering, QUICK_WAIT)
    finally:
        await leave(sv, entering)
    assert str(failed.value) == (
        "Service 'api' cannot start: its dependency 'feeder' returned (restart='always') during "
        "the supervisor's start and is not started again, because its backoff is infinite. "
        "Give 'feeder' a finite backoff, or drop 'feeder' from the depends_on of 'api'."
    )
    assert failed.value.__cause__ is None
    assert "start api" not in journal


@bounded(10)
async def test_a_delay_that_overflows_to_infinity_names_max_backoff() -> None:
    # A finite backoff doubles past the largest float once max_backoff is
    # infinite (RestartPolicy.delay): "give it a finite backoff" would be wrong.
    sv = Supervisor(name="overflow")
    sv.add(Recorder("db", []), restart="always", backoff=1e300, max_backoff=math.inf)
    db = sv._entries["db"]
    assert sv._entries["db"].policy.delay(27) == math.inf
    db.parked_after = ConnectionResetError("db lost its connection")
    assert parked_message([db]) == (
        "Service 'db' cannot start: it crashed (ConnectionResetError('db lost its connection')) "
        "during the supervisor's start and never restarts, because its backoff/max_backoff "
        "make its restart delay infinite. Give it a finite max_backoff so that it restarts."
    )
    db.parked_after = None
    assert parked_message([db]) == (
        "Service 'db' cannot start: it returned (restart='always') during the supervisor's "
        "start and is not started again, because its backoff/max_backoff make its restart "
        "delay infinite. Give it a finite max_backoff so that it restarts."
    )


class StartFailsAgain(Recorder):
    """A Recorder whose every start after the first fails."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts > 1:
            self.start_failures = 1
        await super().start()


@bounded(10)
async def test_a_dependent_that_ends_while_restarting_with_its_dependency_names_it_no_more() -> (
    None
):
    journal: list[str] = []
    sv = Supervisor(name="ended", grace=1)
    db = sv.add(Crashable("db", journal), backoff=0, max_backoff=0)
    sv.add(StartFailsAgain("api", journal), restart="no", depends_on=["db"])
    with pytest.raises(ServiceFailed, match="'api'"):  # noqa: PT012
        async with sv:
            db.crash()  # api stops, and its start once db is ready again fails
            await asyncio.Event().wait()  # until the failure cuts the body short
    api = sv.status()["api"]
    assert api.state == "failed"
    assert isinstance(api.last_error, ConnectionRefusedError)
    # It ended for good: it used to go on naming db, as "failed (with db)".
    assert api.restarting_with is None
    assert status_json(sv)["services"]["api"]["restarting_with"] is None
    assert "with db" not in table(sv)

"""Start order (``depends_on``) and one-shot services (``oneshot=True``)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable

import pytest

from offloop import ServiceFailed, ServiceState, Supervisor, SupervisorState
from offloop._supervisor.logs import make_handler
from offloop._supervisor.order import start_order
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_supervisor import Recorder


class SlowToStart(Recorder):
    """A Recorder whose ``start()`` returns only once ``go`` is set."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.go = asyncio.Event()

    async def start(self) -> None:
        await super().start()
        await self.go.wait()
        self.journal.append(f"ready {self.name}")


@bounded(10)
async def test_services_start_after_their_dependencies_named_before_they_were_added() -> None:
    journal: list[str] = []
    sv = Supervisor(name="deps")
    sv.add(Recorder("bot", journal), depends_on=["api"])
    sv.add(Recorder("api", journal), depends_on=["db"])
    db = sv.add(SlowToStart("db", journal))
    sv.add(Recorder("cache", journal))
    entering = asyncio.ensure_future(sv.__aenter__())
    await await_until(lambda: journal == ["start db"], what="db starting")
    # api waits for db to be ready, not just started.
    for _ in range(20):
        await asyncio.sleep(0)
    assert journal == ["start db"]
    db.go.set()
    await asyncio.wait_for(entering, QUICK_WAIT)
    try:
        assert journal == ["start db", "ready db", "start api", "start bot", "start cache"]
        assert list(sv.services) == ["db", "api", "bot", "cache"]
    finally:
        await sv.__aexit__(None, None, None)
    assert journal[5:] == ["stop cache", "stop bot", "stop api", "stop db"]


def test_without_depends_on_the_order_is_the_order_of_registration() -> None:
    assert start_order({"c": (), "a": (), "b": ()}) == ["c", "a", "b"]
    assert start_order({"c": ("b",), "a": (), "b": ()}) == ["b", "c", "a"]


@bounded(10)
async def test_an_unknown_name_is_refused_before_any_service_starts() -> None:
    journal: list[str] = []
    sv = Supervisor(name="typo")
    sv.add(Recorder("db", journal))
    sv.add(Recorder("api", journal), depends_on=["db", "dbb"])
    with pytest.raises(ValueError, match=r"The service 'api' depends on 'dbb', which no service"):
        async with sv:
            pytest.fail("the body must not run")
    assert journal == []
    assert sv.state is SupervisorState.NEW


@bounded(10)
async def test_a_cycle_is_refused_before_any_service_starts() -> None:
    journal: list[str] = []
    sv = Supervisor(name="cycle")
    sv.add(Recorder("solo", journal))
    sv.add(Recorder("a", journal), depends_on=["b"])
    sv.add(Recorder("b", journal), depends_on=["c"])
    sv.add(Recorder("c", journal), depends_on=["a"])
    with pytest.raises(ValueError, match=r"in a cycle: a -> b -> c -> a\. No start order"):
        await sv.serve()
    assert journal == []
    assert sv.state is SupervisorState.NEW


def test_depends_on_must_be_a_list_of_other_services_names() -> None:
    sv = Supervisor()
    with pytest.raises(TypeError, match=r"must be a list of service names \(depends_on=\['db'\]\)"):
        sv.add(Recorder("api", []), depends_on="db")
    with pytest.raises(TypeError, match=r"must hold the names .* got int"):
        sv.add(Recorder("api", []), depends_on=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'api' cannot depend on itself"):
        sv.add(Recorder("api", []), depends_on=["api"])
    with pytest.raises(TypeError, match="oneshot must be True or False, got str"):
        sv.add(Recorder("api", []), oneshot="yes")  # type: ignore[arg-type]
    assert sv.services == {}  # nothing half-added


class CrashesWhenTold(Recorder):
    async def wait(self) -> None:
        await super().wait()
        raise ConnectionResetError(f"{self.name} lost its disk")


@bounded(10)
async def test_a_dependency_that_fails_stops_its_dependents_first() -> None:
    journal: list[str] = []
    sv = Supervisor(name="fails")
    db = sv.add(CrashesWhenTold("db", journal), restart="no")
    sv.add(Recorder("api", journal), depends_on=["db"])
    with pytest.raises(ServiceFailed, match="'db' failed") as info:  # noqa: PT012
        async with sv:
            assert db._ended is not None
            db._ended.set()
            await asyncio.sleep(QUICK_WAIT)
            pytest.fail("the failure must cut the body short")
    assert info.value.service == "db"
    assert journal == ["start db", "start api", "stop api"]
    assert sv.status()["api"].state == "stopped"
    assert sv.status()["db"].state == "failed"


@bounded(10)
async def test_a_one_shot_service_is_done_and_its_dependents_start_after_it() -> None:
    journal: list[str] = []
    sv = Supervisor(name="migrate")
    sv.add(Recorder("api", journal), depends_on=["migrate"])

    @sv.service(oneshot=True)
    async def migrate() -> None:
        await asyncio.sleep(0)
        journal.append("migrated")

    async with sv:
        assert journal == ["migrated", "start api"]
        st = sv.status()
        assert st["migrate"].state is ServiceState.DONE
        assert st["migrate"].to_dict()["state"] == "done"
        assert st["api"].state == "running"
        assert sv.state is SupervisorState.RUNNING  # one service done is not the end
    assert sv.status()["migrate"].state == "done"  # the stop leaves it done
    assert journal[2:] == ["stop api"]


@bounded(10)
async def test_a_one_shot_service_that_crashes_follows_its_restart_policy() -> None:
    runs = 0
    sv = Supervisor(name="flaky")

    # The chat API may come up later: retry_startup retries its first crash too.
    @sv.service(oneshot=True, backoff=0, max_backoff=0, retry_startup=True)
    def announce() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ConnectionError("the chat API is down")

    async with sv:
        st = sv.status()["announce"]
        assert (st.state, st.restarts, runs) == ("done", 2, 3)
        assert isinstance(st.last_error, ConnectionError)


@bounded(10)
async def test_a_one_shot_service_that_fails_for_good_fails_the_supervisor() -> None:
    journal: list[str] = []
    sv = Supervisor(name="broken")
    sv.add(Recorder("api", journal), depends_on=["migrate"])

    @sv.service(oneshot=True, restart="no")
    async def migrate() -> None:
        raise RuntimeError("column exists")

    with pytest.raises(ServiceFailed, match="'migrate' failed: it crashed") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert journal == []  # its dependent never started


@bounded(10)
async def test_a_supervisor_of_one_shot_services_stops_once_all_are_done() -> None:
    sv = Supervisor(name="batch")
    done: list[str] = []

    def job(name: str) -> Callable[[], None]:
        return lambda: done.append(name)

    for n in ("a", "b"):
        sv.service(oneshot=True, name=n)(job(n))
    await sv.serve()
    assert done == ["a", "b"]
    assert sv.state is SupervisorState.STOPPED
    assert {st.state for st in sv.status().values()} == {ServiceState.DONE}


def test_a_one_shot_service_cannot_restart_always() -> None:
    sv = Supervisor()
    with pytest.raises(ValueError, match="one-shot service 'api' cannot have restart='always'"):
        sv.add(Recorder("api", []), oneshot=True, restart="always")


def test_the_decorator_takes_the_same_start_options_as_add() -> None:
    sv = Supervisor()

    @sv.service(depends_on=["db"], oneshot=True, retry_startup=True)
    async def migrate() -> None:
        pass

    entry = sv._entries["migrate"]
    assert (entry.depends_on, entry.oneshot, entry.policy.retry_startup) == (("db",), True, True)


@bounded(10)
async def test_a_periodic_job_starts_after_its_dependencies() -> None:
    journal: list[str] = []
    sv = Supervisor(name="jobs")
    ran = asyncio.Event()

    @sv.every(3600, depends_on=["db"])
    async def digest() -> None:
        journal.append("digest")
        ran.set()

    sv.add(Recorder("db", journal))
    async with sv:
        await asyncio.wait_for(ran.wait(), QUICK_WAIT)
        assert journal == ["start db", "digest"]
        assert list(sv.services) == ["db", "digest"]


@bounded(10)
async def test_json_logs_show_a_one_shot_service_running_then_done() -> None:
    out = io.StringIO()
    handler = make_handler("json", out)
    logger = logging.getLogger("offloop")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    sv = Supervisor(name="json-once")
    sv.service(oneshot=True, name="migrate")(_noop)
    try:
        await sv.serve()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    states = [o["state"] for o in lines if o.get("event") == "service"]
    assert states == ["starting", "running", "done"]


async def _noop() -> None:
    pass

"""A service that fails before it is ready: a start-up error, not a crash to retry."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import flask
import pytest

from offloop import ServiceFailed, Supervisor, WatchService, WSGIService
from offloop._core.restart import RestartPolicy
from tests.helpers import await_until, bounded
from tests.supervisor.test_supervisor import Recorder

# Every test is bounded well below the restart policy's default retries (5
# restarts with a backoff from 0.5 s doubling to 30 s: 20 s and more), so a
# start-up error that is retried fails the test by its timeout.


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_start_up_error_fails_the_supervisor_at_once_with_the_error_as_cause() -> None:
    journal: list[str] = []
    sv = Supervisor(name="sv")
    sv.add(Recorder("db", journal))
    sv.add(Recorder("api", journal, start_failures=1))  # the default policy, "on-failure"
    with pytest.raises(ServiceFailed) as info:
        async with sv:
            pytest.fail("the body must not run")
    assert info.value.service == "api"
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert str(info.value) == (
        "Service 'api' failed: it failed to start (before it was ready), which is not retried; "
        "fix the error, or add the service with retry_startup=True to retry its start-up as "
        "its restart policy says; last error: ConnectionRefusedError('api cannot start')."
    )
    assert journal == ["start db", "start api", "stop db"]  # tried once, not restarted
    assert sv.status()["api"].state == "failed"
    assert sv.status()["api"].restarts == 0


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_serve_fails_at_once_on_a_port_in_use() -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sv = Supervisor(name="sv")
        sv.add(WSGIService(flask.Flask("app"), port=port, name="web"))
        with pytest.raises(ServiceFailed, match="'web' failed: it failed to start") as info:
            await sv.serve()
    finally:
        taken.close()
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.EADDRINUSE or f":{port}" in str(cause), repr(cause)
    assert sv.status()["web"].restarts == 0


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_serve_fails_at_once_on_a_missing_watch_path(tmp_path: Path) -> None:
    sv = Supervisor(name="sv")
    sv.add(WatchService(tmp_path / "missing", lambda events: None, name="watch"))
    with pytest.raises(ServiceFailed, match="'watch' failed: it failed to start") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert sv.status()["watch"].restarts == 0


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_retry_startup_retries_start_up_errors_as_the_policy_says() -> None:
    journal: list[str] = []
    sv = Supervisor()
    sv.add(
        Recorder("api", journal, start_failures=5),
        backoff=0,
        max_backoff=0,
        max_restarts=2,
        retry_startup=True,
    )
    with pytest.raises(ServiceFailed, match="needed more than max_restarts=2 restarts") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert journal == ["start api"] * 3


class CrashesWhenTold(Recorder):
    """A Recorder that is ready, then crashes when ``crash()`` is called."""

    def crash(self) -> None:
        self.crashing = True
        assert self._ended is not None
        self._ended.set()

    async def wait(self) -> None:
        self.crashing = False
        await super().wait()
        if self.crashing:
            raise ConnectionResetError(f"{self.name} lost its database")


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_start_that_fails_on_a_restart_follows_the_restart_policy() -> None:
    # Once the service has been ready, its configuration worked: a start that
    # fails on a restart (its database still down) is what restarts are for.
    journal: list[str] = []
    api = CrashesWhenTold("api", journal)
    sv = Supervisor()
    sv.add(api, backoff=0, max_backoff=0)
    async with sv:
        api.start_failures = 2
        api.crash()
        await await_until(lambda: sv.status()["api"].restarts == 3, what="three restarts")
        await await_until(lambda: sv.status()["api"].state == "running", what="running again")
        assert journal == ["start api"] * 4
    assert sv.status()["api"].state == "stopped"


def test_retry_startup_must_be_a_bool() -> None:
    assert RestartPolicy().retry_startup is False
    with pytest.raises(TypeError, match="retry_startup must be True or False, got str"):
        RestartPolicy(retry_startup="yes")  # type: ignore[arg-type]

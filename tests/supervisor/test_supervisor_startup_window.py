"""A function service that crashes soon after it started has failed to start, not crashed.

A function service is ready as soon as its task, thread or child runs, before
its code has done anything; its start-up window (``startup_window``, 1 s by
default, as supervisord's ``startsecs``) makes a crash that soon after its
first start a start-up error, like an adapter's ``start()`` that raised: not
retried unless ``retry_startup=True``. These tests count restarts rather than
time the failure: a start-up error that were retried would show restarts > 0
(and take the backoff's tens of seconds, beyond each test's bound).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import Any

import pytest

from offloop import ServiceFailed, StopToken, Supervisor
from offloop._core.restart import STARTUP_WINDOW, RestartPolicy
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_supervisor import Recorder
from tests.supervisor.test_supervisor_cascade import Crashable
from tests.supervisor.test_supervisor_startup import CrashesWhenTold


# At a module's top level, so that isolate="process" can run them in a child.
async def bad_token_async() -> None:
    raise PermissionError("401 Unauthorized: the bot token was rejected")


def bad_token_sync() -> None:
    raise PermissionError("401 Unauthorized: the bot token was rejected")


STARTUP_FAILURE = re.compile(
    r"Service 'bot' failed: it crashed \d+\.\d\ds after it started, within its "
    r"startup_window=(?P<window>[\d.]+)s, so it failed to start, which is not retried; fix "
    r"the error, or add the service with retry_startup=True to retry its start-up as its "
    r"restart policy says; last error: PermissionError\('401 Unauthorized: the bot token "
    r"was rejected'\)\."
)

KINDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "async": (bad_token_async, {}),
    "loop": (bad_token_async, {"isolate": "loop"}),
    "thread": (bad_token_sync, {}),
    # A child's error crosses a pipe back: a loaded machine must not push it
    # past the default window, so this kind gets a wider one.
    "process": (bad_token_sync, {"isolate": "process", "startup_window": QUICK_WAIT}),
}


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", sorted(KINDS))
@bounded(20)
async def test_a_bad_token_fails_the_supervisor_at_once_with_the_error_as_cause(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    fn, options = KINDS[kind]
    journal: list[str] = []
    sv = Supervisor(name="sv")
    sv.add(Recorder("db", journal))
    sv.service(name="bot", depends_on=["db"], **options)(fn)
    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    assert info.value.service == "bot"
    cause = info.value.__cause__
    assert isinstance(cause, PermissionError), repr(cause)
    match = STARTUP_FAILURE.fullmatch(str(info.value))
    assert match is not None, str(info.value)
    assert float(match["window"]) == options.get("startup_window", STARTUP_WINDOW)
    status = sv.status()["bot"]
    assert (status.state, status.restarts) == ("failed", 0)
    assert journal == ["start db", "stop db"]
    messages = caplog.messages
    assert any(
        m.startswith("sv: service 'bot' failed to start: PermissionError(") for m in messages
    )
    assert not [m for m in messages if "restarting service" in m]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_retry_startup_retries_a_crash_within_the_window_as_the_policy_says() -> None:
    runs = 0
    sv = Supervisor(name="sv")

    @sv.service(name="bot", backoff=0, max_backoff=0, max_restarts=2, retry_startup=True)
    async def bot() -> None:
        nonlocal runs
        runs += 1
        await bad_token_async()

    with pytest.raises(ServiceFailed, match="needed more than max_restarts=2 restarts") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, PermissionError)
    assert (runs, sv.status()["bot"].restarts) == (3, 2)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_crash_after_the_window_is_restarted_and_only_the_first_run_has_one() -> None:
    loop = asyncio.get_running_loop()
    runs = 0
    crash = asyncio.Event()
    sv = Supervisor(name="sv")

    @sv.service(startup_window=0.05, backoff=0, max_backoff=0)
    async def bot() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await crash.wait()
            raise ConnectionResetError("the API closed the connection")
        if runs == 2:  # at once, but no longer the first run: a crash
            raise ConnectionResetError("the API is still gone")
        await asyncio.Event().wait()

    async with sv:
        record = sv._entries["bot"]
        until = record.startup_until
        assert until is not None
        # Out of the window on the clock the supervisor measures it with.
        await asyncio.sleep(until - loop.time())
        crash.set()
        await await_until(lambda: runs == 3, QUICK_WAIT, "two restarts")
        await await_until(lambda: sv.status()["bot"].state == "running", QUICK_WAIT)
        assert sv.status()["bot"].restarts == 2
        assert repr(sv.status()["bot"].last_error) == (
            "ConnectionResetError('the API is still gone')"
        )
        assert record.startup_until is None
    assert sv.status()["bot"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_readiness_does_not_wait_for_the_window_and_a_crash_in_it_ends_the_body() -> None:
    loop = asyncio.get_running_loop()
    crash = asyncio.Event()
    sv = Supervisor(name="sv")

    @sv.service(name="bot", startup_window=60)
    async def bot() -> None:
        await crash.wait()
        await bad_token_async()

    async def body() -> None:
        async with sv:
            # Entered (every service ready) long before its 60 s window ends.
            until = sv._entries["bot"].startup_until
            assert until is not None
            assert loop.time() < until
            assert sv.status()["bot"].state == "running"
            crash.set()
            await asyncio.sleep(QUICK_WAIT)  # the failure cuts the body short
            pytest.fail("the start-up failure did not end the body")

    with pytest.raises(ServiceFailed) as info:
        await body()
    assert STARTUP_FAILURE.fullmatch(str(info.value)) is not None, str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)
    assert sv.status()["bot"].restarts == 0


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_start_returns_before_the_window_ends() -> None:
    loop = asyncio.get_running_loop()
    sv = Supervisor(name="sv")

    @sv.service(startup_window=60)
    def worker(token: StopToken) -> None:
        token.wait()

    await sv.start()
    try:
        until = sv._entries["worker"].startup_until
        assert until is not None
        assert loop.time() < until
        await sv.wait_ready()
    finally:
        await sv.aclose()
    assert sv.status()["worker"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_function_that_returns_within_the_window_ends_as_its_mode_says() -> None:
    sv = Supervisor(name="sv")

    @sv.service(oneshot=True)
    async def migrate() -> None:
        pass

    @sv.service
    def announce() -> None:
        pass

    await sv.serve()  # both ended at once, neither is a failure to start
    status = sv.status()
    assert {n: (s.state, s.restarts) for n, s in status.items()} == {
        "migrate": ("done", 0),
        "announce": ("stopped", 0),
    }


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_job_whose_first_run_raises_at_once_fails_to_start() -> None:
    runs = 0
    sv = Supervisor(name="sv")

    @sv.every(3600, name="bot")  # first=0: the first run comes at once
    async def poll() -> None:
        nonlocal runs
        runs += 1
        await bad_token_async()

    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    assert STARTUP_FAILURE.fullmatch(str(info.value)) is not None, str(info.value)
    assert (runs, sv.status()["bot"].restarts) == (1, 0)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_job_with_retry_startup_is_restarted() -> None:
    runs = 0
    sv = Supervisor(name="sv")

    @sv.every(3600, backoff=0, max_backoff=0, max_restarts=1, retry_startup=True)
    def poll() -> None:
        nonlocal runs
        runs += 1
        bad_token_sync()

    with pytest.raises(ServiceFailed, match="needed more than max_restarts=1 restarts"):
        await sv.serve()
    assert (runs, sv.status()["poll"].restarts) == (2, 1)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_an_added_service_gets_a_window_only_when_asked() -> None:
    journal: list[str] = []
    api = CrashesWhenTold("api", journal)
    sv = Supervisor(name="sv")
    sv.add(api, startup_window=60)

    async def body() -> None:
        async with sv:
            api.crash()
            await asyncio.sleep(QUICK_WAIT)  # the failure cuts the body short
            pytest.fail("the start-up failure did not end the body")

    with pytest.raises(ServiceFailed, match=r"it crashed .* within its startup_window=60s") as info:
        await body()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert journal == ["start api"]
    assert sv._entries["api"].policy.startup_window == 60
    assert RestartPolicy().startup_window == 0  # sv.add()'s default: start() is its readiness


BAD_WINDOWS = [
    (-1, ValueError, "startup_window must be at least 0 seconds, got -1."),
    (math.nan, ValueError, "startup_window must be at least 0 seconds, got nan."),
    (math.inf, ValueError, "startup_window must be a finite number of seconds, got inf."),
    ("1", TypeError, "startup_window must be a number of seconds, got str"),
    (True, TypeError, "startup_window must be a number of seconds, got bool"),
]


@pytest.mark.parametrize(("window", "error", "message"), BAD_WINDOWS)
def test_a_bad_startup_window_is_refused_before_anything_is_added(
    window: Any, error: type[Exception], message: str
) -> None:
    sv = Supervisor()
    with pytest.raises(error, match=re.escape(message)):
        sv.service(startup_window=window)(bad_token_async)
    with pytest.raises(error, match=re.escape(message)):
        sv.add(Recorder("api", []), startup_window=window)
    with pytest.raises(error, match=re.escape(message)):
        sv.every(1, startup_window=window)
    with pytest.raises(error, match=re.escape(message)):
        sv.cron("* * * * *", startup_window=window)
    assert sv.services == {}


def test_retry_startup_of_a_job_must_be_a_bool() -> None:
    sv = Supervisor()
    with pytest.raises(TypeError, match="retry_startup must be True or False, got str"):
        sv.every(1, retry_startup="yes")  # type: ignore[arg-type]
    assert sv.services == {}


class DeafThenRefused(Recorder):
    """Ignores its stop (it is killed), then refuses its next start once."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.release = asyncio.Event()

    async def stop(self) -> None:
        self.journal.append(f"stop {self.name}")
        await self.release.wait()  # never set: the supervisor kills it after grace

    def kill(self) -> list[str]:
        self.journal.append(f"kill {self.name}")
        self.start_failures = 1  # as an adapter left "still stopping" refuses
        return []


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_start_refused_after_a_kill_within_the_window_follows_the_restart_policy() -> None:
    # The window "applies to the first run only" and "once a service has been
    # ready, a start() that fails on a restart follows the restart policy". A
    # first run killed by a cascade (its task cancelled) kept its window open,
    # so the next start's error failed the supervisor, as "it crashed 0.11s
    # after it started" (neither a crash nor the first run).
    journal: list[str] = []
    sv = Supervisor(name="sv", grace=0.05)
    db = sv.add(Crashable("db", journal), backoff=0.01, max_backoff=0.01)
    sv.add(
        DeafThenRefused("api", journal),
        depends_on=["db"],
        startup_window=QUICK_WAIT,
        backoff=0.01,
        max_backoff=0.01,
    )
    async with sv:
        db.crash()  # the cascade stops api within its window; it is killed
        await await_until(
            lambda: sv.status()["api"].restarts == 1 and sv.status()["api"].state == "running",
            QUICK_WAIT,
            "api restarted by its policy after its refused start",
        )
        assert sv.state == "running"
        status = sv.status()["api"]
        assert isinstance(status.last_error, ConnectionRefusedError)
        assert status.dependency_restarts == 1
        after_kill = journal[journal.index("kill api") :]
        assert after_kill.count("start api") == 2, journal

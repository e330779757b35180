"""start_timeout: a start() that never returns is cancelled, the service stopped, and it fails."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
from collections.abc import AsyncIterator

import pytest

import offloop
from offloop import Service, ServiceFailed, Supervisor
from tests.helpers import WAIT, await_until
from tests.supervisor.test_supervisor import Recorder


class Hangs(Service):
    """A service whose start number ``i`` never returns when ``hangs[i]`` is true.

    Records how many starts began, how many of them were cancelled (their
    ``finally`` ran), and each ``stop()`` and ``kill()``.
    """

    def __init__(self, name: str, hangs: list[bool], *, stop_waits: bool = False) -> None:
        self.name = name
        self.hangs = hangs
        self.starts = 0
        self.cancelled_starts = 0
        self.stops = 0
        self.kills = 0
        self.start_cancelled = asyncio.Event()
        self.hanging = asyncio.Event()
        self.in_stop = asyncio.Event()
        # stop() waits for this when stop_waits: a cleanup that takes its time.
        self.release_stop = asyncio.Event()
        self.stop_waits = stop_waits
        self._ended: asyncio.Event | None = None
        self._crash = False

    async def start(self) -> None:
        i, self.starts = self.starts, self.starts + 1
        if i < len(self.hangs) and self.hangs[i]:
            self.hanging.set()
            try:
                await asyncio.Event().wait()  # a server that never binds
            finally:
                self.cancelled_starts += 1
                self.start_cancelled.set()
        self._ended, self._crash = asyncio.Event(), False

    async def wait(self) -> None:
        assert self._ended is not None
        await self._ended.wait()
        if self._crash:
            raise ConnectionResetError(f"{self.name} lost its connection")

    async def stop(self) -> None:
        self.stops += 1
        self.in_stop.set()
        if self.stop_waits:
            await self.release_stop.wait()
        if self._ended is not None:
            self._ended.set()

    def kill(self) -> list[str]:
        self.kills += 1
        return []

    def crash(self) -> None:
        assert self._ended is not None
        self._crash = True
        self._ended.set()


async def _enter(sv: Supervisor) -> None:
    async with sv:
        pytest.fail("the body must not run: a service never became ready")


async def test_a_start_beyond_start_timeout_is_cancelled_and_fails_the_supervisor(
    log_lines: io.StringIO,
) -> None:
    journal: list[str] = []
    sv = Supervisor(name="sv")
    sv.add(Recorder("db", journal))
    api = sv.add(Hangs("api", [True]), start_timeout=0.2)
    with pytest.raises(ServiceFailed) as info:
        await asyncio.wait_for(_enter(sv), WAIT)
    assert info.value.service == "api"
    assert str(info.value) == (
        "Service 'api' failed: it did not become ready within start_timeout=0.2s (its "
        "start() was cancelled and the service stopped), and a failure to start is not "
        "retried; raise start_timeout if it needs longer to start, or add the service with "
        "retry_startup=True to retry its start-up as its restart policy says; last error: "
        "StartTimeout(\"The start() of service 'api' did not return within "
        'start_timeout=0.2s.").'
    )
    cause = info.value.__cause__
    assert isinstance(cause, offloop.StartTimeout)
    assert isinstance(cause, TimeoutError)
    # Its start was cancelled (its finally ran) and stop() cleaned up after it,
    # once: the shutdown that followed did not stop it again.
    assert api.start_cancelled.is_set()
    assert (api.starts, api.cancelled_starts, api.stops, api.kills) == (1, 1, 1, 0)
    assert journal == ["start db", "stop db"]
    status = sv.status()["api"]
    assert (status.state, status.restarts, status.last_error) == ("failed", 0, cause)
    events = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    assert any(
        e["level"] == "WARNING" and "did not become ready within start_timeout=0.2s" in e["message"]
        for e in events
    ), events


async def test_retry_startup_retries_a_start_that_timed_out() -> None:
    sv = Supervisor(name="sv")
    api = sv.add(
        Hangs("api", [True]),
        start_timeout=0.2,
        retry_startup=True,
        backoff=0.01,
        max_backoff=0.01,
    )

    async def body() -> None:
        async with sv:
            assert sv.state.value == "running"
            status = sv.status()["api"]
            assert (status.state, status.restarts) == ("running", 1)
            assert isinstance(status.last_error, TimeoutError)
            assert (api.starts, api.cancelled_starts, api.stops) == (2, 1, 1)

    await asyncio.wait_for(body(), WAIT)
    assert api.stops == 2
    assert sv.status()["api"].state == "stopped"


async def test_a_restart_whose_start_times_out_is_a_crash_under_the_policy() -> None:
    sv = Supervisor(name="sv")
    # Start 0 is ready at once (the limit does not touch a start that returns);
    # the first restart's start hangs; the second one's is ready again.
    api = sv.add(Hangs("api", [False, True]), start_timeout=0.2, backoff=0.01, max_backoff=0.01)

    async def body() -> None:
        async with sv:
            assert api.cancelled_starts == 0
            api.crash()
            await await_until(
                lambda: api.starts == 3 and sv.status()["api"].state == "running",
                what="the second restart",
            )
            status = sv.status()["api"]
            assert status.restarts == 2
            assert isinstance(status.last_error, TimeoutError)
            assert (api.cancelled_starts, api.stops, api.kills) == (1, 1, 0)

    await asyncio.wait_for(body(), WAIT)


@pytest.mark.loops("asyncio")
async def test_a_start_within_start_timeout_keeps_its_own_error() -> None:
    journal: list[str] = []
    sv = Supervisor(name="sv")
    sv.add(Recorder("api", journal, start_failures=1), start_timeout=5)
    with pytest.raises(ServiceFailed, match="'api' failed: it failed to start") as info:
        await asyncio.wait_for(sv.serve(), WAIT)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@pytest.mark.loops("asyncio")
async def test_a_timed_out_start_whose_stop_outlives_grace_is_killed() -> None:
    sv = Supervisor(name="sv", grace=0.1)
    api = sv.add(Hangs("api", [True], stop_waits=True), start_timeout=0.1)
    with pytest.raises(ServiceFailed, match=r"within start_timeout=0\.1s"):
        await asyncio.wait_for(sv.serve(), WAIT)
    assert (api.cancelled_starts, api.stops, api.kills) == (1, 1, 1)
    api.release_stop.set()  # nothing waits on it any more: its stop() was cancelled


@pytest.mark.loops("asyncio")
async def test_a_shutdown_during_the_stop_of_a_timed_out_start_waits_for_that_stop() -> None:
    sv = Supervisor(name="sv")
    api = sv.add(Hangs("api", [True], stop_waits=True), start_timeout=0.1)
    serving = asyncio.get_running_loop().create_task(sv.serve())
    try:
        await asyncio.wait_for(api.in_stop.wait(), WAIT)
        sv.stop()  # before the timed-out start's stop() ended
        await await_until(lambda: sv.state.value == "stopping", what="the shutdown")
        api.release_stop.set()
        await asyncio.wait_for(serving, WAIT)  # a stop, not a failure: no ServiceFailed
    finally:
        serving.cancel()
    status = sv.status()["api"]
    assert status.state == "stopped"
    assert isinstance(status.last_error, TimeoutError)
    # One stop(): the shutdown waited for the one under way instead of racing it.
    assert (api.cancelled_starts, api.stops, api.kills) == (1, 1, 0)


@pytest.mark.loops("asyncio")
async def test_a_start_timing_out_during_a_shutdown_is_killed_by_the_shutdowns_deadline(
    log_lines: io.StringIO,
) -> None:
    # The restart's start of 'a' hangs; a shutdown begins; 'b' (stopped
    # first) uses up the grace period; 'a' times out meanwhile, and the stop
    # of its start would run grace past that: the shutdown kills it by its own
    # deadline instead of overrunning.
    sv = Supervisor(name="sv", grace=0.5)
    a = sv.add(
        Hangs("a", [False, True], stop_waits=True),
        start_timeout=0.4,
        backoff=0.01,
        max_backoff=0.01,
    )
    b = sv.add(Hangs("b", [], stop_waits=True))
    serving = asyncio.get_running_loop().create_task(sv.serve())
    try:
        await await_until(lambda: sv.state.value == "running", what="the start")
        a.crash()
        await asyncio.wait_for(a.hanging.wait(), WAIT)
        sv.stop()
        await asyncio.wait_for(serving, WAIT)
    finally:
        serving.cancel()
    assert (b.stops, b.kills) == (1, 1)
    assert (a.cancelled_starts, a.stops, a.kills) == (1, 1, 1)
    assert sv.status()["a"].state == "stopped"
    assert "did not stop within the grace period after its start timed out" in (
        log_lines.getvalue()
    )
    a.release_stop.set()
    b.release_stop.set()


BAD = [
    (0, ValueError, "start_timeout must be a positive, finite number of seconds or None, got 0"),
    (-1, ValueError, "got -1"),
    (math.nan, ValueError, "got nan"),
    (math.inf, ValueError, "got inf"),
    (10**400, ValueError, "digit number"),
    ("5", TypeError, "start_timeout must be a number of seconds or None, got str '5'"),
    (True, TypeError, "start_timeout must be a number of seconds or None, got bool"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD)
def test_a_bad_start_timeout_is_refused_before_anything_is_registered(
    value: object, error: type[Exception], message: str
) -> None:
    sv = Supervisor(name="sv")

    def job() -> None:
        pass

    for register in (
        lambda: sv.add(Hangs("api", []), start_timeout=value),  # type: ignore[arg-type]
        lambda: sv.service(start_timeout=value)(job),  # type: ignore[call-overload]
        lambda: sv.every(1, start_timeout=value)(job),  # type: ignore[arg-type]
        lambda: sv.cron("* * * * *", start_timeout=value)(job),  # type: ignore[arg-type]
    ):
        with pytest.raises(error, match="start_timeout") as info:
            register()
        assert message in str(info.value)
        assert "or None (the default) for no limit" in str(info.value)
    assert sv.services == {}


@pytest.mark.loops("asyncio")
async def test_an_asgi_app_whose_lifespan_startup_hangs_is_cancelled_and_closed() -> None:
    # A real adapter: uvicorn waits for the app's lifespan startup before it
    # listens; the app's startup (a database that never answers) hangs.
    from starlette.applications import Starlette

    from offloop import ASGIService

    cancelled = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        yield

    sv = Supervisor(name="sv")
    web = sv.add(ASGIService(Starlette(lifespan=lifespan), port=0, name="web"), start_timeout=0.2)
    with pytest.raises(ServiceFailed, match="'web' failed: it did not become ready within"):
        await asyncio.wait_for(sv.serve(), WAIT)
    assert cancelled.is_set()
    assert web.state.value == "crashed"
    assert sv.status()["web"].state == "failed"

"""ASGIService: a real Starlette app under uvicorn on the supervisor's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from offloop import ASGIService, Supervisor
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import bounded, http_get, refuses, stop_during_start


def make_app(
    journal: list[str], *, fail_startup: bool = False, fail_shutdown: bool = False
) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        journal.append("startup")
        if fail_startup:
            raise ConnectionError("database is down")
        yield
        journal.append("shutdown")
        if fail_shutdown:
            raise OSError("flush failed")

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello asgi")

    return Starlette(routes=[Route("/", index)], lifespan=lifespan)


@bounded(20)
async def test_lifespan_is_honoured_and_the_port_closes_on_stop() -> None:
    journal: list[str] = []
    svc = ASGIService(make_app(journal), port=0, name="asgi-api", access_log=False)
    assert repr(svc) == "<ASGIService 'asgi-api' idle 127.0.0.1:0 lifespan=auto>"
    await svc.start()
    assert journal == ["startup"]  # start() returns after the lifespan startup
    assert svc.port != 0
    assert repr(svc) == f"<ASGIService 'asgi-api' running url={svc.url} lifespan=auto>"
    assert await http_get(svc.url) == (200, "hello asgi")
    waiter = asyncio.ensure_future(svc.wait())
    await svc.stop()
    await asyncio.wait_for(waiter, WAIT)
    assert journal == ["startup", "shutdown"]  # stop() returns after the lifespan shutdown
    assert refuses(svc.port)
    await svc.start()  # restartable, on the same port
    assert await http_get(svc.url) == (200, "hello asgi")
    await svc.stop()
    assert journal == ["startup", "shutdown", "startup", "shutdown"]


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_uvicorn_installs_no_signal_handler() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    svc = ASGIService(make_app([]), port=0, access_log=False)
    await svc.start()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    await svc.stop()
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_failing_lifespan_startup_fails_start_without_exiting() -> None:
    journal: list[str] = []
    svc = ASGIService(make_app(journal, fail_startup=True), port=0, lifespan="on", name="api")
    # uvicorn would sys.exit(3) here; the service raises instead.
    with pytest.raises(
        RuntimeError, match=r"<ASGIService 'api' .* could not start: uvicorn gave up"
    ) as info:
        await svc.start()
    assert journal == ["startup"]
    assert svc.state.value == "crashed"
    assert svc.port != 0  # the port it had bound, named in the error too
    assert f"127.0.0.1:{svc.port}" in str(info.value)
    # The app's own error, not only "see the log".
    assert "lifespan startup failed (ConnectionError: database is down)" in str(info.value)
    assert refuses(svc.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_failing_lifespan_shutdown_is_reported_by_wait() -> None:
    journal: list[str] = []
    svc = ASGIService(make_app(journal, fail_shutdown=True), port=0, lifespan="on", name="api")
    await svc.start()
    await svc.stop()
    assert journal == ["startup", "shutdown"]
    # uvicorn only logged it, and the service ended as if all went well.
    with pytest.raises(RuntimeError, match=r"lifespan shutdown failed \(OSError: flush failed\)"):
        await svc.wait()


def raw_app(journal: list[str], *, raise_at: str) -> Any:
    """A plain ASGI app whose lifespan raises (Starlette would send lifespan.*.failed instead)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            raise ConnectionError("no http in this test")
        while True:
            message = await receive()
            phase = message["type"].split(".")[1]  # startup or shutdown
            journal.append(phase)
            if phase == raise_at:
                raise ConnectionError(f"{phase} went wrong")
            await send({"type": f"lifespan.{phase}.complete"})
            if phase == "shutdown":
                return

    return app


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_an_app_raising_in_its_lifespan_startup_is_named_by_start() -> None:
    # lifespan="on": uvicorn logs the exception and exits(3); the error names it too.
    journal: list[str] = []
    svc = ASGIService(raw_app(journal, raise_at="startup"), port=0, lifespan="on", name="api")
    with pytest.raises(RuntimeError, match=r"could not start: uvicorn gave up") as info:
        await svc.start()
    assert journal == ["startup"]
    assert "lifespan startup failed (ConnectionError: startup went wrong)" in str(info.value)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_an_app_raising_in_its_lifespan_shutdown_is_reported_by_wait() -> None:
    journal: list[str] = []
    svc = ASGIService(raw_app(journal, raise_at="shutdown"), port=0, lifespan="on", name="api")
    await svc.start()
    await svc.stop()
    assert journal == ["startup", "shutdown"]
    # uvicorn logged "Application shutdown failed"; the service must not end as if all went well.
    with pytest.raises(
        RuntimeError, match=r"lifespan shutdown failed \(ConnectionError: shutdown went wrong\)"
    ):
        await svc.wait()


def test_bad_arguments_are_named() -> None:
    app = make_app([])
    with pytest.raises(TypeError, match=r"ASGIService\(app\) needs an ASGI application"):
        ASGIService("main:app")

    def create_app() -> Starlette:
        return make_app([])

    with pytest.raises(TypeError, match=r"app\(scope, receive, send\), but function"):
        ASGIService(create_app)
    with pytest.raises(ValueError, match=r"lifespan=\.\.\.\) must be 'auto', 'on' or 'off'"):
        ASGIService(app, lifespan="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"log_level=\.\.\.\) must be one of"):
        ASGIService(app, log_level="loud")


@pytest.mark.loops("asyncio", "uvloop")
@bounded(20)
async def test_under_a_supervisor() -> None:
    journal: list[str] = []
    sv = Supervisor(name="site", grace=2.0)
    api = sv.add(ASGIService(make_app(journal), port=0, name="api", access_log=False))
    async with sv:
        assert sv.status()["api"].state == "running"
        assert await http_get(api.url) == (200, "hello asgi")
    assert journal == ["startup", "shutdown"]
    assert sv.status()["api"].state == "stopped"
    assert refuses(api.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_kill_cancels_the_requests_and_the_lifespan_left_on_the_loop() -> None:
    journal: list[str] = []
    entered = asyncio.Event()
    ours = asyncio.all_tasks()  # the test's own (bounded() runs it in a second task)

    async def hang(request: Request) -> PlainTextResponse:
        entered.set()
        await asyncio.sleep(3600)  # outlives the grace period
        return PlainTextResponse("late")

    app = make_app(journal)
    app.router.routes.append(Route("/hang", hang))
    svc = ASGIService(app, port=0, name="asgi-hang", access_log=False)
    sv = Supervisor(grace=0.2, name="sv")
    sv.add(svc)
    async with sv:
        _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(entered.wait(), WAIT)
    writer.close()
    assert sv.status()["asgi-hang"].state == "stopped"
    assert journal == ["startup"]  # killed: no lifespan shutdown
    # kill() cancelled the request and the lifespan; each ends on its next step.
    left = asyncio.all_tasks() - ours
    await asyncio.wait_for(asyncio.gather(*left, return_exceptions=True), WAIT)
    assert asyncio.all_tasks() - ours == set()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_access_logs_and_levels_are_per_service_not_process_wide(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error_logger = logging.getLogger("uvicorn.error")
    before = error_logger.level
    error_logger.setLevel(logging.INFO)  # the program's own choice
    try:
        loud = ASGIService(make_app([]), port=0, name="loud", lifespan="off")
        quiet = ASGIService(make_app([]), port=0, name="quiet", lifespan="off", access_log=False)
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            await loud.start()
            await quiet.start()  # used to drop the access log's handlers for everyone
            try:
                assert await http_get(loud.url + "/") == (200, "hello asgi")
                assert await http_get(quiet.url + "/") == (200, "hello asgi")
            finally:
                await quiet.stop()
                await loud.stop()
        access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
        assert len(access) == 1, access  # the loud service's request only
        assert error_logger.level == logging.INFO  # not reset to the services' "warning"
    finally:
        error_logger.setLevel(before)


class Asgi2App:
    """An ASGI 2 app: constructed with the scope, then called with receive and send."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi2 ok"})


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_an_asgi2_app_is_served_not_taken_for_a_factory() -> None:
    svc = ASGIService(Asgi2App, port=0, lifespan="off", access_log=False)
    await svc.start()
    try:
        assert await http_get(svc.url + "/") == (200, "asgi2 ok")
    finally:
        await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_log_level_applies_to_loggers_nobody_configured() -> None:
    names = ("uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        svc = ASGIService(make_app([]), port=0, lifespan="off", log_level="info")
        await svc.start()
        await svc.stop()
        # The access log too: log_level="info" shows the access lines, as before.
        assert {name: logging.getLogger(name).level for name in names} == dict.fromkeys(
            names, logging.INFO
        )
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_stop_during_start_waits_for_the_start_then_stops() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    journal: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        entered.set()
        await release.wait()
        yield
        journal.append("shutdown")

    svc = ASGIService(Starlette(lifespan=lifespan), port=0, access_log=False)
    await stop_during_start(svc, entered, release)
    assert journal == ["shutdown"]


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_start_cancelled_in_the_lifespan_startup_cancels_the_lifespan() -> None:
    # uvicorn runs the lifespan in a task of its own: cancelling serve() alone
    # would leave the app waiting in its startup (the conftest fails a test
    # that leaves a task on its loop).
    entered, cancelled = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        entered.set()
        try:
            await asyncio.Event().wait()  # a database that never answers
        finally:
            cancelled.set()
        yield

    svc = ASGIService(Starlette(lifespan=lifespan), port=0, access_log=False)
    start = asyncio.create_task(svc.start())
    await asyncio.wait_for(entered.wait(), WAIT)
    start.cancel()
    await asyncio.wait({start}, timeout=WAIT)
    assert start.cancelled()
    assert cancelled.is_set()
    assert svc.state.value == "crashed"
    await svc.stop()  # as the supervisor does after a cancelled start: nothing to do


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_lifespan_startup_awaiting_stop_fails_the_start_instead_of_hanging() -> None:
    svc: ASGIService | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        assert svc is not None
        await svc.stop()
        yield

    svc = ASGIService(Starlette(lifespan=lifespan), port=0, access_log=False)
    with pytest.raises(RuntimeError) as info:
        await asyncio.wait_for(svc.start(), WAIT)
    starting = f"<ASGIService 'asgi' starting 127.0.0.1:{svc.port} lifespan=auto>"
    assert (
        f"the app's lifespan startup failed (RuntimeError: Cannot stop {starting} from within "
        f"its own start() (a startup hook awaiting stop())"
    ) in str(info.value)
    assert svc.state.value == "crashed"
    assert refuses(svc.port)

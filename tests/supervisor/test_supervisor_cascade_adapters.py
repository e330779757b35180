"""An adapter whose stop hangs in a cascade is killed, then starts again with the rest.

The same promise as test_supervisor_cascade_abandon.py, for the services that
serve or watch: each is made to hang in its stop by real work it waits for (a
request in flight that ignores the stop, a handler that never returns), is
killed after the grace period, and must start again and serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from offloop import AiohttpService, ASGIService, Service, Supervisor, WatchService, WSGIService
from tests.helpers import QUICK_WAIT, await_until, bounded, http_get
from tests.supervisor.test_supervisor_cascade import Crashable

GRACE = 0.1


class Hang:
    """What each service waits for in its stop: released at the end of the test."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.thread_release = threading.Event()
        self.task_release = asyncio.Event()

    async def release(self) -> None:
        self.thread_release.set()
        self.task_release.set()


def wsgi(hang: Hang, tmp: Path) -> tuple[Service, Callable[[Service], Awaitable[None]]]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            hang.entered.set()
            hang.thread_release.wait(QUICK_WAIT)  # ignores the service's token
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return WSGIService(app, port=0, name="api", access_log=False), serves


def asgi(hang: Hang, tmp: Path) -> tuple[Service, Callable[[Service], Awaitable[None]]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            hang.entered.set()
            await hang.task_release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return ASGIService(app, port=0, lifespan="off", name="api", access_log=False), serves


def aiohttp_app(hang: Hang, tmp: Path) -> tuple[Service, Callable[[Service], Awaitable[None]]]:
    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        hang.entered.set()
        await hang.task_release.wait()
        return web.Response(text="ok")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/", index)
    return AiohttpService(app, port=0, name="api", access_log=False), serves


def watch(hang: Hang, tmp: Path) -> tuple[Service, Callable[[Service], Awaitable[None]]]:
    seen: list[str] = []

    async def handler(event: Any) -> None:
        name = Path(event.src_path).name
        seen.append(name)
        if name == "slow.txt":
            hang.entered.set()
            await hang.task_release.wait()

    async def watches(svc: Service) -> None:
        target = tmp / "after.txt"
        target.write_text("x")
        await await_until(lambda: "after.txt" in seen, QUICK_WAIT, "an event after the restart")

    return WatchService(tmp, handler, name="api"), watches


async def serves(svc: Service) -> None:
    assert isinstance(svc, (WSGIService, ASGIService, AiohttpService))
    assert await http_get(svc.url + "/") == (200, "ok")


async def hang_it(svc: Service, tmp: Path) -> asyncio.Task[Any] | None:
    """Begin the work its stop will wait for; the client's task, if any."""
    if isinstance(svc, WatchService):
        (tmp / "slow.txt").write_text("x")
        return None
    assert isinstance(svc, (WSGIService, ASGIService, AiohttpService))
    return asyncio.get_running_loop().create_task(http_get(svc.url + "/slow"))


@pytest.mark.parametrize("make", [wsgi, asgi, aiohttp_app, watch], ids=lambda f: f.__name__)
@pytest.mark.loops("asyncio")
@bounded(10)
async def test_an_adapter_whose_stop_hangs_is_killed_and_serves_again(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    hang = Hang()
    sv = Supervisor(name="adapters", grace=GRACE)
    db = sv.add(Crashable("db", []), backoff=0.01, max_backoff=0.01)
    svc, works = make(hang, tmp_path)
    sv.add(svc, depends_on=["db"])
    client = None
    try:
        async with sv:
            client = await hang_it(svc, tmp_path)
            await await_until(hang.entered.is_set, QUICK_WAIT, "the work its stop waits for")
            db.crash()
            await await_until(
                lambda: (
                    sv.status()["api"].dependency_restarts == 1
                    and sv.status()["api"].state == "running"
                ),
                QUICK_WAIT,
                "api running again after db's restart",
            )
            assert sv.state == "running"
            assert sv.status()["api"].last_error is None
            assert "service 'api' did not stop within the grace period; killed it" in caplog.text
            await works(svc)
    finally:
        await hang.release()
        if client is not None:
            with contextlib.suppress(Exception):
                await client

"""Load: a few thousand real requests to Flask under a Supervisor while a bot coroutine ticks.

Only correctness is asserted here (every request answered, the bot ticked all
along); the bot's tick lateness under this load is measured in
``benchmarks/bench_services.py``.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import flask
import pytest

import offloop
from offloop import Supervisor, WSGIService
from offloop._services.wsgi import WSGIServer as WSGIServerName
from tests.helpers import bounded

REQUESTS = 3000  # "a few thousand"
CLIENTS = 8
QUARTERS = 4


def make_app() -> flask.Flask:
    app = flask.Flask("offloop_load")

    @app.get("/n/<int:n>")
    def echo(n: int) -> str:
        return f"{n}:{threading.current_thread().name}"

    return app


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read().decode()


@pytest.mark.slow
@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
@bounded(60)
async def test_every_request_is_answered_while_the_bot_keeps_ticking(
    server: WSGIServerName,
) -> None:
    sv = Supervisor(name="load", grace=5.0)
    web = sv.add(
        WSGIService(
            make_app(),
            port=0,
            server=server,
            threads=CLIENTS if server == "waitress" else None,  # werkzeug: a thread each
            access_log=False,
            name="web",
        )
    )
    done = 0
    ticks_at: list[int] = []  # how many requests were done at each bot tick

    @sv.service
    async def bot() -> None:
        while True:
            ticks_at.append(done)
            await asyncio.sleep(0.001)

    async def one(n: int) -> tuple[int, str]:
        nonlocal done
        result = await pool.run(fetch, f"{web.url}/n/{n}")
        done += 1
        return result

    async with sv, offloop.ThreadPool(CLIENTS, name="load-clients") as pool:
        results = await asyncio.gather(*(one(n) for n in range(REQUESTS)))
        assert sv.status()["web"].state == "running"
    assert [status for status, _ in results] == [200] * REQUESTS
    assert [body.split(":")[0] for _, body in results] == [str(n) for n in range(REQUESTS)]
    assert all(body.split(":")[1].startswith("offloop-wsgi-web-") for _, body in results)
    # The bot ticked in every quarter of the load, not just before and after it.
    quarters = {min(at * QUARTERS // REQUESTS, QUARTERS - 1) for at in ticks_at if at < REQUESTS}
    assert quarters == set(range(QUARTERS)), f"bot ticks per done-count: {ticks_at[:50]}..."

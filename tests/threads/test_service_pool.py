"""offloop's own services start and stop their servers outside the default pool.

A program whose ``to_thread`` calls fill every thread of the default pool must
still be able to stop its Flask server and its file watcher promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import flask
import pytest

import offloop
from offloop import WatchService, WSGIService
from offloop._threads.tothread import default_thread_pool, service_pool
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded, wsgi_threads


@contextlib.asynccontextmanager
async def saturated_default_pool() -> AsyncIterator[None]:
    """Every thread of the default pool blocked in user code, and one more call queued."""
    release = threading.Event()
    pool = default_thread_pool()
    calls = [offloop.to_thread(release.wait, WAIT * 4) for _ in range(pool.max_workers + 1)]
    try:
        await await_until(lambda: pool.statistics()["running"] == pool.max_workers, WAIT)
        assert pool.statistics()["queued"] == 1
        yield
    finally:
        release.set()
        await asyncio.wait_for(asyncio.gather(*calls), WAIT)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
@bounded(20)
async def test_a_wsgi_service_stops_while_the_default_pool_is_full(server: str) -> None:
    app = flask.Flask("offloop_test")
    svc = WSGIService(app, port=0, server=server, access_log=False)  # type: ignore[arg-type]
    await svc.start()
    async with saturated_default_pool():
        await asyncio.wait_for(svc.stop(), WAIT)
        assert svc.state.value == "stopped"
        assert (
            default_thread_pool().statistics()["queued"] == 1
        )  # still stuck: the stop did not need it


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_watch_service_starts_and_stops_while_the_default_pool_is_full(
    tmp_path: Path,
) -> None:
    svc = WatchService(tmp_path, lambda event: None)
    async with saturated_default_pool():
        await asyncio.wait_for(svc.start(), WAIT)
        await asyncio.wait_for(svc.stop(), WAIT)
        assert svc.state.value == "stopped"
        assert default_thread_pool().statistics()["queued"] == 1


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_killed_waitress_service_frees_its_services_pool_thread() -> None:
    entered, release = threading.Event(), threading.Event()
    app = flask.Flask("offloop_test")

    @app.get("/stubborn")
    def stubborn() -> str:
        entered.set()
        release.wait(WAIT * 2)  # ignores the stop token
        return "finally"

    def fetch_ignoring_errors(url: str) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            urllib.request.urlopen(url, timeout=WAIT).read()

    sv = offloop.Supervisor(name="impatient", grace=0.2)
    web = sv.add(WSGIService(app, port=0, server="waitress", name="web", access_log=False))
    request = None
    try:
        async with sv:
            request = offloop.to_thread(fetch_ignoring_errors, web.url + "/stubborn")
            assert await offloop.to_thread(entered.wait, WAIT)
        # stop() ran out of grace and the service was killed: the stop that was
        # still waiting for the stubborn view in a services-pool thread ends too.
        await await_until(
            lambda: service_pool().statistics()["running"] == 0, WAIT, "the stop to give up"
        )
        assert not release.is_set()  # the view is still running: only kill() ended the wait
        # The serve thread and the idle workers end as well; only the stubborn one is left.
        await await_until(lambda: len(wsgi_threads()) == 1, WAIT, "all but one thread to end")
        assert "-worker-" in wsgi_threads()[0]
    finally:
        release.set()
        if request is not None:
            await asyncio.wait_for(request, WAIT)
    await await_until(lambda: wsgi_threads() == [], WAIT, "the abandoned worker to end")

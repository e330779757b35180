"""offloop's own services start and stop their servers outside the default pool.

A program whose ``to_thread`` calls fill every thread of the default pool must
still be able to stop its Flask server and its file watcher promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import flask
import pytest

import offloop
from offloop import WatchService, WSGIService
from offloop._tothread import default_pool
from tests.helpers import await_until, bounded

WAIT = 5.0


@contextlib.asynccontextmanager
async def saturated_default_pool() -> AsyncIterator[None]:
    """Every thread of the default pool blocked in user code, and one more call queued."""
    release = threading.Event()
    pool = default_pool()
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
        assert default_pool().statistics()["queued"] == 1  # still stuck: the stop did not need it


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
        assert default_pool().statistics()["queued"] == 1

"""The probes over real HTTP: /healthz sees a blocked loop, /readyz the services."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from typing import Any

import flask
import pytest
from rich.console import Console

from offloop import Supervisor, WSGIService
from offloop._cli.run import render_table
from offloop._supervisor.health import TICK
from offloop._supervisor.statusserver import start_status_server
from tests.helpers import QUICK_WAIT, bounded
from tests.supervisor.test_supervisor import Recorder

THRESHOLD = 0.2


def _get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=QUICK_WAIT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        kind = resp.getheader("Content-Type", "")
        return resp.status, json.loads(body) if kind == "application/json" else body
    finally:
        conn.close()


async def get(port: int, path: str) -> tuple[int, Any]:
    """GET from another thread: the server answers on this test's loop."""
    return await asyncio.to_thread(_get, port, path)


async def until_status(port: int, path: str, code: int) -> Any:
    """Poll ``path`` until it answers ``code``; its body. Fails loudly after QUICK_WAIT."""
    deadline = time.monotonic() + QUICK_WAIT
    while True:
        status, body = await get(port, path)
        if status == code:
            return body
        assert time.monotonic() < deadline, f"{path} still answers {status}: {body}"
        await asyncio.sleep(TICK / 4)


def _idle(sv: Supervisor) -> None:
    @sv.service
    async def idle() -> None:
        await asyncio.Event().wait()


def _block_with_a_probe_pending(
    port: int, block: float
) -> tuple[threading.Thread, list[tuple[int, Any]]]:
    """Block this (the loop's) thread for ``block`` s while a /healthz probe waits; its answer."""
    sent = threading.Event()
    answers: list[tuple[int, Any]] = []

    def probe() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=QUICK_WAIT)
        try:
            conn.request("GET", "/healthz")  # the kernel accepts it for the blocked loop
            sent.set()
            resp = conn.getresponse()
            answers.append((resp.status, json.loads(resp.read())))
        finally:
            conn.close()

    started = time.monotonic()
    prober = threading.Thread(target=probe)
    prober.start()
    sent_in_time = sent.wait(QUICK_WAIT)
    # The loop is blocked from `started` on: the point of the test.
    time.sleep(max(0.0, block - (time.monotonic() - started)))
    assert sent_in_time, "the probe was not sent"
    # The probe can only be answered once this returns to the loop.
    assert not answers, "the probe was answered while the loop was blocked"
    return prober, answers


@pytest.mark.loops("asyncio", "uvloop")
@bounded(10)
async def test_healthz_fails_after_a_block_longer_than_the_threshold_and_recovers() -> None:
    sv = Supervisor(name="live")
    _idle(sv)
    async with sv:
        server = await start_status_server(sv, 0, liveness_threshold=THRESHOLD)
        try:
            assert await get(server.port, "/healthz") == (200, {"live": True, "state": "running"})
            prober, answers = _block_with_a_probe_pending(server.port, 2 * THRESHOLD)
            await asyncio.to_thread(prober.join, QUICK_WAIT)
            status, body = answers[0]
            assert status == 503, body
            assert body["live"] is False
            assert body["error"].startswith("the supervisor's loop did not respond for ")
            assert body["error"].endswith(f" s (threshold {THRESHOLD:g} s)")
            # One tick on time later, the loop is live again.
            await until_status(server.port, "/healthz", 200)
        finally:
            await server.aclose()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_block_shorter_than_the_threshold_does_not_fail_healthz() -> None:
    sv = Supervisor(name="short")
    _idle(sv)
    async with sv:
        server = await start_status_server(sv, 0, liveness_threshold=1.0)
        try:
            prober, answers = _block_with_a_probe_pending(server.port, THRESHOLD)
            await asyncio.to_thread(prober.join, QUICK_WAIT)
            assert answers == [(200, {"live": True, "state": "running"})]
        finally:
            await server.aclose()


class SlowToStart(Recorder):
    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.go = asyncio.Event()

    async def start(self) -> None:
        await super().start()
        await self.go.wait()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_readyz_counts_a_finished_one_shot_service_as_ready_and_healthz_stays_live() -> None:
    journal: list[str] = []
    sv = Supervisor(name="ready")

    @sv.service(oneshot=True)
    async def migrate() -> None:
        journal.append("migrated")

    gate = sv.add(SlowToStart("gate", journal), depends_on=["migrate"])
    ends = sv.add(Recorder("ends", journal), restart="no")
    server = await start_status_server(sv, 0)
    try:
        entering = asyncio.ensure_future(sv.__aenter__())
        await until_status(server.port, "/healthz", 200)  # starting, and the loop responds
        starting = await until_status(server.port, "/readyz", 503)
        assert starting["state"] == "starting"
        assert "gate" in starting["not_ready"]
        gate.go.set()
        await asyncio.wait_for(entering, QUICK_WAIT)
        assert await get(server.port, "/readyz") == (
            200,
            {"ready": True, "state": "running", "not_ready": []},
        )
        status = (await get(server.port, "/status"))[1]
        assert status["services"]["migrate"]["state"] == "done"
        # A service that is not one-shot and ends is not ready; liveness is not its business.
        assert ends._ended is not None
        ends._ended.set()
        ended = await until_status(server.port, "/readyz", 503)
        assert ended == {"ready": False, "state": "running", "not_ready": ["ends"]}
        assert (await get(server.port, "/healthz"))[0] == 200
        sv.stop()
        await sv.__aexit__(None, None, None)
        stopped = await get(server.port, "/healthz")
        assert stopped == (503, {"live": False, "state": "stopped"})
    finally:
        await server.aclose()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_status_shows_the_bound_url_the_loop_lag_and_the_last_blocks() -> None:
    sv = Supervisor(name="shown", detect_blocking=0.05)
    web = sv.add(WSGIService(flask.Flask("app"), port=0, name="web"))
    _idle(sv)
    async with sv:
        server = await start_status_server(sv, 0)
        try:
            time.sleep(0.15)  # noqa: ASYNC251 (a real block for the detector) # blocks-here
            await until_status(server.port, "/status", 200)
            deadline = time.monotonic() + QUICK_WAIT
            while True:
                status = (await get(server.port, "/status"))[1]
                if status["blocks"] and status["loop_lag"]["samples"] >= 2:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(TICK)
            console = Console(record=True, width=200, color_system=None)
            console.print(render_table(sv))
            table = console.export_text()
        finally:
            await server.aclose()
    services = status["services"]
    assert services["web"]["url"] == web.url
    assert web.url.startswith("http://127.0.0.1:")
    assert not web.url.endswith(":0")
    assert services["idle"]["url"] is None
    lag = status["loop_lag"]
    assert lag["window_s"] == 60.0
    assert 0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
    block = status["blocks"][-1]
    assert block["file"] == __file__
    assert block["function"].endswith(
        "test_status_shows_the_bound_url_the_loop_lag_and_the_last_blocks"
    )
    assert block["duration_ms"] >= 50
    assert sv.status()["web"].url is None  # stopped: no URL
    # The live table of `offloop run` shows the same.
    assert web.url in table
    assert "loop lag p50 " in table
    assert f"last block: {block['duration_ms']:.0f} ms at {__file__}:" in table


class SlowToStop(Recorder):
    """Its stop waits for the test: the supervisor stays stopping meanwhile."""

    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__(name, journal)
        self.stopping = asyncio.Event()
        self.go = asyncio.Event()

    async def stop(self) -> None:
        self.stopping.set()
        await self.go.wait()
        await super().stop()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_healthz_stays_live_while_the_supervisor_stops_and_readyz_fails() -> None:
    # A graceful stop is not a wedged process: a liveness probe failing now
    # would have an orchestrator kill it in the middle of its stop (Spring
    # Boot keeps liveness CORRECT and readiness REFUSING_TRAFFIC then).
    sv = Supervisor(name="draining", status_port=0, grace=QUICK_WAIT)
    slow = sv.add(SlowToStop("slow", []))
    async with sv:
        url = sv.status_url
        assert url is not None
        port = int(url.rsplit(":", 1)[1])
        sv.stop()
        try:
            await asyncio.wait_for(slow.stopping.wait(), QUICK_WAIT)
            assert await get(port, "/healthz") == (200, {"live": True, "state": "stopping"})
            status, body = await get(port, "/readyz")
            assert (status, body["ready"], body["state"]) == (503, False, "stopping")
        finally:
            slow.go.set()

"""``Supervisor(status_port=...)``: the probes over real HTTP, however the supervisor is run."""

from __future__ import annotations

import asyncio
import errno
import http.client
import json
import re
import socket
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from offloop import Service, ServiceFailed, StatusPortError, Supervisor, SupervisorState
from tests.helpers import QUICK_WAIT, bounded, refuses, run_script
from tests.supervisor.test_supervisor import Recorder

URL = re.compile(r"http://127\.0\.0\.1:(\d+)")


class Gate(Service):
    """A service that is not ready until the test opens its gate."""

    def __init__(self) -> None:
        self.name = "gate"
        self.starting = asyncio.Event()
        self.open = asyncio.Event()
        self._ended = asyncio.Event()

    async def start(self) -> None:
        self.starting.set()
        await self.open.wait()

    async def wait(self) -> None:
        await self._ended.wait()

    async def stop(self) -> None:
        self._ended.set()


def _get(url: str) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=QUICK_WAIT)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        body = resp.read().decode()
        is_json = resp.getheader("Content-Type", "") == "application/json"
        return resp.status, json.loads(body) if is_json else body
    finally:
        conn.close()


async def get(url: str) -> tuple[int, Any]:
    """GET from another thread: the probes answer on this test's loop."""
    return await asyncio.to_thread(_get, url)


def port_of(url: str | None) -> int:
    assert url is not None
    match = URL.fullmatch(url)
    assert match is not None, url
    return int(match.group(1))


@bounded(10)
async def test_async_with_serves_them_from_before_the_first_service_to_after_the_last() -> None:
    sv = Supervisor(name="probed", status_port=0, grace=1)
    gate = sv.add(Gate())
    assert sv.status_url is None  # not bound before the start
    inside, leave = asyncio.Event(), asyncio.Event()

    async def body() -> None:
        async with sv:
            inside.set()
            await leave.wait()

    task = asyncio.create_task(body())
    await asyncio.wait_for(gate.starting.wait(), QUICK_WAIT)
    url = sv.status_url
    port = port_of(url)
    # Alive while the services start, but not ready.
    assert await get(f"{url}/healthz") == (200, {"live": True, "state": "starting"})
    assert await get(f"{url}/readyz") == (
        503,
        {"ready": False, "state": "starting", "not_ready": ["gate"]},
    )
    gate.open.set()
    await asyncio.wait_for(inside.wait(), QUICK_WAIT)
    assert await get(f"{url}/readyz") == (
        200,
        {"ready": True, "state": "running", "not_ready": []},
    )
    code, status = await get(f"{url}/status")
    assert (code, status["supervisor"], status["services"]["gate"]["state"]) == (
        200,
        "probed",
        "running",
    )
    code, metrics = await get(f"{url}/metrics")
    assert code == 200
    restarts = r'^offloop_service_restarts_total\{[^}]*service="gate"[^}]*\} 0$'
    assert re.search(restarts, metrics, re.M)
    leave.set()
    await asyncio.wait_for(task, QUICK_WAIT)
    assert sv.status_url is None
    assert await asyncio.to_thread(refuses, port)  # closed with the supervisor


@bounded(10)
async def test_start_and_aclose_serve_them_in_a_host_and_status_host_picks_the_address() -> None:
    # As in a FastAPI lifespan: start() on the startup hook, aclose() on shutdown.
    journal: list[str] = []
    sv = Supervisor(name="embedded", status_port=0, status_host="0.0.0.0")
    sv.add(Recorder("db", journal))
    await sv.start()
    url = sv.status_url
    assert url is not None
    match = re.fullmatch(r"http://0\.0\.0\.0:(\d+)", url)
    assert match is not None, url
    port = int(match.group(1))
    # Every interface: reachable on the loopback address too.
    assert await get(f"http://127.0.0.1:{port}/readyz") == (
        200,
        {"ready": True, "state": "running", "not_ready": []},
    )
    await sv.aclose()
    assert journal == ["start db", "stop db"]
    assert sv.status_url is None
    assert await asyncio.to_thread(refuses, port)


def test_run_serves_them_from_a_script(tmp_path: Path) -> None:
    script = """
        import json, urllib.error, urllib.request, time
        import offloop

        sv = offloop.Supervisor(name="script", status_port=0, grace=1)
        seen = {}

        @sv.service
        def probe(token):
            # A thread: the loop answers the probes meanwhile.
            seen["url"] = url = sv.status_url
            deadline = time.monotonic() + 5
            while True:
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
                        seen["readyz"] = resp.status, json.load(resp)
                        break
                except urllib.error.HTTPError as exc:  # 503 until the supervisor is running
                    assert time.monotonic() < deadline, exc.read()
                    token.wait(0.01)
            sv.stop()

        code = sv.run()
        print(json.dumps({"code": code, "after": sv.status_url, **seen}))
        try:
            urllib.request.urlopen(seen["url"] + "/healthz", timeout=5)
        except urllib.error.URLError as exc:
            print("refused" if isinstance(exc.reason, ConnectionRefusedError) else repr(exc))
    """
    proc = run_script(tmp_path, "app.py", textwrap.dedent(script))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "refused", proc.stdout
    result = json.loads(lines[0])
    port_of(result["url"])
    assert result["readyz"] == [200, {"ready": True, "state": "running", "not_ready": []}]
    assert result["code"] == 0
    assert result["after"] is None
    # run() sets up logging: the URL is in the supervisor's story.
    assert f"script: probes on {result['url']} (/healthz /readyz /status /metrics)" in proc.stderr


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_port_in_use_refuses_the_start_before_any_service_and_leaves_it_new() -> None:
    journal: list[str] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sv = Supervisor(name="clash", status_port=port)
        sv.add(Recorder("db", journal))
        with pytest.raises(StatusPortError) as caught:
            async with sv:
                pytest.fail("entered with the port in use")
        err = caught.value
        assert str(err) == (
            f"<Supervisor 'clash' new (1 stopped) grace=5> cannot serve its probes on "
            f"127.0.0.1:{port} ({err.__cause__.strerror}); nothing was started. "  # type: ignore[union-attr]
            f"Pass another status_port, or 0 for any free port (then read sv.status_url)."
        )
        assert isinstance(err, OSError)
        assert (err.errno, err.host, err.port) == (errno.EADDRINUSE, "127.0.0.1", port)
        assert journal == []
        assert sv.state is SupervisorState.NEW
        assert sv.status_url is None
    # Nothing changed: once the port is free, the same supervisor runs.
    async with sv:
        assert await get(f"{sv.status_url}/readyz") == (
            200,
            {"ready": True, "state": "running", "not_ready": []},
        )
    assert journal == ["start db", "stop db"]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_service_failing_at_start_closes_them_too() -> None:
    journal: list[str] = []
    sv = Supervisor(name="broken", status_port=0)
    gate = sv.add(Gate())
    sv.add(Recorder("db", journal, start_failures=1))
    task = asyncio.create_task(sv.__aenter__())
    await asyncio.wait_for(gate.starting.wait(), QUICK_WAIT)
    port = port_of(sv.status_url)
    gate.open.set()
    with pytest.raises(ServiceFailed, match="'db'"):
        await asyncio.wait_for(task, QUICK_WAIT)
    assert sv.status_url is None
    assert await asyncio.to_thread(refuses, port)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"status_port": "8081"}, TypeError, "status_port must be an int from 0 to 65535 .*str"),
        ({"status_port": True}, TypeError, "status_port must be an int from 0 to 65535"),
        ({"status_port": 8081.0}, TypeError, "status_port must be an int"),
        ({"status_port": -1}, ValueError, "status_port must be from 0 to 65535, got -1; pass 0"),
        ({"status_port": 65536}, ValueError, "status_port must be from 0 to 65535, got 65536"),
        ({"status_port": 0, "status_host": None}, TypeError, "status_host must be a str"),
        (
            {"status_port": 0, "status_host": "example.com"},
            ValueError,
            r"status_host must be an IP address, got 'example\.com': pass '127\.0\.0\.1'",
        ),
        ({"status_host": ""}, ValueError, "status_host must be an IP address, got ''"),
        ({"status_host": "localhost"}, ValueError, "must be an IP address, got 'localhost'"),
    ],
    ids=repr,
)
def test_bad_arguments_are_refused_by_the_constructor(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Supervisor(**kwargs)


def test_ip_literals_are_accepted_and_nothing_binds_before_the_start() -> None:
    assert Supervisor(status_port=0, status_host="0.0.0.0").status_url is None
    assert Supervisor(status_port=0, status_host="::1").status_url is None
    assert Supervisor().status_url is None

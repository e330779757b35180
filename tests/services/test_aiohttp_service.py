"""AiohttpService: a real aiohttp app on the supervisor's loop, real HTTP requests."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from offloop import AiohttpService, Supervisor
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded, http_get, refuses, stop_during_start


def make_app(journal: list[str], gate: asyncio.Event | None = None) -> web.Application:
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="hello aiohttp")

    async def slow(request: web.Request) -> web.Response:
        journal.append("slow entered")
        assert gate is not None
        try:
            await gate.wait()
        except asyncio.CancelledError:
            journal.append("slow cancelled")
            raise
        return web.Response(text="slow done")

    async def on_startup(app: web.Application) -> None:
        journal.append("startup")

    async def on_cleanup(app: web.Application) -> None:
        journal.append("cleanup")

    app.router.add_get("/", index)
    app.router.add_get("/slow", slow)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@bounded(20)
async def test_app_is_served_on_the_loop_and_stopped_gracefully() -> None:
    journal: list[str] = []
    svc = AiohttpService(make_app(journal), port=0, name="api", access_log=False)
    assert repr(svc) == "<AiohttpService 'api' idle 127.0.0.1:0>"
    await svc.start()
    assert journal == ["startup"]
    assert svc.port != 0
    assert repr(svc) == f"<AiohttpService 'api' running url=http://127.0.0.1:{svc.port}>"
    assert await http_get(svc.url) == (200, "hello aiohttp")
    waiter = asyncio.ensure_future(svc.wait())
    await svc.stop()
    await asyncio.wait_for(waiter, WAIT)
    assert journal == ["startup", "cleanup"]
    assert repr(svc) == f"<AiohttpService 'api' stopped 127.0.0.1:{svc.port}>"
    assert refuses(svc.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_request_in_flight_finishes_during_stop() -> None:
    journal: list[str] = []
    gate = asyncio.Event()
    svc = AiohttpService(make_app(journal, gate), port=0, access_log=False)
    await svc.start()
    request = asyncio.ensure_future(http_get(svc.url + "/slow"))
    await await_until(lambda: "slow entered" in journal, WAIT, "the handler to start")
    stopping = asyncio.ensure_future(svc.stop())
    await await_until(lambda: refuses(svc.port), WAIT, "the listener to close")
    assert not stopping.done()  # waits for the handler in flight
    gate.set()
    assert await asyncio.wait_for(request, WAIT) == (200, "slow done")
    await asyncio.wait_for(stopping, WAIT)
    assert journal[-1] == "cleanup"


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_restart_runs_the_hooks_again_on_the_same_port() -> None:
    journal: list[str] = []
    svc = AiohttpService(make_app(journal), port=0, access_log=False)
    await svc.start()
    port = svc.port
    await svc.stop()
    await svc.start()
    assert svc.port == port
    assert await http_get(svc.url) == (200, "hello aiohttp")
    await svc.stop()
    assert journal == ["startup", "cleanup", "startup", "cleanup"]


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_failing_startup_hook_fails_start_and_releases_the_port() -> None:
    attempts: list[int] = []
    app = web.Application()

    async def flaky_startup(app: web.Application) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("database is down")

    app.on_startup.append(flaky_startup)
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    blocker.close()
    svc = AiohttpService(app, port=port, access_log=False)
    with pytest.raises(ConnectionError, match="database is down"):
        await svc.start()
    assert svc.state.value == "crashed"
    assert refuses(port)
    await svc.start()  # the next start works on the same port
    assert svc.port == port
    await svc.stop()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match=r"needs an aiohttp\.web\.Application.*not the function"):
        AiohttpService(make_app)
    with pytest.raises(ValueError, match=r"AiohttpService\(port=\.\.\.\) must be between"):
        AiohttpService(web.Application(), port=-1)
    # A port written into the host used to fail only at start(), with a resolver error.
    with pytest.raises(ValueError, match=r"without a port, got '127\.0\.0\.1:8000'; pass the"):
        AiohttpService(web.Application(), host="127.0.0.1:8000")


def test_ipv6_hosts_are_bracketed_wherever_a_port_follows() -> None:
    svc = AiohttpService(web.Application(), host="[::1]", port=8080)  # as written in a URL
    assert svc.host == "::1"
    assert svc.url == "http://[::1]:8080"
    assert "[::1]:8080" in repr(svc)
    # A scoped link-local address is an address, not a host with a port.
    assert AiohttpService(web.Application(), host="fe80::1%lo", port=8080).host == "fe80::1%lo"


@pytest.mark.loops("asyncio", "uvloop")
@bounded(20)
async def test_under_a_supervisor_and_killed_when_a_handler_hangs() -> None:
    journal: list[str] = []
    never = asyncio.Event()
    sv = Supervisor(name="site", grace=0.3)
    api = sv.add(AiohttpService(make_app(journal, never), port=0, name="api", access_log=False))
    async with sv:
        assert sv.status()["api"].state == "running"
        assert await http_get(api.url) == (200, "hello aiohttp")
        hanging = asyncio.ensure_future(http_get(api.url + "/slow"))
        await await_until(lambda: "slow entered" in journal, WAIT, "the handler to start")
    # The handler never finished: after the grace period its connection was dropped.
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(hanging, WAIT)
    # ...and the handler itself was cancelled, not left running on the loop.
    await await_until(lambda: "slow cancelled" in journal, WAIT, "the hung handler to be cancelled")
    assert sv.status()["api"].state == "stopped"
    assert refuses(api.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_stop_during_start_waits_for_the_start_then_stops() -> None:
    # Driven by hand (no supervisor to cancel the start first): stop() must not
    # return while start() goes on to bring up a server that nobody stops.
    entered, release = asyncio.Event(), asyncio.Event()
    journal: list[str] = []
    app = web.Application()

    async def slow_startup(app: web.Application) -> None:
        entered.set()
        await release.wait()

    async def shutdown(app: web.Application) -> None:
        journal.append("shutdown")

    app.on_startup.append(slow_startup)
    app.on_shutdown.append(shutdown)
    svc = AiohttpService(app, port=0, access_log=False)
    await stop_during_start(svc, entered, release)
    assert journal == ["shutdown"]


def _keep_alive_request(port: int) -> socket.socket:
    """A raw HTTP/1.1 connection that has had one answer and stays open (keep-alive)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"hello aiohttp" not in answer:
        chunk = sock.recv(4096)
        assert chunk, answer
        answer += chunk
    return sock


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("failing", ["on_shutdown", "on_cleanup"])
@bounded(20)
async def test_a_raising_shutdown_or_cleanup_hook_still_ends_the_server(failing: str) -> None:
    # aiohttp's runner.cleanup() stops at the hook that raised: open connections
    # stay open (a keep-alive client hangs), and on_cleanup never runs after a
    # failed on_shutdown (a database pool never closed).
    journal: list[str] = []
    app = make_app(journal)

    async def on_shutdown(app: web.Application) -> None:
        journal.append("on_shutdown")
        if failing == "on_shutdown" and journal.count("on_shutdown") == 1:
            raise ValueError("flush failed")

    async def on_cleanup(app: web.Application) -> None:
        journal.append("on_cleanup")
        if failing == "on_cleanup" and journal.count("on_cleanup") == 1:
            raise ValueError("close failed")

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    svc = AiohttpService(app, port=0, access_log=False)
    await svc.start()
    client = await asyncio.to_thread(_keep_alive_request, svc.port)
    try:
        with pytest.raises(ValueError, match=r"^(flush|close) failed$"):
            await svc.stop()
        # Every hook ran, once: make_app's own on_cleanup hook appends "cleanup".
        assert journal == ["startup", "on_shutdown", "cleanup", "on_cleanup"]
        assert svc.state.value == "stopped"
        assert await asyncio.to_thread(client.recv, 4096) == b""  # closed by the server
    finally:
        client.close()
    assert refuses(svc.port)
    await svc.start()  # and it starts again (its hooks do not fail this time)
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_two_stops_at_once_run_the_shutdown_once_and_both_return() -> None:
    # A program may stop a service from two places (a signal handler and a
    # finally block); aiohttp's runner.cleanup() must then run only once.
    journal: list[str] = []
    app = make_app(journal)
    entered, release = asyncio.Event(), asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        journal.append("on_shutdown")
        entered.set()
        await release.wait()

    app.on_shutdown.append(on_shutdown)
    svc = AiohttpService(app, port=0, access_log=False)
    await svc.start()
    first = asyncio.create_task(svc.stop())
    await asyncio.wait_for(entered.wait(), WAIT)
    second = asyncio.create_task(svc.stop())
    await asyncio.sleep(0)  # the second stop() runs while the first is in its shutdown
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    assert journal == ["startup", "on_shutdown", "cleanup"]
    assert svc.state.value == "stopped"
    assert refuses(svc.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_second_stop_takes_over_when_the_first_is_cancelled() -> None:
    # The first stop() (the one running the cleanup) is given up, say by a
    # wait_for() around it: the second must not wait for it for ever.
    journal: list[str] = []
    app = make_app(journal)
    entered = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        journal.append("on_shutdown")
        if journal.count("on_shutdown") == 1:
            entered.set()
            await asyncio.Event().wait()  # until the first stop() is cancelled

    app.on_shutdown.append(on_shutdown)
    svc = AiohttpService(app, port=0, access_log=False)
    await svc.start()
    first = asyncio.create_task(svc.stop())
    await asyncio.wait_for(entered.wait(), WAIT)
    second = asyncio.create_task(svc.stop())
    await asyncio.sleep(0)  # the second stop() waits for the first one's cleanup
    first.cancel()
    await asyncio.wait_for(second, WAIT)
    assert first.cancelled()
    # The interrupted shutdown ran again, in full, then the cleanup.
    assert journal == ["startup", "on_shutdown", "on_shutdown", "cleanup"]
    assert svc.state.value == "stopped"
    assert refuses(svc.port)
    await svc.start()  # stopped for good: it starts again
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_startup_hook_awaiting_stop_fails_the_start_instead_of_hanging() -> None:
    app = web.Application()
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    blocker.close()
    svc = AiohttpService(app, port=port, access_log=False)
    attempts: list[int] = []

    async def gives_up(app: web.Application) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            await svc.stop()

    app.on_startup.append(gives_up)
    with pytest.raises(RuntimeError) as info:
        await asyncio.wait_for(svc.start(), WAIT)
    assert str(info.value) == (
        f"Cannot stop <AiohttpService 'aiohttp' starting 127.0.0.1:{port}> from within its "
        f"own start() (a startup hook awaiting stop()): the start would wait for the stop, and "
        f"the stop for the start. To fail the start, raise an exception there instead; to stop "
        f"the service once it has started, run stop() in a task of its own "
        f"(asyncio.create_task(service.stop())) without awaiting it there."
    )
    assert svc.state.value == "crashed"
    assert refuses(port)
    await svc.start()  # the failed start was undone: the next one works
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_startup_hook_may_stop_the_service_from_a_task_of_its_own() -> None:
    journal: list[str] = []
    app = make_app(journal)
    svc = AiohttpService(app, port=0, access_log=False)
    stops: list[asyncio.Task[None]] = []

    async def stops_later(app: web.Application) -> None:
        stops.append(asyncio.create_task(svc.stop()))

    app.on_startup.append(stops_later)
    await asyncio.wait_for(svc.start(), WAIT)
    await asyncio.wait_for(stops[0], WAIT)  # it waited for the start, then stopped it
    await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "stopped"
    assert journal == ["startup", "cleanup"]
    assert refuses(svc.port)

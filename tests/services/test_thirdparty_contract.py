"""The third-party internals offloop relies on still exist in the installed releases.

Every name in ``offloop._services._thirdparty.INTERNALS`` is looked up on a
real object of the library (a real server on 127.0.0.1, a real connection),
and a missing one fails with the library's version and the name. The hooks
offloop overrides are also checked to be called: an override of a method the
library no longer calls would fail silently otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import signal
import socket
import sys
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import pytest
import uvicorn
import uvicorn.server
import waitress
import waitress.adjustments
import waitress.channel
import waitress.parser
import waitress.task
import waitress.wasyncore
from aiohttp import web

from offloop._services._thirdparty import (
    INTERNALS,
    WaitressServer,
    run_until_complete_task,
    uvicorn_exit,
    uvicorn_prepare,
    uvicorn_server,
)
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded

Factory = Callable[[contextlib.AsyncExitStack], Awaitable[object]]


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[0]  # lifespan.startup / lifespan.shutdown
            await send({"type": f"{kind}.complete"})
            if kind == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def listener(stack: contextlib.AsyncExitStack) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    stack.callback(sock.close)
    return sock


# -- waitress ----------------------------------------------------------------------------


async def create_server_parameters(stack: contextlib.AsyncExitStack) -> object:
    return types.SimpleNamespace(**inspect.signature(waitress.create_server).parameters)


async def waitress_dispatcher(stack: contextlib.AsyncExitStack) -> object:
    return waitress.task.ThreadedTaskDispatcher()  # no worker until set_thread_count()


async def waitress_server(stack: contextlib.AsyncExitStack) -> Any:
    server = waitress.create_server(wsgi_app, sockets=[listener(stack)], threads=1)

    def close() -> None:
        server.close()
        dispatcher = getattr(server, "task_dispatcher", None)
        if dispatcher is not None:
            dispatcher.shutdown(timeout=WAIT)

    stack.callback(close)
    return server


async def waitress_channel(stack: contextlib.AsyncExitStack) -> object:
    server = await waitress_server(stack)
    ours, theirs = socket.socketpair()
    stack.callback(theirs.close)
    channel = waitress.channel.HTTPChannel(server, ours, ("127.0.0.1", 1), server.adj, map={})
    stack.callback(channel.close)
    return channel


async def waitress_adjustments(stack: contextlib.AsyncExitStack) -> object:
    return waitress.adjustments.Adjustments()


async def waitress_trigger(stack: contextlib.AsyncExitStack) -> object:
    return (await waitress_server(stack)).trigger


async def waitress_parser(stack: contextlib.AsyncExitStack) -> object:
    return waitress.parser.HTTPRequestParser(waitress.adjustments.Adjustments())


# -- uvicorn -----------------------------------------------------------------------------


def uvicorn_config(lifespan: Literal["on", "off"] = "off") -> Any:
    return uvicorn.Config(asgi_app, lifespan=lifespan, log_level=None, log_config=None)


async def uvicorn_serving(stack: contextlib.AsyncExitStack) -> Any:
    """offloop's uvicorn server, serving: serve() as the ASGIService runs it."""
    return (await _uvicorn_serving(stack))[0]


async def _uvicorn_serving(stack: contextlib.AsyncExitStack) -> tuple[Any, int]:
    config = uvicorn_config()
    uvicorn_prepare(config, access_log=False, on_lifespan_task=lambda t: None, lifespan_failures={})
    listening = asyncio.Event()
    server = uvicorn_server(config, listening.set)
    sock = listener(stack)
    main = asyncio.create_task(server.serve(sockets=[sock]))

    async def stop() -> None:
        uvicorn_exit(server)
        await asyncio.wait_for(main, WAIT)

    stack.push_async_callback(stop)
    await asyncio.wait_for(listening.wait(), WAIT)
    return server, sock.getsockname()[1]


async def uvicorn_loaded_config(stack: contextlib.AsyncExitStack) -> object:
    config = uvicorn_config(lifespan="on")
    config.load()
    return config


async def uvicorn_lifespan_on(stack: contextlib.AsyncExitStack) -> object:
    config = uvicorn_config(lifespan="on")
    config.load()
    return config.lifespan_class


async def uvicorn_server_state(stack: contextlib.AsyncExitStack) -> object:
    return uvicorn.server.ServerState()


async def uvicorn_connection(stack: contextlib.AsyncExitStack) -> object:
    server, port = await _uvicorn_serving(stack)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    stack.callback(writer.close)
    connections = server.server_state.connections
    await await_until(lambda: bool(connections), WAIT, "uvicorn to accept the connection")
    return next(iter(connections))


# -- aiohttp -----------------------------------------------------------------------------


async def aiohttp_runner(stack: contextlib.AsyncExitStack) -> web.AppRunner:
    runner = web.AppRunner(web.Application(), handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    return runner


async def aiohttp_server(stack: contextlib.AsyncExitStack) -> object:
    return (await aiohttp_runner(stack)).server


async def aiohttp_connection(stack: contextlib.AsyncExitStack) -> object:
    sock = listener(stack)  # closed after the runner's cleanup, which stops serving it
    runner = await aiohttp_runner(stack)
    await web.SockSite(runner, sock).start()
    _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    stack.callback(writer.close)
    server: Any = runner.server
    await await_until(lambda: bool(server.connections), WAIT, "aiohttp to accept the connection")
    return server.connections[0]


#: A real object for each entry of INTERNALS, made through the library's own API.
FACTORIES: dict[str, Factory] = {
    "waitress.create_server(...)": create_server_parameters,
    "waitress.task.ThreadedTaskDispatcher": waitress_dispatcher,
    "waitress.server.TcpWSGIServer": waitress_server,
    "waitress.adjustments.Adjustments": waitress_adjustments,
    "waitress.trigger.trigger": waitress_trigger,
    "waitress.channel.HTTPChannel": waitress_channel,
    "waitress.parser.HTTPRequestParser": waitress_parser,
    "waitress.wasyncore": lambda stack: _value(waitress.wasyncore),
    "waitress.wasyncore.dispatcher": lambda stack: _value(waitress.wasyncore.dispatcher),
    "uvicorn.Server": uvicorn_serving,
    "uvicorn.server.ServerState": uvicorn_server_state,
    "uvicorn.Config": uvicorn_loaded_config,
    "uvicorn.lifespan.on.LifespanOn": uvicorn_lifespan_on,
    "uvicorn's HTTP protocol (a connection)": uvicorn_connection,
    "aiohttp.web_server.Server": aiohttp_server,
    "aiohttp.web_protocol.RequestHandler": aiohttp_connection,
}


async def _value(obj: object) -> object:
    return obj


def test_every_internal_is_checked() -> None:
    assert set(FACTORIES) == set(INTERNALS), (
        "tests/test_thirdparty_contract.py needs a real object for each entry of "
        "offloop._services._thirdparty.INTERNALS (and no other)."
    )


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("where", sorted(INTERNALS))
@bounded(20)
async def test_the_internal_names_exist(where: str) -> None:
    library = where.split(".")[0].split("'")[0]
    async with contextlib.AsyncExitStack() as stack:
        obj = await FACTORIES[where](stack)
        missing = [name for name in INTERNALS[where] if not hasattr(obj, name)]
    assert not missing, (
        f"{library} {importlib.metadata.version(library)}: {where} has no "
        f"{', '.join(repr(name) for name in missing)}, which offloop's "
        f"_services/_thirdparty.py relies on. Adapt that module to this release, "
        f"or keep the version pinned below it in pyproject.toml."
    )


# -- the overridden hooks are called -----------------------------------------------------


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_uvicorn_serve_goes_through_the_overridden_startup_and_signal_capture() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert threading.current_thread() is threading.main_thread()  # where uvicorn takes signals
    async with contextlib.AsyncExitStack() as stack:
        # It returns only once the overridden startup() said the socket is served.
        await uvicorn_serving(stack)
        now = {sig: signal.getsignal(sig) for sig in before}
    assert now == before, (
        f"uvicorn {importlib.metadata.version('uvicorn')}: Server.serve() installed signal "
        f"handlers although offloop overrides Server.capture_signals(); see _thirdparty.py."
    )


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_uvicorn_lifespan_goes_through_the_overridden_main_and_send() -> None:
    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "Traceback...\nOSError: no"})

    config = uvicorn.Config(failing, lifespan="on", log_level=None, log_config=None)
    tasks: list[asyncio.Task[Any] | None] = []
    failures: dict[str, str] = {}
    uvicorn_prepare(
        config, access_log=True, on_lifespan_task=tasks.append, lifespan_failures=failures
    )
    lifespan = config.lifespan_class(config)
    await asyncio.wait_for(lifespan.startup(), WAIT)
    version = importlib.metadata.version("uvicorn")
    assert len(tasks) == 1, f"uvicorn {version}: the lifespan no longer runs LifespanOn.main()"
    assert failures == {"startup": "OSError: no"}, (
        f"uvicorn {version}: the app's lifespan messages no longer go through LifespanOn.send()"
    )
    task = tasks[0]
    assert task is not None
    await asyncio.wait_for(task, WAIT)


def test_waitress_starts_its_workers_through_start_new_thread() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    server = WaitressServer(
        wsgi_app, sock, threads=2, thread_prefix="contract-worker", poll_interval=0.05
    )
    names = sorted(t.name for t in server.offloop_threads())
    serving = threading.Thread(target=server.offloop_serve, name="contract-serve")
    serving.start()
    server.offloop_stop()
    serving.join(WAIT)
    server.offloop_drain()
    assert not serving.is_alive()
    assert names == ["contract-worker-0", "contract-worker-1"], (
        f"waitress {importlib.metadata.version('waitress')}: the workers were not started "
        f"through ThreadedTaskDispatcher.start_new_thread(), which offloop overrides."
    )


# -- asyncio's and uvloop's run_until_complete -------------------------------------------


def test_run_until_complete_task_finds_the_main_task_of_asyncio_and_uvloop() -> None:
    import uvloop

    async def main() -> bool:
        return run_until_complete_task(asyncio.get_running_loop()) is asyncio.current_task()

    assert asyncio.run(main()), (
        f"Python {sys.version.split()[0]}: run_until_complete() no longer adds "
        f"_run_until_complete_cb to its task; adapt _thirdparty.run_until_complete_task."
    )
    loop = uvloop.new_event_loop()
    try:
        found = loop.run_until_complete(main())
    finally:
        loop.close()
    assert found, (
        f"uvloop {importlib.metadata.version('uvloop')}: run_until_complete() no longer adds "
        f"its done_cb to its task; adapt _thirdparty.run_until_complete_task."
    )


def test_run_until_complete_task_is_none_under_run_forever() -> None:
    loop = asyncio.new_event_loop()
    found: list[object] = []

    async def probe() -> None:
        found.append(run_until_complete_task(loop))
        loop.stop()

    try:
        task = loop.create_task(probe())
        loop.run_forever()
        assert task.done()
    finally:
        loop.close()
    assert found == [None]

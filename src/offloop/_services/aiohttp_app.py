"""``AiohttpService``: an aiohttp ``web.Application`` on the supervisor's own loop.

aiohttp is already asynchronous, so no thread is involved: the app runs under
an ``AppRunner`` on a socket offloop binds itself (so ``start()`` returns once
it listens and ``port=0`` works), and ``stop()`` is aiohttp's graceful
``runner.cleanup()``: stop listening, let handlers in flight finish, run the
app's ``on_shutdown`` and ``on_cleanup`` hooks. ``kill()`` drops the
connections and cancels their handlers, which aiohttp would let run on
(``_thirdparty.aiohttp_drop_connections``: no public API does it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .._core.extras import require
from .._core.validate import describe
from ._thirdparty import aiohttp_drop_connections
from .adapters import NetworkAdapter, check_host_port, check_name, other_adapter_hint

__all__ = ["AiohttpService"]


class AiohttpService(NetworkAdapter):
    """Serve an aiohttp ``web.Application`` on the supervisor's event loop.

    The app's ``on_startup`` hooks have run when ``start()`` returns; on
    ``stop()`` the server stops listening, lets handlers in flight finish and
    runs ``on_shutdown`` / ``on_cleanup``. A restart runs them again on a
    fresh runner (on the same event loop: aiohttp binds an app to one loop).

    Args:
        app: an ``aiohttp.web.Application``.
        host: the address to listen on.
        port: the port to listen on; ``port=0`` picks a free port, read it
            back from :attr:`port` or :attr:`url` once started.
        access_log: log one line per request (aiohttp's access log).
        name: the service's name (default ``"aiohttp"``).

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
        MissingExtraError: aiohttp is not installed (the ``[aiohttp]`` extra).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        access_log: bool = True,
        name: str | None = None,
    ) -> None:
        web = require("aiohttp.web", "aiohttp", feature="AiohttpService")
        if not isinstance(app, web.Application):
            other = other_adapter_hint(app, "AiohttpService")
            hint = (
                f" {other}"
                if other
                else " Pass the application itself, not the function that builds it."
                if callable(app)
                else ""
            )
            raise TypeError(
                f"AiohttpService(app) needs an aiohttp.web.Application, got {describe(app)}.{hint}"
            )
        host, port = check_host_port(host, port, "AiohttpService")
        super().__init__(check_name(name, "aiohttp", "AiohttpService"), host, port)
        self.app = app
        self.access_log = bool(access_log)
        self._runner: Any = None
        # Settled when the stop() running the runner's cleanup has ended (done
        # or cancelled): a second stop() waits for it.
        self._cleaning: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<AiohttpService {self.name!r} {self._state.value} {self._where()}>"

    async def start(self) -> None:
        """Bind the socket, run the app's startup hooks and start serving; return once listening.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: the service is already running or still stopping.
            Exception: whatever an ``on_startup`` hook raised.
        """
        self._begin()
        web = require("aiohttp.web", "aiohttp", feature="AiohttpService")
        kwargs: dict[str, Any] = {} if self.access_log else {"access_log": None}
        runner = _runner_class(web)(self.app, handle_signals=False, **kwargs)
        try:
            sock = self._listen()
            try:
                port = sock.getsockname()[1]
                await runner.setup()
                site = web.SockSite(runner, sock)
                await site.start()
            except BaseException:
                sock.close()
                raise
        except BaseException:
            self._start_failed()
            # Undo what setup() did (startup hooks ran: run the cleanup ones).
            with contextlib.suppress(Exception):
                await asyncio.shield(runner.cleanup())
            raise
        self._runner = runner
        self._bound_port = port
        self._ready()

    async def stop(self) -> None:
        """Stop listening, let handlers in flight finish, run the shutdown and cleanup hooks.

        Raises:
            Exception: whatever an ``on_shutdown`` or ``on_cleanup`` hook raised
                (the service is stopped all the same).
        """
        await self._start_settled()
        done = self._mark_stopping()
        while True:
            runner = self._runner
            if done is None or runner is None or done.done():
                return
            cleaning = self._cleaning
            if cleaning is None:
                break
            # Another stop() is running the cleanup: aiohttp's cannot run twice
            # at once (the hooks would run again, then it fails half-way). Once
            # it has ended, the run is over, unless that stop() was cancelled
            # half-way: then this one runs the cleanup again.
            await asyncio.wait({cleaning})
        cleaning = self._cleaning = asyncio.get_running_loop().create_future()
        try:
            await runner.cleanup()
        except Exception:
            try:
                await _finish_cleanup(runner)
            finally:
                self._finish(done)  # wait() ends: the server no longer serves
            raise
        finally:
            self._cleaning = None
            cleaning.set_result(None)
            if runner.server is None:  # cleanup got through (kill() needs it otherwise)
                self._runner = None
        self._finish(done)

    def kill(self) -> list[str]:
        """Drop every open connection now and cancel the handlers still running on them."""
        done, runner = self._done, self._runner
        if runner is not None and runner.server is not None:
            aiohttp_drop_connections(runner.server)
        self._runner = None
        if done is not None:
            self._finish(done)
        return []


#: How long a connection's handler may still run once the server shuts down
#: (aiohttp's default ``shutdown_timeout``, which the service's runner keeps).
SHUTDOWN_TIMEOUT = 60.0

_runner_cls: type[Any] | None = None


def _runner_class(web: Any) -> type[Any]:
    """``web.AppRunner``, noting whether the ``on_shutdown`` hooks raised."""
    global _runner_cls
    if _runner_cls is None:

        class Runner(web.AppRunner):  # type: ignore[misc]  # lazy import: web is Any
            offloop_shutdown_failed = False

            async def shutdown(self) -> None:
                # Per call: a stop() cancelled here is followed by another.
                self.offloop_shutdown_failed = False
                try:
                    await super().shutdown()
                except BaseException:
                    self.offloop_shutdown_failed = True
                    raise

        _runner_cls = Runner
    return _runner_cls


async def _finish_cleanup(runner: Any) -> None:
    """What ``runner.cleanup()`` skipped when an ``on_shutdown`` hook raised.

    It stops at the hook: the connections stay open (a keep-alive client
    waits for an answer that never comes) and the ``on_cleanup`` hooks never
    run (a database pool is never closed). A raising ``on_cleanup`` hook
    comes last, after the connections were closed: nothing is left then.
    """
    server = runner.server
    if server is None or not runner.offloop_shutdown_failed:
        return
    await server.shutdown(SHUTDOWN_TIMEOUT)
    await runner.app.cleanup()

"""``ASGIService``: an ASGI app (Starlette, FastAPI, ...) under uvicorn on the supervisor's loop.

``uvicorn.Server.serve()`` installs its own SIGINT/SIGTERM handlers, which
would fight the supervisor's, and calls ``sys.exit`` when the port is taken or
the app's startup fails. So the adapter drives uvicorn through its public
steps instead: ``startup(sockets=...)`` on a socket offloop bound itself (no
signal handlers are ever installed), ``main_loop()`` as a task, and
``shutdown()`` (stop listening, let requests in flight finish, run the
lifespan shutdown) once ``stop()`` sets ``should_exit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Literal

from .._core.extras import require
from .._core.validate import describe
from .adapters import (
    NetworkAdapter,
    check_app_signature,
    check_host_port,
    check_name,
)

__all__ = ["ASGIService"]

Lifespan = Literal["auto", "on", "off"]


class ASGIService(NetworkAdapter):
    """Serve an ASGI app with uvicorn on the supervisor's event loop.

    uvicorn's own signal handlers are never installed: Ctrl-C belongs to the
    supervisor. The app's lifespan is honoured: ``start()`` returns after its
    startup completed, ``stop()`` after its shutdown.

    Args:
        app: the ASGI application (e.g. a ``starlette.applications.Starlette``).
        host, port: where to listen; ``port=0`` picks a free port, read it
            back from :attr:`port` or :attr:`url` once started.
        lifespan: uvicorn's lifespan mode: ``"auto"`` (run it if the app
            supports it), ``"on"`` (a startup failure fails ``start()``) or ``"off"``.
        log_level: the level given to uvicorn's ``uvicorn.error`` and
            ``uvicorn.asgi`` loggers if nothing set one before (``"warning"``
            by default, so the supervisor's log is not drowned). They are
            shared by every server in the process, so a level your logging
            configuration or an earlier service set stays; their handlers are
            always left to the program's own configuration.
        access_log: log one line per request of this service (``uvicorn.access``,
            at INFO); other services' access lines are not affected.
        name: the service's name (default ``"asgi"``).

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
        MissingExtraError: uvicorn is not installed (the ``[asgi]`` extra).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        lifespan: Lifespan = "auto",
        log_level: str = "warning",
        access_log: bool = True,
        name: str | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"ASGIService(app) needs an ASGI application (an async callable taking scope, "
                f"receive and send), got {describe(app)}."
            )
        # ASGI 3 (scope, receive, send), or ASGI 2 (scope), which uvicorn also serves.
        check_app_signature(app, "scope, receive, send", (3, 1), "ASGIService")
        host, port = check_host_port(host, port, "ASGIService")
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(
                f"ASGIService(lifespan=...) must be 'auto', 'on' or 'off', got {lifespan!r}."
            )
        # Fail here, where the service is written, not when the supervisor starts it.
        require("uvicorn", "asgi", feature="ASGIService")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if not isinstance(log_level, str) or log_level.lower() not in levels:
            raise ValueError(
                f"ASGIService(log_level=...) must be one of {', '.join(levels)}, got {log_level!r}."
            )
        super().__init__(check_name(name, "asgi", "ASGIService"), host, port)
        self.app = app
        self.lifespan = lifespan
        self.log_level = log_level.lower()
        self.access_log = bool(access_log)
        self._server: Any = None
        self._main: asyncio.Task[None] | None = None
        self._lifespan_task: asyncio.Task[Any] | None = None
        # Why a lifespan phase failed ("startup", "shutdown"), as the app said.
        self._lifespan_failures: dict[str, str] = {}

    def __repr__(self) -> str:
        where = self._where()
        return f"<ASGIService {self.name!r} {self._state.value} {where} lifespan={self.lifespan}>"

    async def start(self) -> None:
        """Bind the socket, run the lifespan startup and start serving; return once listening.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: the app's lifespan startup failed (see the
                ``uvicorn.error`` log for its error), or the service is
                already running or still stopping.
            MissingExtraError: uvicorn is not installed.
        """
        done = self._begin()
        try:
            uvicorn = require("uvicorn", "asgi", feature="ASGIService")
            sock = self._listen()
            port = self._bound_port = sock.getsockname()[1]  # named in start-up errors too
            # uvicorn's loggers are process-wide, and Config would set their
            # levels and drop the access log's handlers for every server in
            # the process: leave them alone, and do both per service below.
            config = uvicorn.Config(
                self.app,
                host=self.host,
                port=port,
                lifespan=self.lifespan,
                log_level=None,
                log_config=None,  # the program's logging configuration stays as it is
                access_log=True,
            )
            _default_levels(self.log_level)
            server = uvicorn.Server(config)
            try:
                await self._startup(server, config, sock)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            self._start_failed()
            raise
        self._server = server
        self._main = asyncio.get_running_loop().create_task(
            self._serve(server, sock, done), name=f"offloop-asgi-{self.name}"
        )
        self._ready()

    async def _startup(self, server: Any, config: Any, sock: Any) -> None:
        try:
            if not config.loaded:
                config.load()
            if not self.access_log:
                config.http_protocol_class = _without_access_log(config.http_protocol_class)
            server.lifespan = lifespan = config.lifespan_class(config)
            self._track_lifespan(lifespan)
            await server.startup(sockets=[sock])
        except SystemExit as exc:  # uvicorn's way to give up; not ours to exit the process
            failure = self._lifespan_failures.get("startup")
            why = (
                f"the app's lifespan startup failed ({failure})"
                if failure
                else "most likely because the app's lifespan startup failed"
            )
            raise RuntimeError(
                f"{self!r} could not start: uvicorn gave up (exit code {exc.code}), {why}. The "
                f"full traceback is in the 'uvicorn.error' log."
            ) from None
        except BaseException:
            if getattr(server, "started", False) or getattr(server, "servers", None):
                with contextlib.suppress(Exception):
                    await server.shutdown(sockets=[sock])
            raise

    def _track_lifespan(self, lifespan: Any) -> None:
        # uvicorn starts the app's lifespan as a task it keeps no handle to;
        # kill() must cancel it, so its main() records the task it runs in.
        self._lifespan_failures = {}
        main = getattr(lifespan, "main", None)
        if main is None:  # lifespan="off": no task
            self._lifespan_task = None
            return

        async def tracked_main() -> None:
            self._lifespan_task = asyncio.current_task()
            await main()

        lifespan.main = tracked_main
        # uvicorn only logs why a lifespan phase failed; keep the reason for
        # our own errors. The app's message ends with its exception's line.
        send = lifespan.send
        failures = self._lifespan_failures

        async def tracked_send(message: Any) -> None:
            kind = message.get("type", "")
            if kind in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                lines = str(message.get("message") or "").strip().splitlines()
                failures[kind.split(".")[1]] = lines[-1] if lines else "no message"
            await send(message)

        lifespan.send = tracked_send

    async def _serve(self, server: Any, sock: Any, done: asyncio.Future[None]) -> None:
        exc: BaseException | None = None
        try:
            await server.main_loop()  # returns once should_exit is set
        except Exception as e:
            exc = e
        finally:
            try:
                await server.shutdown(sockets=[sock])
            except Exception as e:
                exc = exc or e
            failure = self._lifespan_failures.get("shutdown")
            if exc is None and failure is not None:
                # uvicorn logs it and carries on: wait() says so instead.
                exc = RuntimeError(
                    f"{self!r}: the app's lifespan shutdown failed ({failure}), so its cleanup "
                    f"may not have finished. The full traceback is in the 'uvicorn.error' log."
                )
            self._finish(done, exc)

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish, run the lifespan shutdown."""
        done = self._mark_stopping()
        server, main = self._server, self._main
        if done is None or server is None or main is None:
            return
        server.should_exit = True
        await asyncio.wait({main})

    def kill(self) -> list[str]:
        """Skip the graceful part: drop open connections, cancel the requests and the lifespan."""
        server, main, done = self._server, self._main, self._done
        # A request handler runs on after its client is gone, and the lifespan
        # waits for a shutdown message that never comes: a killed service must
        # not leave them behind on the loop.
        leftovers: list[asyncio.Task[Any]] = []
        if server is not None:
            server.force_exit = True
            for conn in list(server.server_state.connections):
                with contextlib.suppress(Exception):
                    conn.transport.abort()
            leftovers += list(server.server_state.tasks)
        if self._lifespan_task is not None:
            leftovers.append(self._lifespan_task)
        if main is not None:
            leftovers.append(main)
        for task in leftovers:
            if not task.done():
                task.cancel("offloop service killed")
        if done is not None:
            self._finish(done)
        return []


def _default_levels(level: str) -> None:
    # Only loggers nobody configured: the program's own levels win, and a
    # second service does not reset what the first one (or the user) set.
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level.upper() if level != "trace" else 5)


def _without_access_log(protocol: type[Any]) -> type[Any]:
    # uvicorn decides per connection from its shared logger's handlers; this
    # service's connections skip the access line whatever the others do.
    class QuietProtocol(protocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return QuietProtocol

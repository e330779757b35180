"""``ASGIService``: an ASGI app (Starlette, FastAPI, ...) under uvicorn on the supervisor's loop.

The adapter runs uvicorn's own ``Server.serve(sockets=[...])`` as a task, on
a socket offloop bound itself (so a port in use is an ``OSError`` naming the
service, not uvicorn's ``sys.exit(1)``). Three things are changed in it, in
``_thirdparty.py``: its signal capture is a no-op (serve() would take SIGINT
and SIGTERM from the supervisor), its ``startup()`` tells ``start()`` when
the socket is served, and the app's lifespan reports its task (for ``kill()``)
and why a phase failed. ``stop()`` sets ``should_exit``: serve() then stops
listening, lets requests in flight finish and runs the lifespan shutdown. A
failed lifespan startup is a ``RuntimeError`` from ``start()``, not uvicorn's
``sys.exit(3)``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Literal, cast

from .._core.extras import require
from .._core.validate import describe
from ._thirdparty import (
    uvicorn_abandon,
    uvicorn_close_listeners,
    uvicorn_exit,
    uvicorn_prepare,
    uvicorn_server,
)
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
        host: the address to listen on.
        port: the port to listen on; ``port=0`` picks a free port, read it
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
            server, main = await self._serve_until_listening(config, sock, done)
        except BaseException:
            self._start_failed()
            raise
        self._server, self._main = server, main
        self._ready()

    async def _serve_until_listening(
        self, config: Any, sock: socket.socket, done: asyncio.Future[None]
    ) -> tuple[Any, asyncio.Task[None]]:
        """Start ``serve()`` as a task; return it once the socket is served."""
        loop = asyncio.get_running_loop()
        listening: asyncio.Future[None] = loop.create_future()
        try:
            self._lifespan_task, self._lifespan_failures = None, {}
            uvicorn_prepare(
                config,
                access_log=self.access_log,
                on_lifespan_task=self._on_lifespan_task,
                lifespan_failures=self._lifespan_failures,
            )

            def on_listening() -> None:
                if not listening.done():
                    listening.set_result(None)

            server = uvicorn_server(config, on_listening)
        except BaseException:
            sock.close()
            raise
        main = loop.create_task(
            self._serve(server, sock, listening, done), name=f"offloop-asgi-{self.name}"
        )
        try:
            await asyncio.wait({listening, main}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: undo what serve() has begun
            ending: set[asyncio.Task[Any]] = {main}
            if listening.done():
                uvicorn_exit(server)  # listening: a graceful shutdown closes it all
            else:
                main.cancel()  # still in the lifespan startup: nothing listens yet
                # uvicorn runs the app's lifespan in a task of its own, which a
                # cancelled serve() leaves waiting in the app's startup for ever.
                # (Set by uvicorn's hook since this method cleared it: mypy cannot know.)
                lifespan = cast("asyncio.Task[Any] | None", self._lifespan_task)
                if lifespan is not None and not lifespan.done():
                    lifespan.cancel()
                    ending.add(lifespan)
            await asyncio.wait(ending)
            if done.done():
                done.exception()  # nobody will wait() for this run; uvicorn logged any error
            raise
        if not listening.done():  # serve() gave up before it listened
            main.result()  # its error, if it raised one
            raise self._startup_failure(None)
        return server, main

    def _on_lifespan_task(self, task: asyncio.Task[Any] | None) -> None:
        self._lifespan_task = task

    def _start_tasks(self) -> set[asyncio.Task[object]]:
        # The app's lifespan startup runs in a task of uvicorn's, which start() waits for.
        tasks = super()._start_tasks()
        if self._lifespan_task is not None:
            tasks.add(self._lifespan_task)
        return tasks

    def _startup_failure(self, code: object) -> RuntimeError:
        failure = self._lifespan_failures.get("startup")
        why = (
            f"the app's lifespan startup failed ({failure})"
            if failure
            else "most likely because the app's lifespan startup failed"
        )
        how = "" if code is None else f" (exit code {code})"
        return RuntimeError(
            f"{self!r} could not start: uvicorn gave up{how}, {why}. The full traceback is in "
            f"the 'uvicorn.error' log."
        )

    async def _serve(
        self,
        server: Any,
        sock: socket.socket,
        listening: asyncio.Future[None],
        done: asyncio.Future[None],
    ) -> None:
        exc: BaseException | None = None
        try:
            await server.serve(sockets=[sock])  # returns after its shutdown
        except SystemExit as e:  # uvicorn's way to give up; not ours to exit the process
            exc = self._startup_failure(e.code)
        except Exception as e:
            exc = e
        finally:
            # Both done by uvicorn's shutdown, unless serve() ended some other way.
            uvicorn_close_listeners(server)
            sock.close()
        if not listening.done():  # start() reports it
            if exc is not None:
                raise exc
            return
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
        await self._start_settled()
        done = self._mark_stopping()
        server, main = self._server, self._main
        if done is None or server is None or main is None:
            return
        uvicorn_exit(server)
        await asyncio.wait({main})

    def kill(self) -> list[str]:
        """Skip the graceful part: drop open connections, cancel the requests and the lifespan."""
        server, main, done = self._server, self._main, self._done
        # A request handler runs on after its client is gone, and the lifespan
        # waits for a shutdown message that never comes: a killed service must
        # not leave them behind on the loop.
        leftovers: list[asyncio.Task[Any]] = []
        if server is not None:
            leftovers += uvicorn_abandon(server)
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

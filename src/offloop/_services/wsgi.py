"""``WSGIService``: a WSGI app (Flask) served from a thread, with a server that really stops.

``threading.Thread(target=app.run)`` cannot be stopped: werkzeug removed its
shutdown hook, so the thread outlives everything and Ctrl-C hangs on it. Here
each server is built to stop gracefully:

- werkzeug: ``make_server``-style ``ThreadedWSGIServer`` + ``serve_forever``,
  stopped by ``shutdown()``; idle keep-alive connections are closed, requests
  in flight finish and their threads are joined.
- waitress: ``create_server`` + ``run()``; the listening socket is closed
  first (in waitress's own loop thread, through its trigger), then each
  channel closes once it is done: idle ones at once, a request being
  received once it is answered, a response once it is sent (waitress's
  ``close_when_flushed``). Only then are the worker threads stopped. waitress
  has no public API for any of it: that code is ``_thirdparty.WaitressServer``,
  with every waitress internal it uses.

Both servers are driven through the same five calls (:class:`_Server`), so
the service itself does not care which one runs.

The listening socket is bound by offloop before the server is built, so
``start()`` returns once it listens, ``port=0`` works, and a port in use is
an ``OSError`` that names the service (werkzeug would ``sys.exit(1)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Literal, Protocol

from .._core.errors import OffloopError
from .._core.extras import require
from .._core.token import StopToken, WorkerCall, thread_state
from .._core.validate import check_positive_int, describe
from .._threads.tothread import service_pool
from ._thirdparty import WaitressServer
from .adapters import (
    NetworkAdapter,
    check_app_signature,
    check_host_port,
    check_name,
)
from .functions import describe_thread

__all__ = ["WSGIService"]

WSGIServer = Literal["werkzeug", "waitress"]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: How often werkzeug's serve loop checks for shutdown(), and how often a
#: stopping waitress server is checked for channels still busy: the stop latency.
POLL_INTERVAL: Final = 0.05

#: waitress's worker threads when ``threads`` is not given: waitress's own default.
WAITRESS_THREADS: Final = 4


class _Server(Protocol):
    """What the service needs of a server, werkzeug's or waitress's.

    Prefixed: on werkzeug's server these are methods of a subclass, where a
    plain name could one day mean something else.
    """

    def offloop_serve(self) -> None:
        """Serve (in the serve thread) until :meth:`offloop_stop` or :meth:`offloop_kill`."""

    def offloop_drain(self) -> None:
        """After :meth:`offloop_serve`, in the serve thread: wait for the requests in flight."""

    def offloop_stop(self) -> None:
        """Stop gracefully (blocking: off the loop); returns once :meth:`offloop_serve` has."""

    def offloop_kill(self) -> None:
        """Close every connection now; end the waits of the stop and of the drain."""

    def offloop_threads(self) -> list[threading.Thread]:
        """The request (or worker) threads it started."""


class _ServerRun:
    """One run of a WSGIService, start() .. its end: its server and its serve thread."""

    def __init__(self, done: asyncio.Future[None], token: StopToken, driver: _Server) -> None:
        self.done = done
        self.token = token
        self.driver = driver
        # The server itself, werkzeug's or waitress's (for a debugger, or a test).
        self.server: Any = driver.server if isinstance(driver, WaitressServer) else driver
        self.thread: threading.Thread | None = None

    def threads(self) -> list[threading.Thread]:
        every = [self.thread, *self.driver.offloop_threads()]
        return [t for t in every if t is not None and t.is_alive()]


class WSGIService(NetworkAdapter):
    """Serve a WSGI app (e.g. Flask) from a thread, with a server that can be stopped.

    ``start()`` returns once the socket listens; requests are handled in
    threads named ``offloop-wsgi-<name>-...``, so the supervisor's event loop
    never runs app code. ``stop()`` stops accepting, lets requests in flight
    finish and joins every thread. Inside a request, :func:`offloop.current_token`
    returns a token that is set when the service stops.

    Args:
        app: the WSGI application, e.g. a ``flask.Flask`` instance.
        host: the address to listen on.
        port: the port to listen on; ``port=0`` picks a free port, read it
            back from :attr:`port` or :attr:`url` once started.
        server: ``"werkzeug"`` (the ``[flask]`` extra; a thread per
            connection) or ``"waitress"`` (the ``[waitress]`` extra; a fixed
            pool of ``threads`` worker threads).
        threads: waitress's worker threads (default 4). werkzeug starts a
            thread per connection and takes no such bound: passing it with
            ``server="werkzeug"`` is refused.
        access_log: log one line per request (werkzeug's request log).
        name: the service's name (default ``"wsgi"``).

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.
        MissingExtraError: the chosen server is not installed.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        server: WSGIServer = "werkzeug",
        threads: int | None = None,
        access_log: bool = True,
        name: str | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"WSGIService(app) needs a WSGI application (a callable such as a flask.Flask "
                f"instance), got {describe(app)}."
            )
        check_app_signature(app, "environ, start_response", (2,), "WSGIService")
        host, port = check_host_port(host, port, "WSGIService")
        if server not in ("werkzeug", "waitress"):
            raise ValueError(
                f"WSGIService(server=...) must be 'werkzeug' or 'waitress', got {server!r}."
            )
        check_positive_int(threads, "WSGIService(threads=...)")
        if threads is not None and server == "werkzeug":
            raise ValueError(
                f"WSGIService(threads={threads}) sets waitress's pool of worker threads, but "
                f"server='werkzeug' starts a thread per connection and has no such bound. "
                f"Drop threads=, or pass server='waitress' for a fixed pool of {threads}."
            )
        # Fail here, where the service is written, not when the supervisor starts it.
        if server == "werkzeug":
            require("werkzeug.serving", "flask", feature="WSGIService(server='werkzeug')")
        else:
            require("waitress", "waitress", feature="WSGIService(server='waitress')")
        super().__init__(check_name(name, "wsgi", "WSGIService"), host, port)
        self.app = app
        self.server = server
        #: waitress's worker threads; werkzeug has none of its own.
        self.threads = WAITRESS_THREADS if threads is None else threads
        self.access_log = bool(access_log)
        self._run: _ServerRun | None = None

    def __repr__(self) -> str:
        return (
            f"<WSGIService {self.name!r} {self._state.value} {self._where()} server={self.server}>"
        )

    async def start(self) -> None:
        """Bind the socket, build a fresh server and serve from a thread; return once it listens.

        Raises:
            OSError: the address cannot be bound.
            MissingExtraError: the chosen server's package is not installed.
            RuntimeError: the service is already running or still stopping.
        """
        done = self._begin()
        token = StopToken()
        try:
            sock = self._listen()
            try:
                port = sock.getsockname()[1]
                app = _with_call(self.app, asyncio.get_running_loop(), token)
                server = self._build_server(sock, app)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            self._start_failed()
            raise
        self._bound_port = port
        run = _ServerRun(done, token, server)
        run.thread = threading.Thread(
            target=self._serve, args=(run,), name=f"offloop-wsgi-{self.name}", daemon=True
        )
        self._run = run
        run.thread.start()
        self._ready()

    def _build_server(self, sock: socket.socket, app: WSGIApp) -> _Server:
        if self.server == "werkzeug":
            return _werkzeug_server(self, sock, app)
        return WaitressServer(
            app,
            sock,
            threads=self.threads,
            thread_prefix=f"offloop-wsgi-{self.name}-worker",
            poll_interval=POLL_INTERVAL,
        )

    def _serve(self, run: _ServerRun) -> None:
        # The serve thread.
        exc: BaseException | None = None
        try:
            run.driver.offloop_serve()
        except BaseException as e:
            exc = _as_crash(self, e)
        finally:
            run.driver.offloop_drain()
        self._finish_threadsafe(run.done, exc)
        del exc  # no reference cycle through the traceback's frames

    # -- stopping ------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, join every thread.

        Bounded by the supervisor's grace period; :meth:`kill` follows if it runs out.
        """
        done = self._mark_stopping()
        run = self._run
        if done is None or run is None:
            return
        run.token.set("service stopping")
        await service_pool().run(run.driver.offloop_stop)
        await asyncio.wait({done})

    def kill(self) -> list[str]:
        """Close every connection now and abandon the threads that still run app code.

        Returns a description (name and stack) of each abandoned thread.
        """
        run = self._run
        if run is None:
            return []
        run.token.set("service killed")
        run.driver.offloop_kill()
        abandoned = [describe_thread(t) for t in run.threads()]
        self._finish(run.done)  # a restart must not wait for abandoned threads
        return abandoned


def _as_crash(service: WSGIService, exc: BaseException) -> BaseException:
    if isinstance(exc, Exception):
        return exc
    crash = OffloopError(f"the server of {service!r} raised {exc!r} in its thread")
    crash.__cause__ = exc
    return crash


def _with_call(app: WSGIApp, loop: asyncio.AbstractEventLoop, token: StopToken) -> WSGIApp:
    """Wrap ``app`` so request threads know the service's loop and token, like offloop workers.

    The server iterates the returned body after the app has returned, so a
    streaming response's generator (and its ``close()``) runs outside the app
    call: the body is wrapped too, or ``current_token()`` there would be a
    fresh token that is never set.
    """
    call = WorkerCall(app, loop, token)

    def offloop_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with _calling(call):
            body = app(environ, start_response)
        if isinstance(body, (bytes, list, tuple)):
            return body  # no app code runs while it is sent
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # waitress sends it from its own loop, unwrapped (no app code either)
        return (_SizedBody if hasattr(body, "__len__") else _Body)(body, call)

    return offloop_wsgi_app


@contextlib.contextmanager
def _calling(call: WorkerCall) -> Iterator[None]:
    previous = thread_state.call
    thread_state.call = call
    try:
        yield
    finally:
        thread_state.call = previous


class _Body:
    """A response body whose iteration and ``close()`` see the service's call and token."""

    def __init__(self, body: Iterable[bytes], call: WorkerCall) -> None:
        self._body = body
        self._call = call
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with _calling(self._call):
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            with _calling(self._call):
                close()


class _SizedBody(_Body):
    # waitress sets Content-Length itself for a one-chunk body it can len().
    def __len__(self) -> int:
        return len(self._body)  # type: ignore[arg-type]


# -- werkzeug ----------------------------------------------------------------------------

_werkzeug_classes: tuple[type[Any], type[Any]] | None = None


def _werkzeug_server(service: WSGIService, sock: socket.socket, app: WSGIApp) -> _Server:
    global _werkzeug_classes
    if _werkzeug_classes is None:
        _werkzeug_classes = _build_werkzeug_classes()
    server_cls, handler_cls = _werkzeug_classes
    # werkzeug dup()s the descriptor; the caller's socket is closed right after.
    server: _Server = server_cls(
        sock, app, handler_cls, f"offloop-wsgi-{service.name}", service.access_log
    )
    sock.close()
    return server


def _build_werkzeug_classes() -> tuple[type[Any], type[Any]]:
    serving = require("werkzeug.serving", "flask", feature="WSGIService(server='werkzeug')")

    class Handler(serving.WSGIRequestHandler):  # type: ignore[misc,name-defined]  # lazy import
        server: Any

        def run_wsgi(self) -> None:
            server = self.server
            with server.offloop_lock:
                server.offloop_busy.add(self.connection)
            try:
                super().run_wsgi()
            finally:
                with server.offloop_lock:
                    server.offloop_busy.discard(self.connection)
                if server.offloop_closing:
                    self.close_connection = True  # no keep-alive while stopping

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if self.server.offloop_access_log:
                super().log_request(code, size)

    class Server(serving.ThreadedWSGIServer):  # type: ignore[misc,name-defined]  # lazy import
        def __init__(
            self,
            sock: socket.socket,
            app: WSGIApp,
            handler: type[Any],
            prefix: str,
            access_log: bool,
        ) -> None:
            host, port = sock.getsockname()[:2]
            super().__init__(host, port, app, handler, fd=sock.fileno())
            self.offloop_prefix = prefix
            self.offloop_access_log = access_log
            self.offloop_lock = threading.Lock()
            self.offloop_connections: set[socket.socket] = set()
            self.offloop_busy: set[socket.socket] = set()
            self.offloop_request_threads: set[threading.Thread] = set()
            self.offloop_closing = False
            self.offloop_numbers = itertools.count(1)

        def process_request(self, request: socket.socket, client_address: Any) -> None:
            # socketserver's version, with named and tracked threads: stop() joins them.
            thread = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"{self.offloop_prefix}-request-{next(self.offloop_numbers)}",
                daemon=True,
            )
            with self.offloop_lock:
                self.offloop_connections.add(request)
                self.offloop_request_threads.add(thread)
            thread.start()

        def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                with self.offloop_lock:
                    self.offloop_connections.discard(request)
                    self.offloop_request_threads.discard(threading.current_thread())

        def offloop_serve(self) -> None:
            self.serve_forever(poll_interval=POLL_INTERVAL)  # closes the socket when it ends

        def offloop_stop(self) -> None:
            self.shutdown()  # blocks until serve_forever has returned

        def offloop_kill(self) -> None:
            self.offloop_close_connections(everything=True)

        def offloop_threads(self) -> list[threading.Thread]:
            with self.offloop_lock:
                return list(self.offloop_request_threads)

        def offloop_close_connections(self, *, everything: bool) -> None:
            # Shutting down the read side ends a keep-alive connection waiting
            # for its next request; a busy one still writes its response.
            with self.offloop_lock:
                self.offloop_closing = True
                conns = set(self.offloop_connections)
                if not everything:
                    conns -= self.offloop_busy
            how = socket.SHUT_RDWR if everything else socket.SHUT_RD
            for conn in conns:
                with contextlib.suppress(OSError):  # already closed by its handler
                    conn.shutdown(how)

        def offloop_drain(self) -> None:
            """After serve_forever: end idle connections, wait for requests in flight."""
            self.offloop_close_connections(everything=False)
            while True:
                with self.offloop_lock:
                    threads = [t for t in self.offloop_request_threads if t.is_alive()]
                if not threads:
                    return
                for thread in threads:
                    thread.join()
                # A request that finished meanwhile may have been keep-alive and idle now.
                self.offloop_close_connections(everything=False)

    return Server, Handler

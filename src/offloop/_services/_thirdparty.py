"""Every third-party internal the service adapters rely on, and the only code that touches them.

waitress, uvicorn and aiohttp have no public way to do all a supervised
service needs, so the adapters reach into them here and nowhere else:

- waitress has no graceful stop at all: ``run()`` returns once its socket map
  is empty, and nothing public closes a channel once its response is sent, or
  runs code in its loop thread. :class:`WaitressServer` drives its loop
  thread (the trigger), its channels and its task dispatcher to stop the
  listener, let requests in flight finish, then end the workers.
- uvicorn's ``Server.serve()`` is used as is, but it must not take Ctrl-C
  from the supervisor, must say when it listens, and a killed service must
  drop its connections and cancel its tasks: :func:`uvicorn_server` and the
  functions after it.
- aiohttp lets a handler run on after its connection is dropped:
  :func:`aiohttp_drop_connections` cancels it.
- asyncio and uvloop do not name the task ``run_until_complete()`` (and so
  ``asyncio.run``) runs: :func:`run_until_complete_task` finds it by the done
  callback they add to it, so a failed supervisor can end it. These are
  callbacks, not attributes, so they are not in :data:`INTERNALS`; the
  contract test runs both loops and checks the task is found.

:data:`INTERNALS` lists every name used beyond the libraries' documented API,
by where it lives; ``tests/test_thirdparty_contract.py`` checks each against
the installed release and names the one that moved. pyproject pins the
tested major versions. A name used here must be added to :data:`INTERNALS`.

Every third-party import is lazy (they are extras) and names its extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from .._core.extras import require

__all__ = [
    "INTERNALS",
    "WaitressServer",
    "aiohttp_drop_connections",
    "run_until_complete_task",
    "uvicorn_abandon",
    "uvicorn_close_listeners",
    "uvicorn_exit",
    "uvicorn_prepare",
    "uvicorn_server",
]

#: The undocumented names offloop relies on, by the object (or module) that has them.
INTERNALS: Final[dict[str, tuple[str, ...]]] = {
    "waitress.create_server(...)": ("_dispatcher",),  # a keyword parameter
    "waitress.task.ThreadedTaskDispatcher": (
        "start_new_thread",  # overridden: offloop's thread names, and a record of them
        "set_thread_count",
        "shutdown",
        "lock",
        "thread_exit_cv",
        "queue_cv",
        "threads",
        "queue",
        "active_count",
    ),
    "waitress.server.TcpWSGIServer": (
        "_map",
        "trigger",
        "accepting",
        "active_channels",
        "adj",
    ),
    "waitress.adjustments.Adjustments": ("channel_timeout",),
    "waitress.trigger.trigger": ("_closed", "pull_trigger"),
    "waitress.channel.HTTPChannel": (
        "requests_lock",
        "requests",
        "request",
        "last_activity",
        "will_close",
        "close_when_flushed",
        "handle_close",
        "cancel",  # the dispatcher's queue holds channels
    ),
    "waitress.parser.HTTPRequestParser": ("headers_finished",),
    "waitress.wasyncore": ("close_all", "dispatcher"),
    "waitress.wasyncore.dispatcher": ("close",),
    "uvicorn.Server": (
        "serve",
        "capture_signals",  # overridden: the supervisor owns SIGINT and SIGTERM
        "startup",  # overridden: tells start() the server listens
        "should_exit",
        "force_exit",
        "server_state",
        "started",
        "servers",  # once started
    ),
    "uvicorn.server.ServerState": ("connections", "tasks"),
    "uvicorn.Config": ("loaded", "load", "lifespan_class", "http_protocol_class"),
    "uvicorn.lifespan.on.LifespanOn": ("main", "send"),  # both overridden
    "uvicorn's HTTP protocol (a connection)": ("transport", "access_log"),
    "aiohttp.web_server.Server": ("connections",),
    "aiohttp.web_protocol.RequestHandler": ("_task_handler", "force_close", "transport"),
}

#: How long kill() waits for idle waitress workers to exit (they do so at once).
IDLE_EXIT: Final = 0.1

_WAITRESS = "WSGIService(server='waitress')"

# -- waitress ----------------------------------------------------------------------------


class WaitressServer:
    """A waitress server on a socket offloop bound, that stops gracefully or is killed.

    The calls a ``WSGIService`` makes of either server: ``offloop_serve()``
    runs waitress's loop (in the service's serve thread) and
    ``offloop_drain()`` follows it there; ``offloop_stop()`` (blocking, from
    another thread) closes the listener, lets every request already received
    be answered and sent, then ends the workers; ``offloop_kill()`` ends
    everything now.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        sock: Any,
        *,
        threads: int,
        thread_prefix: str,
        poll_interval: float,
    ) -> None:
        waitress = require("waitress", "waitress", feature=_WAITRESS)
        self._wasyncore = require("waitress.wasyncore", "waitress", feature=_WAITRESS)
        self._poll_interval = poll_interval
        dispatcher = _dispatcher_class()(thread_prefix)
        dispatcher.set_thread_count(threads)
        try:
            #: waitress's own server.
            self.server: Any = waitress.create_server(
                app, sockets=[sock], threads=threads, _dispatcher=dispatcher
            )
        except BaseException:
            dispatcher.shutdown(timeout=1.0)
            raise
        self._dispatcher = dispatcher

    def offloop_threads(self) -> list[threading.Thread]:
        """The worker threads started so far."""
        return list(self._dispatcher.offloop_threads)

    def offloop_serve(self) -> None:
        """Run waitress's loop; return once every channel is closed (see :meth:`offloop_stop`)."""
        self.server.run()

    def offloop_drain(self) -> None:
        """After :meth:`offloop_serve`: close what is left, wait for the workers to end."""
        self._wasyncore.close_all(self.server._map, ignore_all=True)
        self._dispatcher.offloop_shutdown()

    def offloop_stop(self) -> None:
        """Stop gracefully (blocking: run it off the loop); returns once the workers ended."""
        server, wasyncore = self.server, self._wasyncore
        killed: threading.Event = self._dispatcher.offloop_killed
        drained = threading.Event()

        def close_listener() -> None:
            # Runs in waitress's loop thread: its socket map is not thread-safe.
            server.accepting = False
            wasyncore.dispatcher.close(server)  # not server.close(): keep the trigger

        def close_finished_channels() -> None:
            # Runs in waitress's loop thread, which alone receives requests and
            # closes channels; requests_lock keeps a worker's service() out.
            # The closed listener no longer runs waitress's idle timeout: do it
            # here, or a client that stops reading (or sending) holds stop() forever.
            stale = time.time() - server.adj.channel_timeout
            for channel in list(server.active_channels.values()):
                with channel.requests_lock:
                    if not channel.requests and channel.last_activity < stale:
                        channel.will_close = True
                        abandoned = True
                    else:
                        abandoned = False
                if abandoned:
                    channel.handle_close()
                    continue
                with channel.requests_lock:
                    receiving = channel.request is not None and channel.request.headers_finished
                    if channel.requests or receiving:
                        continue  # an answer is due: queued, running, or its body still arriving
                    # Idle, or its response written: close once the output is sent
                    # and read no further request. A connection still sending its
                    # headers is closed too: nothing says its request will ever end.
                    channel.close_when_flushed = True
            if not server.active_channels:
                drained.set()

        self._pull(close_listener)
        # A worker stops at its next task even with tasks queued: drain the
        # channels first, so every request already received is answered and sent.
        while not killed.is_set():
            if not self._pull(close_finished_channels):
                break  # the serve loop has ended: nothing left to send
            if drained.wait(self._poll_interval):
                break
        self._dispatcher.offloop_shutdown()
        self._close_channels()

    def offloop_kill(self) -> None:
        """Close every connection now; end the waits of :meth:`offloop_stop` and of the drain."""
        self._dispatcher.offloop_kill()
        self._close_channels()

    def _close_channels(self) -> None:
        # Closing every channel (and the trigger itself) empties the map: run() returns.
        self._pull(lambda: self._wasyncore.close_all(self.server._map, ignore_all=True))

    def _pull(self, thunk: Callable[[], None]) -> bool:
        """Run ``thunk`` in waitress's loop thread, unless that loop has already ended.

        Returns whether ``thunk`` was handed to the loop.
        """
        trigger = self.server.trigger
        if trigger._closed:  # its pipe is closed: writing to the old descriptor is unsafe
            return False
        try:
            trigger.pull_trigger(thunk)
        except OSError:  # closed in the meantime: run() has returned
            return False
        return True


_dispatcher_cls: type[Any] | None = None


def _dispatcher_class() -> type[Any]:
    global _dispatcher_cls
    if _dispatcher_cls is None:
        _dispatcher_cls = _build_dispatcher_class()
    return _dispatcher_cls


def _build_dispatcher_class() -> type[Any]:
    task = require("waitress.task", "waitress", feature=_WAITRESS)

    class Dispatcher(task.ThreadedTaskDispatcher):  # type: ignore[misc,name-defined]  # lazy
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.offloop_prefix = prefix
            self.offloop_threads: list[threading.Thread] = []
            self.offloop_killed = threading.Event()

        def start_new_thread(self, target: Callable[[int], None], thread_no: int) -> None:
            # waitress's version, with offloop's thread names and a record for kill().
            thread = threading.Thread(
                target=target,
                name=f"{self.offloop_prefix}-{thread_no}",
                args=(thread_no,),
                daemon=True,
            )
            self.offloop_threads = [t for t in self.offloop_threads if t.is_alive()]
            self.offloop_threads.append(thread)
            thread.start()

        def offloop_shutdown(self) -> None:
            # shutdown() with no timeout of its own: the supervisor's grace is the
            # bound, and kill() must end this wait for a worker stuck in app code.
            self.set_thread_count(0)
            with self.lock:
                self.thread_exit_cv.wait_for(
                    lambda: not self.threads or self.offloop_killed.is_set()
                )
                while self.queue:  # as shutdown(cancel_pending=True) does
                    self.queue.popleft().cancel()
                self.queue_cv.notify_all()

        def offloop_kill(self) -> None:
            self.set_thread_count(0)
            with self.lock:
                self.offloop_killed.set()
                self.thread_exit_cv.notify_all()
                # Idle workers exit within moments; wait for them (briefly: this
                # runs on the loop) so that only workers in app code are reported
                # as abandoned. active_count counts the workers not idle.
                self.thread_exit_cv.wait_for(
                    lambda: len(self.threads) <= self.active_count, timeout=IDLE_EXIT
                )

    return Dispatcher


# -- uvicorn -----------------------------------------------------------------------------

_server_cls: type[Any] | None = None


def uvicorn_server(config: Any, on_listening: Callable[[], None]) -> Any:
    """A ``uvicorn.Server`` whose ``serve()`` leaves the signals alone.

    ``on_listening`` is called once the lifespan startup ran and the socket is served.
    """
    global _server_cls
    if _server_cls is None:
        _server_cls = _build_server_class()
    server = _server_cls(config)
    server.offloop_on_listening = on_listening
    return server


def _build_server_class() -> type[Any]:
    uvicorn = require("uvicorn", "asgi", feature="ASGIService")

    class Server(uvicorn.Server):  # type: ignore[misc,name-defined]  # lazy import
        offloop_on_listening: Callable[[], None]

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # serve() would take SIGINT and SIGTERM for the time it runs (and
            # raise them again after): Ctrl-C belongs to the supervisor.
            yield

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            # A failed lifespan startup is a sys.exit() in startup(), or, in
            # uvicorn 0.30, a return without listening that serve() then ends.
            if self.started:
                self.offloop_on_listening()

    return Server


def uvicorn_prepare(
    config: Any,
    *,
    access_log: bool,
    on_lifespan_task: Callable[[asyncio.Task[Any] | None], None],
    lifespan_failures: dict[str, str],
) -> None:
    """Load ``config`` and adapt it for one run of a service.

    Without ``access_log``, this run's connections log no access line, whatever
    other servers in the process do. The app's lifespan reports the task it
    runs in to ``on_lifespan_task`` (uvicorn keeps no handle a kill could
    cancel) and why a phase failed to ``lifespan_failures`` ("startup" or
    "shutdown": the last line of the app's message), which uvicorn only logs.
    """
    if not config.loaded:
        config.load()
    if not access_log:
        config.http_protocol_class = _without_access_log(config.http_protocol_class)
    lifespan: type[Any] = config.lifespan_class
    if not hasattr(lifespan, "main"):  # lifespan="off": no task, nothing to report
        on_lifespan_task(None)
        return

    class TrackedLifespan(lifespan):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            if config.lifespan == "on":
                # uvicorn swallows an exception the app raises in its lifespan
                # (it only logs it) and gives up: record why, as for a failure
                # the app reports itself. Under "auto" it means "unsupported".
                self.config = _LifespanConfig(config, self._reporting(config.loaded_app))

        def _reporting(self, app: Any) -> Any:
            async def reporting_app(scope: Any, receive: Any, send: Any) -> None:
                try:
                    await app(scope, receive, send)
                except BaseException as exc:
                    phase = "shutdown" if self.startup_event.is_set() else "startup"
                    lifespan_failures.setdefault(phase, f"{type(exc).__name__}: {exc}")
                    raise

            return reporting_app

        async def main(self) -> None:
            on_lifespan_task(asyncio.current_task())
            await super().main()

        async def send(self, message: Any) -> None:
            kind = message.get("type", "")
            if kind in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                lines = str(message.get("message") or "").strip().splitlines()
                lifespan_failures[kind.split(".")[1]] = lines[-1] if lines else "no message"
            await super().send(message)

    config.lifespan_class = TrackedLifespan


class _LifespanConfig:
    """A run's uvicorn config, as its lifespan sees it: the same, but another app."""

    def __init__(self, config: Any, app: Any) -> None:
        self._config = config
        self.loaded_app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _without_access_log(protocol: type[Any]) -> type[Any]:
    # uvicorn decides per connection from its shared logger's handlers; this
    # service's connections skip the access line whatever the others do.
    class QuietProtocol(protocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return QuietProtocol


def uvicorn_exit(server: Any) -> None:
    """Ask a serving uvicorn server to stop: stop listening, finish requests, run the shutdown."""
    server.should_exit = True


def uvicorn_close_listeners(server: Any) -> None:
    """Stop serving the listening sockets (done already if ``serve()`` got to its shutdown).

    Before the socket is closed: one closed under asyncio's server would stay
    registered with the loop.
    """
    for listener in getattr(server, "servers", ()):
        listener.close()


def uvicorn_abandon(server: Any) -> list[asyncio.Task[Any]]:
    """Skip uvicorn's graceful part: stop listening, abort every connection.

    Returns the tasks of the requests still running, for the caller to cancel.
    """
    server.force_exit = True
    uvicorn_close_listeners(server)  # cancelling serve() skips its shutdown
    for conn in list(server.server_state.connections):
        with contextlib.suppress(Exception):
            conn.transport.abort()
    return list(server.server_state.tasks)


# -- aiohttp -----------------------------------------------------------------------------


def aiohttp_drop_connections(server: Any) -> None:
    """Drop every open connection of an aiohttp ``web.Server`` now, cancelling its handler."""
    for conn in list(getattr(server, "connections", ())):
        with contextlib.suppress(Exception):
            conn.force_close()
            transport = conn.transport
            if transport is not None:
                transport.abort()
        # aiohttp lets a handler run on after its client is gone (unless the
        # app opted into handler_cancellation): a killed service must not
        # leave it behind on the loop, so cancel the connection's task.
        task = getattr(conn, "_task_handler", None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()


# -- asyncio and uvloop ------------------------------------------------------------------


def run_until_complete_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    """The task ``loop.run_until_complete()`` runs (``asyncio.run``'s main task), if any.

    No public API names it: it is found by the done callback that
    ``run_until_complete`` adds to it (asyncio's ``_run_until_complete_cb``,
    uvloop's ``run_until_complete.<locals>.done_cb``). None under
    ``run_forever()``, or on a loop whose callbacks cannot be read.
    """
    for task in asyncio.all_tasks(loop):
        for entry in getattr(task, "_callbacks", None) or ():
            fn = entry[0] if isinstance(entry, tuple) else entry
            qualname = getattr(fn, "__qualname__", "")
            if qualname == "_run_until_complete_cb" or qualname.startswith("run_until_complete."):
                return task
    return None

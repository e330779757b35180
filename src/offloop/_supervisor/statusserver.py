"""The status server: a supervisor's status as JSON over HTTP on 127.0.0.1.

``GET /status`` returns every service's status; ``GET /healthz`` returns 200
while every service is running, else 503. ``offloop run --status-port`` serves
it on the supervisor's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any, Final

from .status import ServiceState, SupervisorState
from .supervisor import Supervisor

__all__ = ["StatusServer", "start_status_server", "status_json"]

#: A status client that sends nothing is dropped after this long.
REQUEST_TIMEOUT: Final = 5.0


def status_json(sv: Supervisor) -> dict[str, Any]:
    """The supervisor's state and every service's status, JSON-ready."""
    return {
        "supervisor": sv.name,
        "state": sv.state.value,
        "services": {name: st.to_dict() for name, st in sv.status().items()},
    }


def _healthz(sv: Supervisor) -> tuple[int, dict[str, Any]]:
    not_running = [n for n, st in sv.status().items() if st.state is not ServiceState.RUNNING]
    healthy = sv.state is SupervisorState.RUNNING and not not_running
    return (200 if healthy else 503), {
        "healthy": healthy,
        "state": sv.state.value,
        "not_running": not_running,
    }


class StatusServer:
    """The ``--status-port`` server on the supervisor's loop, and the connections it serves.

    :meth:`aclose` also ends the connections still open: a client that
    connected but has sent nothing yet (a TCP health check) would otherwise
    hold the stop for up to :data:`REQUEST_TIMEOUT` (Python >= 3.12 waits for
    every connection in ``Server.wait_closed()``), or have its handler
    cancelled with the loop, which asyncio logs as an error.
    """

    def __init__(self, sv: Supervisor) -> None:
        self._routes: dict[str, Callable[[], tuple[int, dict[str, Any]]]] = {
            "/status": lambda: (200, status_json(sv)),
            "/healthz": lambda: _healthz(sv),
        }
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}
        self._closing = False

    @property
    def port(self) -> int:
        """The port it listens on (the one picked by the system for port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, port: int) -> StatusServer:
        """Listen on 127.0.0.1:``port``; return the server.

        Raises:
            OSError: the port cannot be bound.
        """
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self

    async def aclose(self) -> None:
        """Stop listening, end the open connections and wait for their handlers."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        handlers = set(self._open.values())
        for writer in list(self._open):
            # The reader sees the end of the stream: a handler waiting for a
            # request returns, one writing an answer gets ConnectionError.
            writer.close()
        if handlers:
            # They end on the next loop iterations; the bound only guards a bug.
            _, stuck = await asyncio.wait(handlers, timeout=REQUEST_TIMEOUT)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task
        try:
            if self._closing:
                return  # accepted just before aclose(), which did not see it
            await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass  # a client that hung up or sent garbage gets nothing
        except ConnectionError:
            pass
        finally:
            del self._open[writer]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
        allow = ""
        if request_line is None:
            code, body = 431, {"error": f"request head over {MAX_HEAD} bytes"}
            method = "GET"
        else:
            method, target, *_ = [*request_line.decode("latin-1").split(" "), ""]
            path = target.split("?", 1)[0]
            if path not in self._routes:
                code, body = 404, {"error": f"no such path {path!r}; try /status or /healthz"}
            elif method not in ("GET", "HEAD"):
                code, body = 405, {"error": f"method {method} not allowed; use GET"}
                allow = "Allow: GET, HEAD\r\n"
            else:
                code, body = self._routes[path]()
        payload = json.dumps(body, indent=2).encode() + b"\n"
        writer.write(
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\n{allow}"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + (payload if method != "HEAD" else b"")
        )
        await writer.drain()


_REASONS: Final = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

#: The most bytes of request line and headers the status server reads.
MAX_HEAD: Final = 16384


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line of a request head (read to its empty line); None if it is too long.

    Lines may end in CRLF or a bare LF, as RFC 9112 lets a server accept. A
    head over :data:`MAX_HEAD` is still read to its end (up to a limit), so
    that closing the connection does not reset it before the 431 arrives.

    Raises:
        asyncio.IncompleteReadError: the client hung up first.
    """
    first: bytes | None = None
    size = 0
    rest_of_long_line = False
    while size <= 64 * MAX_HEAD:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:  # one line over the reader's limit
            size += len(await reader.readexactly(exc.consumed))
            first = b""
            rest_of_long_line = True  # what follows is that line's end, not a new line
            continue
        size += len(line)
        if rest_of_long_line:
            rest_of_long_line = False
            continue
        line = line.rstrip(b"\r\n")
        if line:
            first = line if first is None else first
        elif first is not None:  # RFC 9112: empty lines before the request line are ignored
            return first if size <= MAX_HEAD and first else None
    return None


async def start_status_server(sv: Supervisor, port: int) -> StatusServer:
    """Serve ``GET /status`` and ``GET /healthz`` for ``sv`` on 127.0.0.1:``port``.

    Close it with :meth:`StatusServer.aclose`.

    Raises:
        OSError: the port cannot be bound.
    """
    return await StatusServer(sv).start(port)

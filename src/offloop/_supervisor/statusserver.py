"""The status server: a supervisor's status as JSON over HTTP on 127.0.0.1.

``GET /status`` returns every service's status, the loop's lag and the
detector's last blocks; ``GET /healthz`` (liveness) returns 200 while the
supervisor's loop responds within the liveness threshold; ``GET /readyz``
(readiness) returns 200 while every service that has not finished is ready;
``GET /metrics`` gives the Prometheus text format (see :mod:`.metrics`).
``Supervisor(status_port=...)`` (and so ``offloop run --status-port``) serves
it on the supervisor's loop, from before the first service starts to after
the last one stopped (:mod:`.probes`).

Why a hand-written ``asyncio.Protocol`` on the supervisor's own loop, and not
``http.server`` in a thread, ``aiohttp``, or asyncio streams
(``benchmarks/bench_status.py`` measures all of them in one process):

- Liveness. A health check must fail when the loop stops responding. Every
  answer here is built by the loop, so a blocked loop gets no answer. A server
  thread can only tell by asking the loop for each answer; one that does not
  answers 200 beside a blocked loop.
- A busy loop. On a loop that computes between awaits, a server thread
  competes with it for the GIL at every step of a request (accept, read,
  parse, write), each wait up to a switch interval: the thread that asks the
  loop has a lower median there than any server on the loop (one loop
  callback per request) but a tail several times this server's, and the tail
  is what times a probe out. On the loop, a request waits for as many
  iterations as it takes steps: this
  protocol answers in five and creates no task; streams (``start_server``)
  take eight (a task and a stream reader per connection), and so 1.5 to 2
  times the latency; ``aiohttp`` does more per request still. Idle, all of
  them answer alike.
- The loop's lag under a stream of requests. A server on the loop does the
  socket work there, so it can lag the loop somewhat more than a thread that
  only asks the loop to build the answer; the difference is small (and within
  the noise of a shared machine) next to that thread's tail on a busy loop.
  ``aiohttp`` lags the loop the most.
- ``aiohttp`` is an extra, which the core must not need, and it wins nothing.
- Bounded work. A protocol sees each read once: the head is searched with
  ``bytes.find`` (no Python loop over its lines), at most :data:`MAX_HEAD`
  bytes are kept, a client that keeps sending after its answer is drained for
  at most :data:`MAX_DRAIN` bytes, and every connection ends within
  :data:`REQUEST_TIMEOUT`. A client sending empty lines costs each read one
  ``lstrip`` and gets 400 after a few of them.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import socket
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from .._core.validate import check_seconds
from .metrics import CONTENT_TYPE, metrics_text
from .status import ServiceState, SupervisorState

if TYPE_CHECKING:
    from .view import SupervisorView

__all__ = ["StatusServer", "start_status_server", "status_json"]

#: A connection still open this long after it was accepted is dropped (a
#: silent client, one that sends its head a byte at a time, or one that does
#: not read its answer).
REQUEST_TIMEOUT: Final = 5.0
#: The most bytes of request line and headers the server keeps (431 beyond).
MAX_HEAD: Final = 16384
#: After an answer sent before the client's head ended (400, 431), the rest is
#: read and dropped (so closing does not reset the connection before the
#: client has read the answer), up to this many bytes; then it is closed.
MAX_DRAIN: Final = 64 * MAX_HEAD
#: Empty lines before the request line that are ignored (RFC 9112 asks for at
#: least one; counted as CRLF pairs, so twice as many bare LFs); more is not a
#: client that means well: 400.
MAX_EMPTY_LINES: Final = 4
#: The listen backlog: asyncio's default (100) makes a burst of connections
#: wait for SYN retries (a second or more) once the queue is full, a normal
#: health check among them. The kernel caps it (``net.core.somaxconn``).
BACKLOG: Final = max(socket.SOMAXCONN, 1024)

_TOKEN: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
#: RFC 9112: method SP request-target SP HTTP-version, each version one digit.
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?")
#: Every header line is ``name: value``; no space before the colon, no line
#: folding, no NUL or bare CR (RFC 9112 5.1 and 5.2 allow a 400 for these).
_FIELD_LINES: Final = re.compile(rb"(?:" + _TOKEN + rb":[^\x00\r\n]*\r?\n)*")
_TOKEN_BYTES: Final = frozenset(
    b"!#$%&'*+.^_`|~-" + (string.digits + string.ascii_letters).encode()
)
_ABSOLUTE: Final = re.compile(r"https?://[^/?#]*", re.IGNORECASE)

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

#: The default of ``liveness_threshold``: the loop may be unresponsive this
#: long before ``/healthz`` fails (Kubernetes' default probe timeout).
LIVENESS_THRESHOLD: Final = 1.0

#: A JSON body (a dict) or a text one (a str, the metrics).
_Answer = tuple[int, dict[str, Any] | str]

#: A stopping supervisor is live too: its stop is bounded (``grace``), and a
#: liveness probe failing during it would have an orchestrator kill the
#: process in the middle of its graceful stop. ``/readyz`` fails then instead.
_LIVE_STATES: Final = (SupervisorState.STARTING, SupervisorState.RUNNING, SupervisorState.STOPPING)
_READY_STATES: Final = (ServiceState.RUNNING, ServiceState.DONE)


def status_json(sv: SupervisorView) -> dict[str, Any]:
    """The supervisor's state, every service's status, the loop's lag and the last blocks."""
    return {
        "supervisor": sv.name,
        "state": sv.state.value,
        "services": {name: st.to_dict() for name, st in sv.status().items()},
        "loop_lag": sv._health.lag(),
        "blocks": sv._health.last_blocks(),
    }


def _healthz(sv: SupervisorView, threshold: float) -> _Answer:
    # Answered on the loop: a loop blocked right now answers nothing, and one
    # just back from a block longer than the threshold answers 503.
    stalled = sv._health.unresponsive_for()
    responds = stalled <= threshold
    live = responds and sv.state in _LIVE_STATES
    body: dict[str, Any] = {"live": live, "state": sv.state.value}
    if not responds:
        body["error"] = (
            f"the supervisor's loop did not respond for {stalled:.3f} s (threshold {threshold:g} s)"
        )
    return (200 if live else 503), body


def _readyz(sv: SupervisorView) -> _Answer:
    not_ready = [n for n, st in sv.status().items() if st.state not in _READY_STATES]
    ready = sv.state is SupervisorState.RUNNING and not not_ready
    return (200 if ready else 503), {
        "ready": ready,
        "state": sv.state.value,
        "not_ready": not_ready,
    }


def _error(code: int, message: str) -> _Answer:
    return code, {"error": message}


def _end_of_head(head: bytearray, start: int) -> int:
    """The index of the LF that ends the head's last line (before its empty line), or -1."""
    ends = [i for i in (head.find(b"\n\n", start), head.find(b"\n\r\n", start)) if i >= 0]
    return min(ends) if ends else -1


def _parse_head(head: bytes, routes: dict[str, Callable[[], _Answer]]) -> tuple[str, _Answer]:
    """The method and the answer to a request head (its lines, each ending in LF).

    400 for a malformed request line or header line (a line without a
    version is HTTP/0.9, whose clients could not read a status line anyway),
    505 for a well-formed version whose major is not 1: the request is not
    malformed, and RFC 9110 15.6.6 names 505 for a major version the server
    does not support (a later 1.x is answered as 1.1, as RFC 9112 2.3 asks),
    404 for an unknown path, 405 for a method other than GET or HEAD.
    """
    line, _, fields = head.partition(b"\n")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        shown = line.rstrip(b"\r")[:80].decode("latin-1")
        return "GET", _error(
            400,
            f"malformed request line {shown!r}: send 'GET /status HTTP/1.1' "
            f"(a method, a path and the HTTP version, separated by single spaces)",
        )
    method = match[1].decode("ascii")
    if match[3] != b"1":
        version = f"HTTP/{match[3].decode()}.{match[4].decode()}"
        return method, _error(505, f"{version} is not supported: send HTTP/1.1 or HTTP/1.0")
    if _FIELD_LINES.fullmatch(fields) is None:
        return method, _error(
            400, "malformed header line: each must be 'Name: value', with no space before the colon"
        )
    target = match[2].decode("ascii")
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:  # RFC 9112 3.2.2: a server must accept the absolute form
        target = target[absolute.end() :] or "/"
    if not target.startswith("/"):
        return method, _error(400, f"request target {target!r} is not a path such as /status")
    path = target.split("?", 1)[0]
    route = routes.get(path)
    if route is None:
        return method, _error(
            404, f"no such path {path!r}; try /status, /healthz, /readyz or /metrics"
        )
    if method not in ("GET", "HEAD"):
        return method, _error(405, f"method {method} not allowed; use GET")
    return method, route()


def _response(method: str, code: int, body: dict[str, Any] | str) -> bytes:
    if isinstance(body, str):
        payload, kind = body.encode(), CONTENT_TYPE
    else:
        payload, kind = json.dumps(body, indent=2).encode() + b"\n", "application/json"
    allow = "Allow: GET, HEAD\r\n" if code == 405 else ""
    return (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {kind}\r\n{allow}"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + (payload if method != "HEAD" else b"")
    )


class _Phase(enum.Enum):
    HEAD = "reading the head"
    DRAINING = "answered early, dropping the rest"
    DONE = "answered"


class _Connection(asyncio.Protocol):
    """One client: read its head, answer once, close."""

    def __init__(self, server: StatusServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = bytearray()
        self._empty = 0  # bytes of CR/LF seen before the request line
        self._drained = 0
        self._phase = _Phase.HEAD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        if not self._server._add(self):
            self._transport.close()  # accepted just before aclose(), which did not see it
            return
        self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server._discard(self)

    def close(self) -> None:
        """End the connection (the server is closing)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, with whatever it has not sent yet."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        # Each read costs a few C-level scans of this read's bytes at most: a
        # client cannot make the loop iterate over its input in Python.
        if self._phase is _Phase.DRAINING:
            self._drained += len(data)
            if self._drained > MAX_DRAIN:
                self.close()
            return
        if self._phase is _Phase.DONE:
            return
        if not self._head:
            stripped = data.lstrip(b"\r\n")
            self._empty += len(data) - len(stripped)
            if self._empty > 2 * MAX_EMPTY_LINES:
                self._answer_early(
                    _error(400, f"more than {MAX_EMPTY_LINES} empty lines before the request line")
                )
                return
            if not stripped:
                return
            if stripped[0] not in _TOKEN_BYTES:  # not HTTP (TLS, binary): no need to wait
                self._answer_early(_error(400, "not an HTTP request; send 'GET /status HTTP/1.1'"))
                return
            data = stripped
        start = max(0, len(self._head) - 2)  # the empty line may straddle two reads
        self._head += data
        end = _end_of_head(self._head, start)
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._answer_early(_error(431, f"request head over {MAX_HEAD} bytes"))
            return
        if end >= MAX_HEAD:
            method, answer = "GET", _error(431, f"request head over {MAX_HEAD} bytes")
        else:
            method, answer = _parse_head(bytes(self._head[: end + 1]), self._server._routes)
        self._phase = _Phase.DONE
        self._head = bytearray()
        assert self._transport is not None
        self._transport.write(_response(method, *answer))
        self._transport.close()

    def _answer_early(self, answer: _Answer) -> None:
        """Answer before the head's end; half-close, then drop what the client still sends."""
        assert self._transport is not None
        self._phase = _Phase.DRAINING
        self._head = bytearray()
        self._transport.write(_response("GET", *answer))
        if self._transport.can_write_eof():
            self._transport.write_eof()
        else:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done (or gave up): close

    def __repr__(self) -> str:
        peer = None if self._transport is None else self._transport.get_extra_info("peername")
        return f"<status connection {peer} {self._phase.value}>"


class _ServerState(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    CLOSING = "closing"
    CLOSED = "closed"


class StatusServer:
    """The status server on the supervisor's loop, and the connections it serves.

    :meth:`aclose` also ends the connections still open: a client that
    connected but has sent nothing yet (a TCP health check) would otherwise
    hold the stop for up to :data:`REQUEST_TIMEOUT` (Python >= 3.12 waits for
    every connection in ``Server.wait_closed()``).
    """

    def __init__(
        self, sv: SupervisorView, *, liveness_threshold: float = LIVENESS_THRESHOLD
    ) -> None:
        threshold = check_seconds(liveness_threshold, "liveness_threshold", positive=True)
        self._name = sv.name
        self._routes: dict[str, Callable[[], _Answer]] = {
            "/status": lambda: (200, status_json(sv)),
            "/healthz": lambda: _healthz(sv, threshold),
            "/readyz": lambda: _readyz(sv),
            "/metrics": lambda: (200, metrics_text(sv)),
        }
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()
        self._all_gone: asyncio.Event | None = None
        self._state = _ServerState.NEW
        self._host = "127.0.0.1"

    @property
    def port(self) -> int:
        """The port it listens on (the one picked by the system for port 0).

        Raises:
            RuntimeError: it is not serving (not started yet, or closed).
        """
        if self._state is _ServerState.NEW:
            raise RuntimeError(f"{self!r} has no port: await start(port) first.")
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self!r} has no port any more: it is {self._state.value}.")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, port: int, *, host: str = "127.0.0.1") -> StatusServer:
        """Listen on ``host``:``port`` (this machine only by default); return the server.

        Raises:
            OSError: the port cannot be bound.
            RuntimeError: it has already started (or closed).
        """
        if self._state is _ServerState.SERVING:
            raise RuntimeError(f"Cannot start {self!r}: it is already serving.")
        if self._state is not _ServerState.NEW:
            raise RuntimeError(
                f"Cannot start {self!r}: it has been closed. Create a new StatusServer."
            )
        loop = asyncio.get_running_loop()
        self._host = host
        self._server = await loop.create_server(self._connection, host, port, backlog=BACKLOG)
        self._state = _ServerState.SERVING
        return self

    def _connection(self) -> _Connection:
        return _Connection(self)

    def _add(self, conn: _Connection) -> bool:
        if self._state is not _ServerState.SERVING:
            return False
        self._open.add(conn)
        return True

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if not self._open and self._all_gone is not None:
            self._all_gone.set()

    async def aclose(self) -> None:
        """Stop listening, end the open connections and wait until they are gone."""
        if self._state is _ServerState.NEW:
            self._state = _ServerState.CLOSED
        if self._state is _ServerState.CLOSED:
            return
        assert self._server is not None
        if self._state is _ServerState.SERVING:
            self._state = _ServerState.CLOSING
            self._all_gone = asyncio.Event()
            self._server.close()
            for conn in list(self._open):
                # The client sees the end of the stream; an answer being sent
                # is sent first, to a client that reads it.
                conn.close()
        if self._open:
            assert self._all_gone is not None
            try:
                await asyncio.wait_for(self._all_gone.wait(), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                for conn in list(self._open):  # clients that do not read their answer
                    conn.abort()
        await self._server.wait_closed()
        self._state = _ServerState.CLOSED

    def __repr__(self) -> str:
        where = ""
        if self._state is _ServerState.SERVING:
            where = f" on {self._host}:{self.port}"
        return (
            f"<StatusServer of {self._name!r} {self._state.value}{where}, "
            f"{len(self._open)} open connection(s)>"
        )


async def start_status_server(
    sv: SupervisorView,
    port: int,
    *,
    liveness_threshold: float = LIVENESS_THRESHOLD,
    host: str = "127.0.0.1",
) -> StatusServer:
    """Serve the probes of ``sv`` on ``host``:``port``: status, healthz, readyz and metrics.

    ``/healthz`` fails once the supervisor's loop has not responded for
    ``liveness_threshold`` seconds. Close it with :meth:`StatusServer.aclose`.
    ``Supervisor(status_port=...)`` opens and closes one with the supervisor.

    Raises:
        OSError: the port cannot be bound.
        TypeError, ValueError: ``liveness_threshold`` is not a number of seconds > 0.
    """
    return await StatusServer(sv, liveness_threshold=liveness_threshold).start(port, host=host)

"""The status server on raw sockets: what it answers to odd, hostile and bursty clients.

The CLI's own tests (``test_cli_run.py``) run it end to end behind
``offloop run --status-port``; these talk to it directly on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offloop import Supervisor
from offloop._supervisor import statusserver
from offloop._supervisor.statusserver import (
    MAX_DRAIN,
    StatusServer,
    start_status_server,
)
from tests.helpers import await_until

HTTP_TIMEOUT = 5.0
GET = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"


async def _raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def _serving(name: str = "raw") -> AsyncIterator[StatusServer]:
    server = await start_status_server(Supervisor(name=name), 0)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.aclose(), HTTP_TIMEOUT)


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.loops("asyncio")
async def test_the_status_server_answers_bare_lf_oversized_heads_and_names_allowed_methods() -> (
    None
):
    async with _serving() as server:
        # Lines ending in a bare LF (RFC 9112 lets a server accept them).
        bare = await _raw_request(server.port, b"GET /healthz HTTP/1.0\nHost: x\n\n")
        assert bare.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), bare
        assert b'"live": false' in bare  # a supervisor not started is not live
        # A head too big to read: 431, not a silently closed connection; what
        # the client still sends is read (and dropped), so closing the
        # connection does not reset it before the client reads the answer.
        for pad in (20_000, 100_000, 600_000):
            huge = b"GET /status HTTP/1.1\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"
            too_big = await _raw_request(server.port, huge)
            assert too_big.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        # A 405 says which methods are allowed, as RFC 9110 requires.
        post = await _raw_request(server.port, b"POST /status HTTP/1.1\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), post
        assert b"\r\nAllow: GET, HEAD\r\n" in post
        ok = await _raw_request(server.port, b"\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n"), ok


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"hello\r\n\r\n", b"400 Bad Request"),
        (b"GET /status\r\n\r\n", b"400 Bad Request"),  # HTTP/0.9: no version
        (b"GET /status HTTP/1.10\r\n\r\n", b"400 Bad Request"),
        (b"GET  /status HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET status HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /status HTTP/1.1\r\nno colon\r\n\r\n", b"400 Bad Request"),
        (b"GET /status HTTP/1.1\r\nHost : x\r\n\r\n", b"400 Bad Request"),
        (b"GET /status HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", b"400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400 Bad Request"),  # TLS
        (b"GET /status HTTP/9.9\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /status HTTP/2.0\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /status HTTP/0.9\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /status HTTP/1.9\r\n\r\n", b"200 OK"),  # a later 1.x is served as 1.1
        (b"GET http://127.0.0.1:9/status HTTP/1.1\r\n\r\n", b"200 OK"),  # absolute form
        (b"GET /status?pretty=1 HTTP/1.0\r\nX-A: b: c\r\n\r\n", b"200 OK"),
        (b"GET /nope HTTP/1.1\r\n\r\n", b"404 Not Found"),
    ],
    ids=lambda v: v.decode("latin-1")[:24].replace("\r\n", "|") if isinstance(v, bytes) else v,
)
async def test_malformed_requests_get_400_and_other_http_versions_505(
    request_bytes: bytes, status_line: bytes
) -> None:
    async with _serving() as server:
        answer = await _raw_request(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status_line + b"\r\n"), answer
    assert answer.endswith(b"\n}\n")  # a JSON body says what was wrong, or the status


@pytest.mark.loops("asyncio")
async def test_blank_line_clients_get_400_and_do_not_hold_up_a_normal_client() -> None:
    # Each sends 1 MiB of empty lines. They were read a line at a time on the
    # loop, and the loop stalled for as long as it took: now a few empty lines
    # get 400 and the rest is dropped a read at a time.
    flooders = 8
    sent = [threading.Event() for _ in range(flooders)]
    release = threading.Event()
    answers: list[bytes] = []

    def flood(port: int, sent: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(b"\r\n" * (512 * 1024))
            sent.set()
            release.wait(HTTP_TIMEOUT)
            answers.append(_read_to_end(sock))

    async with _serving() as server:
        threads = [threading.Thread(target=flood, args=(server.port, ev)) for ev in sent]
        for t in threads:
            t.start()
        try:
            for ev in sent:
                assert await asyncio.to_thread(ev.wait, HTTP_TIMEOUT), "a flood was not sent"
            # All of them connected, their blank lines sent: a normal client is served.
            ok = await _raw_request(server.port, GET)
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n"), ok
        finally:
            release.set()
            for t in threads:
                await asyncio.to_thread(t.join, HTTP_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert len(answers) == flooders
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
        assert b"empty lines before the request line" in answer


@pytest.mark.loops("asyncio")
async def test_a_client_that_never_stops_sending_is_cut_off() -> None:
    # After its early answer the server drops what a client still sends, up
    # to MAX_DRAIN bytes; then it closes, and the client's sends fail.
    cap = 64 * MAX_DRAIN
    outcome: list[BaseException | int] = []

    def endless(port: int) -> None:
        chunk = b"\r\n" * 32768
        total = 0
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
            try:
                while total < cap:
                    sock.sendall(chunk)
                    total += len(chunk)
            except OSError as exc:
                outcome.append(exc)
                return
        outcome.append(total)

    async with _serving() as server:
        await asyncio.to_thread(endless, server.port)
    assert len(outcome) == 1
    assert isinstance(outcome[0], (ConnectionResetError, BrokenPipeError)), outcome


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


BURST = 300


@pytest.mark.loops("asyncio")
@pytest.mark.skipif(
    sys.platform != "linux" or _somaxconn() < BURST,
    reason="Linux drops a SYN when the listen queue is full, which this relies on; the "
    "kernel must allow a queue of BURST (net.core.somaxconn)",
)
async def test_a_burst_of_connections_waits_in_the_listen_queue() -> None:
    # The loop accepts none of them while this test runs without awaiting:
    # with asyncio's default backlog of 100, connections past it were not
    # established, and a health check among them waited for a SYN retry.
    async with _serving("burst") as server:
        socks: list[socket.socket] = []
        try:
            for _ in range(BURST):
                sock = socket.socket()
                socks.append(sock)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))
            poller = select.poll()
            pending = {sock.fileno(): sock for sock in socks}
            for fd in pending:
                poller.register(fd, select.POLLOUT)
            deadline = asyncio.get_running_loop().time() + HTTP_TIMEOUT
            while pending and asyncio.get_running_loop().time() < deadline:
                for fd, _ in poller.poll(100):
                    assert pending.pop(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    poller.unregister(fd)
            assert not pending, f"{len(pending)} of {BURST} connections were not established"
            # The last one is a health check: answered once the loop runs again.
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(socks[-1], GET)
            answer = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(socks[-1], 65536), HTTP_TIMEOUT):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.loops("asyncio")
async def test_a_connection_accepted_just_before_the_status_server_closes_ends_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The connection is accepted, its connection_made() scheduled, and aclose()
    # runs in between: it does not see the connection. The connection must
    # end with the close, not at its timeout (too long here to pass for one).
    monkeypatch.setattr(statusserver, "REQUEST_TIMEOUT", 3600.0)
    server = StatusServer(Supervisor(name="late"))
    closing: list[asyncio.Future[None]] = []
    make = server._connection

    def late_connection() -> statusserver._Connection:
        closing.append(asyncio.ensure_future(server.aclose()))  # runs before connection_made
        return make()

    server._connection = late_connection  # type: ignore[method-assign]
    await server.start(0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await await_until(lambda: bool(closing), HTTP_TIMEOUT, "the connection to be accepted")
        await asyncio.wait_for(closing[0], HTTP_TIMEOUT)
        assert await asyncio.wait_for(reader.read(), HTTP_TIMEOUT) == b""
        assert "closed, 0 open connection(s)" in repr(server)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.loops("asyncio")
async def test_the_status_server_lifecycle_is_checked_and_shown() -> None:
    server = StatusServer(Supervisor(name="life"))
    assert repr(server) == "<StatusServer of 'life' new, 0 open connection(s)>"
    with pytest.raises(RuntimeError, match=r"has no port: await start\(port\) first"):
        _ = server.port
    await server.start(0)
    try:
        assert f"serving on 127.0.0.1:{server.port}" in repr(server)
        with pytest.raises(RuntimeError, match="it is already serving"):
            await server.start(0)
    finally:
        await server.aclose()
    await server.aclose()  # once closed, closing again does nothing
    with pytest.raises(RuntimeError, match=r"it has been closed\. Create a new StatusServer"):
        await server.start(0)

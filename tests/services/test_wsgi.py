"""WSGIService: a real Flask app on real werkzeug and waitress servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import flask
import pytest

import offloop
from offloop import Supervisor, WSGIService
from offloop._services.wsgi import WSGIServer as WSGIServerName
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded, refuses, wsgi_threads

SERVERS = ("werkzeug", "waitress")


def make_app(
    release: threading.Event | None = None, entered: threading.Event | None = None
) -> flask.Flask:
    app = flask.Flask("offloop_test")

    @app.get("/")
    def index() -> str:
        return f"hello from {threading.current_thread().name}"

    @app.get("/slow")
    def slow() -> str:
        # Waits for the service's stop token (offloop sets it on stop) or the release event.
        assert entered is not None
        assert release is not None
        entered.set()
        token = offloop.current_token()
        while not release.is_set():
            if token.wait(0.01):
                return "stopped by token"
        return "released"

    @app.get("/stubborn")
    def stubborn() -> str:
        # Ignores the token: only the release event ends it.
        assert entered is not None
        assert release is not None
        entered.set()
        release.wait(WAIT * 2)
        return "finally"

    return app


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=WAIT) as resp:
        return resp.status, resp.read().decode()


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_flask_is_served_and_the_port_closes_on_stop(server: WSGIServerName) -> None:
    svc = WSGIService(make_app(), port=0, server=server, name="web")
    assert repr(svc) == f"<WSGIService 'web' idle 127.0.0.1:0 server={server}>"
    await svc.start()
    assert svc.port != 0
    assert svc.url == f"http://127.0.0.1:{svc.port}"
    assert repr(svc) == f"<WSGIService 'web' running url={svc.url} server={server}>"
    status, body = await offloop.to_thread(fetch, svc.url)
    assert status == 200
    assert body.startswith("hello from offloop-wsgi-web-")  # app code runs in offloop's threads
    waiter = asyncio.ensure_future(svc.wait())
    await svc.stop()
    await asyncio.wait_for(waiter, WAIT)  # a stopped service's wait() returns normally
    assert repr(svc) == f"<WSGIService 'web' stopped 127.0.0.1:{svc.port} server={server}>"
    assert refuses(svc.port)
    assert wsgi_threads() == []


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_restart_serves_again_on_the_same_port(server: WSGIServerName) -> None:
    svc = WSGIService(make_app(), port=0, server=server, access_log=False)
    await svc.start()
    first = svc.port
    await svc.stop()
    await svc.start()  # fresh server, same URL for clients
    assert svc.port == first
    assert (await offloop.to_thread(fetch, svc.url))[0] == 200
    await svc.stop()
    assert refuses(first)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_idle_connections_do_not_hold_up_stop(server: WSGIServerName) -> None:
    svc = WSGIService(make_app(), port=0, server=server, access_log=False)
    await svc.start()
    # A client that connected and sent nothing, and one that made a request on
    # an HTTP/1.1 connection it keeps open (waitress keeps it alive; werkzeug
    # closes after each response).
    idle = socket.create_connection(("127.0.0.1", svc.port), timeout=WAIT)
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=WAIT)

    def first_request() -> int:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status

    try:
        assert await offloop.to_thread(first_request) == 200
        await asyncio.wait_for(svc.stop(), WAIT)
        assert wsgi_threads() == []
        assert idle.recv(1) == b""  # the server closed its end
    finally:
        idle.close()
        conn.close()


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_stop_lets_a_request_in_flight_finish_and_sets_its_token(
    server: WSGIServerName,
) -> None:
    entered, release = threading.Event(), threading.Event()
    svc = WSGIService(make_app(release, entered), port=0, server=server, access_log=False)
    await svc.start()
    request = offloop.to_thread(fetch, svc.url + "/slow")
    try:
        assert await offloop.to_thread(entered.wait, WAIT)
        await asyncio.wait_for(svc.stop(), WAIT)
        # The view saw its token set, returned, and its response was delivered.
        assert await asyncio.wait_for(request, WAIT) == (200, "stopped by token")
    finally:
        release.set()
    assert refuses(svc.port)


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_port_in_use_is_a_clear_error_and_the_service_starts_later() -> None:
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    svc = WSGIService(make_app(), port=port, name="web")
    try:
        with pytest.raises(
            OSError, match=r"<WSGIService 'web' .*cannot listen on 127\.0\.0\.1:"
        ) as info:
            await svc.start()
        # The address once, as host:port (not also socket's "(while attempting to bind on
        # address ('127.0.0.1', N))"), then what to do.
        assert str(info.value).endswith(
            f"cannot listen on 127.0.0.1:{port}: Address already in use. Stop the program "
            f"using it, pick another port, or pass port=0 for any free one."
        )
        assert info.value.errno == errno.EADDRINUSE
        assert svc.state.value == "crashed"
        with pytest.raises(RuntimeError, match="has not been started"):
            await svc.wait()
    finally:
        blocker.close()
    await svc.start()  # the failed start left nothing behind
    assert svc.port == port
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_crashed_serve_thread_makes_wait_raise() -> None:
    svc = WSGIService(make_app(), port=0, access_log=False)
    await svc.start()
    server = svc._run.server  # type: ignore[union-attr]

    def broken() -> None:
        raise RuntimeError("select() went wrong")

    server.service_actions = broken  # werkzeug's serve loop calls it on every turn
    with pytest.raises(RuntimeError, match="select"):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "crashed"
    assert refuses(svc.port)
    await await_until(lambda: wsgi_threads() == [], WAIT, "the serve thread to end")
    await svc.start()  # restartable after a crash
    assert (await offloop.to_thread(fetch, svc.url))[0] == 200
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_illegal_moves_have_their_own_messages() -> None:
    svc = WSGIService(make_app(), port=0, name="web")
    with pytest.raises(
        RuntimeError, match=r"Cannot wait for <WSGIService 'web' idle .*not been started"
    ):
        await svc.wait()
    await svc.stop()  # stopping an idle service does nothing
    await svc.start()
    with pytest.raises(
        RuntimeError, match=r"Cannot start <WSGIService 'web' running .*already running"
    ):
        await svc.start()
    await svc.stop()
    await svc.stop()  # twice is fine


def test_bad_arguments_are_named() -> None:
    app = make_app()
    with pytest.raises(TypeError, match=r"WSGIService\(app\) needs a WSGI application"):
        WSGIService("app:app")  # type: ignore[arg-type]

    # A factory used to be accepted, and every request then failed with a 500.
    def create_app() -> flask.Flask:
        return make_app()

    with pytest.raises(TypeError, match=r"create_app' cannot take those .*create_app\(\)\)"):
        WSGIService(create_app)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"server=\.\.\.\) must be 'werkzeug' or 'waitress', got 'gunicorn'"
    ):
        WSGIService(app, server="gunicorn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"port=\.\.\.\) must be between 0 and 65535"):
        WSGIService(app, port=70000)
    with pytest.raises(TypeError, match=r"port=\.\.\.\) must be an int, got"):
        WSGIService(app, port="8000")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        WSGIService(app, threads=0)
    with pytest.raises(
        ValueError,
        match=r"^WSGIService\(threads=16\) sets waitress's pool of worker threads, but "
        r"server='werkzeug' starts a thread per connection .* Drop threads=, or pass "
        r"server='waitress' for a fixed pool of 16\.$",
    ):
        WSGIService(app, threads=16)
    with pytest.raises(TypeError, match=r"name=\.\.\.\) must be a non-empty str"):
        WSGIService(app, name="")


@pytest.mark.loops("asyncio", "uvloop")
@bounded(30)
async def test_under_a_supervisor_beside_a_bot_and_restarted_after_a_crash() -> None:
    sv = Supervisor(name="site", grace=2.0)
    web = sv.add(WSGIService(make_app(), port=0, name="web", access_log=False), backoff=0.01)
    ticks = 0

    @sv.service
    async def bot() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async with sv:
        assert (await offloop.to_thread(fetch, web.url))[0] == 200
        port = web.port

        def broken() -> None:
            raise RuntimeError("serve loop broke")

        web._run.server.service_actions = broken  # type: ignore[union-attr]
        await await_until(lambda: sv.status()["web"].restarts == 1, WAIT, "the restart")
        await await_until(lambda: sv.status()["web"].state == "running", WAIT, "web running again")
        assert web.port == port  # same URL after the restart
        assert (await offloop.to_thread(fetch, web.url))[0] == 200
        assert "serve loop broke" in repr(sv.status()["web"].last_error)
        before = ticks
        await await_until(lambda: ticks > before, WAIT, "the bot to tick")
    assert {n: s.state for n, s in sv.status().items()} == {"web": "stopped", "bot": "stopped"}
    assert refuses(port)
    assert wsgi_threads() == []


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_view_that_ignores_stop_is_abandoned_after_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered, release = threading.Event(), threading.Event()
    sv = Supervisor(name="impatient", grace=0.2)
    web = sv.add(WSGIService(make_app(release, entered), port=0, name="web", access_log=False))
    request = None
    try:
        with caplog.at_level(logging.WARNING, logger="offloop"):
            async with sv:
                request = offloop.to_thread(_fetch_ignoring_errors, web.url + "/stubborn")
                assert await offloop.to_thread(entered.wait, WAIT)
        abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
        assert any("offloop-wsgi-web-request-" in m and "stubborn" in m for m in abandoned), (
            abandoned
        )
        assert sv.status()["web"].state == "stopped"
    finally:
        release.set()  # let the abandoned thread end, so the test leaks nothing
        if request is not None:
            await asyncio.wait_for(request, WAIT)
    await await_until(lambda: wsgi_threads() == [], WAIT, "the abandoned threads to end")


def _fetch_ignoring_errors(url: str) -> str:
    try:
        return fetch(url)[1]
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
        return repr(exc)


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_a_streaming_response_sees_the_stop_token(server: WSGIServerName) -> None:
    app = flask.Flask("offloop_test")
    streaming = threading.Event()
    tokens: dict[str, offloop.StopToken] = {}

    @app.get("/stream")
    def stream() -> flask.Response:
        tokens["view"] = offloop.current_token()

        def body() -> Iterator[bytes]:
            # Runs while the server sends the body, after the view has returned.
            token = tokens["body"] = offloop.current_token()
            yield b"streaming\n"
            streaming.set()
            yield b"stopped\n" if token.wait(WAIT / 2) else b"never stopped\n"

        return flask.Response(body())

    svc = WSGIService(app, port=0, server=server, access_log=False)
    await svc.start()
    request = offloop.to_thread(fetch, svc.url + "/stream")
    assert await offloop.to_thread(streaming.wait, WAIT)
    await asyncio.wait_for(svc.stop(), WAIT)
    assert await asyncio.wait_for(request, WAIT) == (200, "streaming\nstopped\n")
    assert tokens["body"] is tokens["view"]


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_a_response_body_is_closed_with_the_service_token(server: WSGIServerName) -> None:
    tokens: dict[str, offloop.StopToken] = {}

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            tokens["iter"] = offloop.current_token()
            yield b"body"

        def close(self) -> None:
            tokens["close"] = offloop.current_token()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Body:
        tokens["app"] = offloop.current_token()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    svc = WSGIService(app, port=0, server=server, access_log=False)
    await svc.start()
    assert await offloop.to_thread(fetch, svc.url) == (200, "body")
    await svc.stop()
    assert tokens["iter"] is tokens["app"]
    assert tokens["close"] is tokens["app"]
    assert tokens["close"].is_set()  # the service's token: set by stop()


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_stop_waits_until_a_large_response_is_sent(server: WSGIServerName) -> None:
    size = 8 * 1024 * 1024  # far more than the sockets buffer: most is still in the server
    app = flask.Flask("offloop_test")
    app.get("/big")(lambda: b"x" * size)
    svc = WSGIService(app, port=0, server=server, access_log=False)
    await svc.start()
    reading, go = threading.Event(), threading.Event()

    def download() -> tuple[int, int]:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=WAIT)
        try:
            conn.request("GET", "/big")
            resp = conn.getresponse()
            received = len(resp.read(65536))
            reading.set()
            go.wait(WAIT)  # the rest is read only once stop() is under way
            try:
                received += len(resp.read())
            except http.client.IncompleteRead as exc:
                received += len(exc.partial)
            return resp.status, received
        finally:
            conn.close()

    downloading = offloop.to_thread(download)
    stopping = None
    try:
        assert await offloop.to_thread(reading.wait, WAIT)
        stopping = asyncio.ensure_future(svc.stop())
        done, _ = await asyncio.wait({stopping}, timeout=0.5)
        assert not done, "stop() returned while most of a response was still unsent"
    finally:
        go.set()
        assert await asyncio.wait_for(downloading, WAIT) == (200, size)
        if stopping is not None:
            await asyncio.wait_for(stopping, WAIT)
    assert wsgi_threads() == []


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("server", SERVERS)
@bounded(20)
async def test_stop_answers_a_request_whose_body_is_still_arriving(
    server: WSGIServerName,
) -> None:
    size = 1024 * 1024
    app = flask.Flask("offloop_test")
    app.post("/upload")(lambda: str(len(flask.request.get_data())))
    svc = WSGIService(app, port=0, server=server, access_log=False)
    await svc.start()
    half_sent, go = threading.Event(), threading.Event()

    def upload() -> bytes:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=WAIT) as sock:
            head = f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n"
            sock.sendall(f"{head}Expect: 100-continue\r\n\r\n".encode())
            # The interim answer proves that the server has read the headers.
            assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
            sock.sendall(b"a" * (size // 2))
            half_sent.set()
            go.wait(WAIT)  # the rest is sent only once stop() is under way
            try:
                sock.sendall(b"a" * (size // 2))
                return _read_until(sock, b"")
            except OSError as exc:
                return repr(exc).encode()

    uploading = offloop.to_thread(upload)
    stopping = None
    try:
        assert await offloop.to_thread(half_sent.wait, WAIT)
        stopping = asyncio.ensure_future(svc.stop())
        done, _ = await asyncio.wait({stopping}, timeout=0.5)
        assert not done, "stop() returned while a request's body was still arriving"
    finally:
        go.set()
        reply = await asyncio.wait_for(uploading, WAIT)
        if stopping is not None:
            await asyncio.wait_for(stopping, WAIT)
    while reply.startswith(b"HTTP/1.1 100 "):  # werkzeug sends two (http.server's and its own)
        reply = reply.split(b"\r\n\r\n", 1)[1]
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert reply.endswith(b"\r\n\r\n" + str(size).encode())
    assert wsgi_threads() == []


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    """Read up to and including ``end``, or until the server closes if ``end`` is empty."""
    data = b""
    while not end or end not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_waitress_stop_ends_for_a_client_that_never_reads() -> None:
    # waitress's own idle timeout stops with its listener: the drain applies it.
    size = 8 * 1024 * 1024
    app = flask.Flask("offloop_test")
    answered = threading.Event()

    @app.get("/big")
    def big() -> bytes:
        answered.set()
        return b"x" * size

    svc = WSGIService(app, port=0, server="waitress", access_log=False)
    await svc.start()
    svc._run.server.adj.channel_timeout = 0.5  # type: ignore[union-attr]  # 120 s by default
    with socket.create_connection(("127.0.0.1", svc.port), timeout=WAIT) as client:
        client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        assert await offloop.to_thread(answered.wait, WAIT)
        await asyncio.wait_for(svc.stop(), WAIT)  # it used to wait forever
    assert wsgi_threads() == []

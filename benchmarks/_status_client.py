"""The HTTP client of ``bench_status``: a process of its own, driven over a pipe.

A separate process (as a health checker is), so that its work does not
compete with the servers for the benchmark's GIL. ``Client`` starts it
(``python -m benchmarks._status_client``) and sends it one JSON command a
line; each answer is a JSON list of seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

CLIENT_TIMEOUT = 10.0
HAMMER_CLIENTS = 4
BLANK_CLIENTS = 8
BLANK_BYTES = 1 << 20
PROBE_EVERY = 0.01
PROBE_TIMEOUT = 1.0


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


REQUEST = _request("/status")
HEALTHZ = _request("/healthz")


# -- the client process ----------------------------------------------------------------------


def get(port: int, request: bytes = REQUEST, timeout: float = CLIENT_TIMEOUT) -> bytes:
    """Send ``request`` on a new connection to 127.0.0.1:``port``; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError as exc:
            # Say which connection and what the kernel holds for it: whether
            # the server never read the request or never accepted it.
            raise TimeoutError(
                f"no answer within {timeout:g} s on {sock.getsockname()} -> port {port} "
                f"(got {sum(map(len, chunks))} bytes){_sockets(port)}"
            ) from exc
    return b"".join(chunks)


def _sockets(port: int) -> str:
    """The kernel's view of the connections to ``port`` (``ss``, where there is one)."""
    if shutil.which("ss") is None:
        return ""
    ss = subprocess.run(
        ["ss", "-tan", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "\n" + ss.stdout


def _timed_gets(port: int, n: int, path: str = "/status") -> list[float]:
    """Seconds each of ``n`` GETs took, one at a time; ``inf`` for one never answered.

    A thread server can starve under a busy loop: a loop that gives the GIL
    up more often than the switch interval (an ``await asyncio.sleep(0)``
    between slices of computing) takes it back before a waiting thread wakes,
    and the thread's wait for it starts over. Such a request is recorded as
    never answered, and the rest of the series is not sent: each would wait
    as long.
    """
    latencies: list[float] = []
    request = _request(path)
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            answer = get(port, request)
        except TimeoutError as exc:
            first = (str(exc).splitlines() or [repr(exc)])[0]
            print(f"unanswered, counted as never answered: {first}", file=sys.stderr)
            # Those not sent count as unanswered too, so that the p99 shows it
            # however many were answered before.
            latencies += [math.inf] * (n - len(latencies))
            break
        latencies.append(time.perf_counter() - t0)
        if not answer.startswith(b"HTTP/1.") or b" 200 " not in answer[:16]:
            raise RuntimeError(f"bad answer: {answer[:80]!r}")
    return latencies


def _flood(port: int) -> socket.socket:
    """Connect and send ``BLANK_BYTES`` of empty lines; return the socket, still open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    with contextlib.suppress(OSError):  # a server may close it early, after a line or two
        sock.sendall(b"\r\n" * (BLANK_BYTES // 2))
    return sock


def _gets_after_floods(port: int, n: int) -> list[float]:
    """Time ``n`` GETs, each sent once ``BLANK_CLIENTS`` clients have sent their empty lines."""
    latencies: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(BLANK_CLIENTS) as pool:
        for _ in range(n):
            socks = list(pool.map(_flood, [port] * BLANK_CLIENTS))
            latencies += _timed_gets(port, 1)
            for sock in socks:
                sock.close()
    return latencies


def _failures(port: int, seconds: float) -> list[float]:
    """Probe ``/healthz`` every ``PROBE_EVERY`` s for ``seconds``; when each probe failed."""
    failed = []
    end = time.time() + seconds
    while time.time() < end:
        try:
            answer = get(port, HEALTHZ, timeout=PROBE_TIMEOUT)
            ok = b" 200 " in answer[:16]
        except OSError:  # the probe's timeout, as a prober counts it
            ok = False
        if not ok:
            failed.append(time.time())
        time.sleep(PROBE_EVERY)
    return failed


def _client_command(cmd: dict[str, Any]) -> list[float]:
    port, n = cmd["port"], cmd["n"]
    if cmd["kind"] == "sequential":
        return _timed_gets(port, n, cmd.get("path", "/status"))
    if cmd["kind"] == "failures":
        return _failures(port, cmd["seconds"])
    if cmd["kind"] == "hammer":
        with concurrent.futures.ThreadPoolExecutor(HAMMER_CLIENTS) as pool:
            each = [n // HAMMER_CLIENTS] * HAMMER_CLIENTS
            parts = pool.map(_timed_gets, [port] * HAMMER_CLIENTS, each)
            return [x for part in parts for x in part]
    if cmd["kind"] == "blank":
        return _gets_after_floods(port, n)
    raise ValueError(f"unknown command {cmd!r}")


def client_main() -> None:
    """The client process: one JSON command a line in, one JSON list of seconds a line out.

    A request that fails is sent back as ``{"error": ...}`` rather than ending
    the process, so the bench reports it where it happened.
    """
    for line in sys.stdin:
        try:
            answer: Any = _client_command(json.loads(line))
        except (OSError, RuntimeError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


class Client:
    """The client process: its commands go out and its replies come back through the loop."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._status_client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self._asking = False

    async def ask_on_loop(self, **cmd: Any) -> list[float]:
        """Send one command to the client process; its reply is read by the running loop itself.

        A thread waiting for the reply would need the GIL to take it, and
        the busy scenario's loop, which drops the GIL for a moment in every
        ``select(0)`` between its slices, can keep a waiting thread from
        ever getting it (CPython hands the GIL over only after a switch
        interval with no switch at all). The loop reads the pipe between
        two slices instead.
        """
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        if self._asking:
            raise RuntimeError("the status client serves one request at a time")
        self._asking = True
        loop = asyncio.get_running_loop()
        fd = self._proc.stdout.fileno()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        try:
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            loop.add_reader(fd, ready)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            # The client writes each answer in one flushed line.
            line = self._proc.stdout.readline()
        finally:
            self._asking = False
        return self._answer(cmd, line)

    def _answer(self, cmd: dict[str, Any], line: str) -> list[float]:
        if not line:
            raise RuntimeError("the client process died; see its traceback above")
        answer = json.loads(line)
        if isinstance(answer, dict):
            raise RuntimeError(f"the client's request {cmd!r} failed: {answer['error']}")
        return [float(x) for x in answer]

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(10)


CLIENT: Client | None = None


async def ask(**cmd: Any) -> list[float]:
    assert CLIENT is not None
    return await CLIENT.ask_on_loop(**cmd)


if __name__ == "__main__":
    client_main()

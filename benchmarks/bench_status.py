"""Which status server suits a supervisor: its own asyncio protocol, streams, a thread, aiohttp.

The candidates, each serving ``GET /status`` of a running Supervisor (three
async services), all in this process, interleaved round after round:

- offloop: ``offloop._supervisor.statusserver``, an ``asyncio.Protocol`` on
  the supervisor's loop;
- streams: a minimal ``asyncio.start_server`` server on the same loop (a task
  and a stream reader per connection, as the status server used to be);
- thread+loop: ``http.server.ThreadingHTTPServer`` in a thread that asks the
  loop for each answer (``call_soon_threadsafe``): the only way a thread can
  tell that the loop still responds, which ``/healthz`` must;
- thread (no liveness): the same server reading the status from its own
  thread; it cannot see a blocked loop, so it is shown as a reference only;
- aiohttp: ``aiohttp.web`` on the supervisor's loop (only with the extra).

The HTTP client is a separate process (as a health checker is), so its work
does not compete with the servers for this process's GIL. Figures:

- GET /status latency p50/p99 (one request at a time, a new connection each),
  with an idle supervisor loop and with a busy one (a service that computes in
  slices of ``SLICE`` seconds between awaits);
- the loop's lag p50/p99 (how late a 1 ms ``asyncio.sleep`` wakes up) while
  ``HAMMER_CLIENTS`` connections send ``HAMMER`` requests, against the ticker
  alone (floor);
- GET /status latency right after ``BLANK_CLIENTS`` clients have each sent 1
  MiB of empty lines (a misbehaving client must not stall the loop; the
  minimal streams server takes their first empty lines for a request);
- liveness: is ``GET /healthz`` answered while the loop is blocked?
- with ``PROBE_SERVICES`` services: ``GET /healthz`` and ``GET /metrics``
  latency p50/p99 (offloop, the thread that asks the loop, and a thread that
  answers by itself, as a probe served from a worker thread is);
- the time from a loop block starting to ``/healthz`` failing, for a prober
  polling every ``PROBE_EVERY`` s with a ``PROBE_TIMEOUT`` s timeout (the
  Kubernetes default), the liveness threshold being the same ``PROBE_TIMEOUT``.

Everything is on 127.0.0.1 and every request count is bounded.

Run: ``.venv/bin/python -m benchmarks.bench_status``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.server
import json
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import offloop
from offloop._supervisor.metrics import metrics_text
from offloop._supervisor.statusserver import start_status_server, status_json

from . import _status_client
from ._common import Result, check, interleaved, percentiles, table
from ._status_client import (
    BLANK_CLIENTS,
    HAMMER_CLIENTS,
    HEALTHZ,
    PROBE_EVERY,
    PROBE_TIMEOUT,
    Client,
    ask,
    get,
)

REQUESTS = int(os.environ.get("OFFLOOP_BENCH_STATUS_REQUESTS", "200"))
HAMMER = int(os.environ.get("OFFLOOP_BENCH_STATUS_HAMMER", "400"))
BLANK_REQUESTS = max(1, REQUESTS // 10)
SLICE = 0.002
TICK = 0.001
PROBE_SERVICES = 50
PROBE_BLOCK = 2.0
PROBE_ROUNDS = 3

OFFLOOP = "offloop StatusServer (protocol)"
STREAMS = "asyncio streams, task per connection"
THREAD_LOOP = "http.server thread, asks the loop"
THREAD = "http.server thread (no liveness)"
AIOHTTP = "aiohttp.web on the loop"
FLOOR = "floor: ticker alone, no requests"


# -- the servers ------------------------------------------------------------------------------


class _QuietServer(http.server.ThreadingHTTPServer):
    """Threads that die with the process, and no traceback for a client that hung up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ThreadServer:
    """``http.server`` in a thread; with ``ask_loop`` each answer is computed on the loop."""

    def __init__(self, sv: offloop.Supervisor, *, ask_loop: bool) -> None:
        loop = asyncio.get_running_loop()

        def answer(path: str) -> bytes:
            if path == "/metrics":
                return metrics_text(sv).encode()
            if path == "/healthz":
                return b'{"live": true}\n'
            return json.dumps(status_json(sv), indent=2).encode() + b"\n"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if ask_loop:
                    done: concurrent.futures.Future[bytes] = concurrent.futures.Future()
                    loop.call_soon_threadsafe(lambda: done.set_result(answer(self.path)))
                    try:
                        # The same threshold as offloop's liveness.
                        body = done.result(timeout=PROBE_TIMEOUT)
                    except concurrent.futures.TimeoutError:
                        self.send_error(503, "the supervisor's loop does not respond")
                        return
                else:
                    body = answer(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.start()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join()


class StreamsServer:
    """A minimal ``asyncio.start_server`` status server: a task and a reader per connection."""

    async def start(self, sv: offloop.Supervisor) -> StreamsServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                body = json.dumps(status_json(sv), indent=2).encode() + b"\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )
                await writer.drain()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass
            except ConnectionError:
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        self._server.close()
        await self._server.wait_closed()


class AiohttpServer:
    """``aiohttp.web`` on the supervisor's loop."""

    async def start(self, sv: offloop.Supervisor) -> AiohttpServer:
        from aiohttp import web

        async def status(request: web.Request) -> web.Response:
            return web.json_response(status_json(sv), dumps=lambda o: json.dumps(o, indent=2))

        app = web.Application()
        app.router.add_get("/status", status)
        app.router.add_get("/healthz", status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def aclose(self) -> None:
        await self._runner.cleanup()


async def start(variant: str, sv: offloop.Supervisor) -> Any:
    if variant == OFFLOOP:
        return await start_status_server(sv, 0, liveness_threshold=PROBE_TIMEOUT)
    if variant == STREAMS:
        return await StreamsServer().start(sv)
    if variant == THREAD_LOOP:
        return ThreadServer(sv, ask_loop=True)
    if variant == THREAD:
        return ThreadServer(sv, ask_loop=False)
    if variant == AIOHTTP:
        return await AiohttpServer().start(sv)
    raise ValueError(variant)


# -- the supervisor and the scenarios ---------------------------------------------------------


def make_supervisor(*, busy: bool, services: int = 3) -> offloop.Supervisor:
    sv = offloop.Supervisor(name="bench", grace=5.0)
    for i in range(services):

        async def idle() -> None:
            await asyncio.sleep(3600)

        sv.service(name=f"idle{i}")(idle)
    if busy:

        @sv.service
        async def compute() -> None:
            while True:
                deadline = time.perf_counter() + SLICE
                while time.perf_counter() < deadline:
                    pass
                await asyncio.sleep(0)

    return sv


p50s: dict[str, dict[str, list[float]]] = {}


def case(
    scenario: str,
    variant: str,
    body: Callable[[Any], Awaitable[list[float]]],
    *,
    busy: bool,
    services: int = 3,
) -> Callable[[], float]:
    """One round: a fresh supervisor and server; ``body`` returns the samples; the p99 counts."""

    def run() -> float:
        async def main() -> list[float]:
            sv = make_supervisor(busy=busy, services=services)
            async with sv:
                server = None if variant == FLOOR else await start(variant, sv)
                try:
                    return await body(server)
                except RuntimeError as exc:
                    raise RuntimeError(f"{scenario}, {variant}: {exc}") from exc
                finally:
                    # The services first: a busy loop could starve a thread
                    # server's shutdown as it starved its requests.
                    sv.stop()
                    if server is not None:
                        await server.aclose()

        samples = asyncio.run(main())
        p50, p99 = percentiles(samples)
        p50s.setdefault(scenario, {}).setdefault(variant, []).append(p50)
        return p99

    return run


async def sequential(server: Any) -> list[float]:
    return await ask(kind="sequential", port=server.port, n=REQUESTS)


async def healthz(server: Any) -> list[float]:
    return await ask(kind="sequential", port=server.port, n=REQUESTS, path="/healthz")


async def metrics(server: Any) -> list[float]:
    return await ask(kind="sequential", port=server.port, n=REQUESTS, path="/metrics")


def time_to_fail(variant: str) -> Callable[[], float]:
    """One round: seconds from a ``PROBE_BLOCK`` s block of the loop to the prober's first
    failure (``inf``: it never failed)."""

    def run() -> float:
        async def main() -> float:
            sv = make_supervisor(busy=False)
            async with sv:
                server = await start(variant, sv)
                try:
                    before = 0.3  # the prober's first probes pass
                    seconds = before + PROBE_BLOCK + PROBE_TIMEOUT + 0.5
                    prober = asyncio.ensure_future(
                        ask(kind="failures", port=server.port, n=0, seconds=seconds)
                    )
                    await asyncio.sleep(before)
                    blocked_at = time.time()
                    time.sleep(PROBE_BLOCK)  # noqa: ASYNC251 (the point: block the loop)
                    failed = await prober
                finally:
                    await server.aclose()
                    sv.stop()
            after = [t - blocked_at for t in failed if t >= blocked_at]
            return min(after) if after else math.inf

        return asyncio.run(main())

    return run


async def blank(server: Any) -> list[float]:
    return await ask(kind="blank", port=server.port, n=BLANK_REQUESTS)


async def loop_lag(server: Any) -> list[float]:
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t0 = loop.time()
            await asyncio.sleep(TICK)
            lateness.append(loop.time() - t0 - TICK)

    task = asyncio.create_task(ticker())
    if server is None:
        await asyncio.sleep(0.5)  # about as long as a hammer takes
    else:
        await ask(kind="hammer", port=server.port, n=HAMMER)
    stop.set()
    await task
    return lateness


def answers_while_blocked(variant: str) -> bool:
    """Whether ``GET /healthz`` is answered while the supervisor's loop is blocked."""

    async def main() -> bool:
        sv = make_supervisor(busy=False)
        async with sv:
            server = await start(variant, sv)
            blocked = threading.Event()
            answered: list[bytes] = []

            def probe() -> None:
                blocked.wait()
                with contextlib.suppress(OSError):
                    answered.append(get(server.port, HEALTHZ, timeout=0.25))

            prober = threading.Thread(target=probe)
            prober.start()
            blocked.set()
            time.sleep(0.5)  # noqa: ASYNC251 (the point: block the loop; the probe gives up first)
            prober.join()
            await server.aclose()
            sv.stop()
        return bool(answered and b" 200 " in answered[0][:16])

    return asyncio.run(main())


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def _versus(ours: float, theirs: float) -> str:
    """How offloop's figure compares with a peer's, one that never answered included."""
    if not math.isfinite(theirs):
        return f"{_ms(ours).strip()}; the peer left requests unanswered"
    return f"{ours / theirs:.2f}x ({_ms(ours).strip()} vs {_ms(theirs).strip()})"


def report(title: str, scenario: str, p99: dict[str, Result], reference: str) -> None:
    table(f"{title}: p99", p99, reference=reference, unit=_ms)
    # [1:]: the warm-up round of interleaved() is not a sample.
    p50 = {name: Result(name, samples[1:]) for name, samples in p50s[scenario].items()}
    table(f"{title}: p50", p50, reference=reference, unit=_ms)


def main() -> None:
    import logging

    logging.getLogger("offloop").setLevel(logging.WARNING)
    variants = [OFFLOOP, STREAMS, THREAD_LOOP, THREAD]
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("aiohttp is not installed: its case is skipped")
    else:
        variants.append(AIOHTTP)
    client = _status_client.CLIENT = Client()
    try:
        results: dict[str, dict[str, Result]] = {}
        for scenario, body, busy in [
            ("idle", sequential, False),
            ("busy", sequential, True),
            ("lag", loop_lag, False),
            ("blank", blank, False),
        ]:
            names = [*variants, FLOOR] if scenario == "lag" else variants
            results[scenario] = interleaved({v: case(scenario, v, body, busy=busy) for v in names})
        live = {v: not answers_while_blocked(v) for v in variants}
        probe_variants = [OFFLOOP, THREAD_LOOP, THREAD]
        for scenario, body in [("healthz50", healthz), ("metrics50", metrics)]:
            results[scenario] = interleaved(
                {
                    v: case(scenario, v, body, busy=False, services=PROBE_SERVICES)
                    for v in probe_variants
                }
            )
        fail_after = interleaved(
            {v: time_to_fail(v) for v in probe_variants}, PROBE_ROUNDS, warmup=False
        )
    finally:
        client.close()
        _status_client.CLIENT = None

    report(f"GET /status, idle loop, {REQUESTS} requests", "idle", results["idle"], THREAD_LOOP)
    report(
        f"GET /status, busy loop ({SLICE * 1e3:.0f} ms slices), {REQUESTS} requests",
        "busy",
        results["busy"],
        THREAD_LOOP,
    )
    report(
        f"loop lag while {HAMMER_CLIENTS} clients send {HAMMER} GET /status",
        "lag",
        results["lag"],
        FLOOR,
    )
    report(
        f"GET /status after {BLANK_CLIENTS} clients sent 1 MiB of blank lines, "
        f"{BLANK_REQUESTS} requests",
        "blank",
        results["blank"],
        THREAD_LOOP,
    )
    for scenario, path in [("healthz50", "/healthz"), ("metrics50", "/metrics")]:
        report(
            f"GET {path}, {PROBE_SERVICES} services, {REQUESTS} requests",
            scenario,
            results[scenario],
            THREAD,
        )
    print(
        f"\n## /healthz: seconds from a {PROBE_BLOCK:g} s loop block to the first failed probe "
        f"(probe every {PROBE_EVERY * 1e3:.0f} ms, timeout {PROBE_TIMEOUT:g} s; "
        f"median of {PROBE_ROUNDS} rounds; inf: never failed)"
    )
    for v, res in fail_after.items():
        print(f"{v:<44} {res.median:8.3f} s")
    print()
    for v in variants:
        print(f"liveness: {v}: {'reflects' if live[v] else 'answers 200 despite'} a blocked loop")

    def p99(scenario: str, v: str) -> float:
        return results[scenario][v].median

    print()
    check("offloop reflects a blocked loop", live[OFFLOOP], f"liveness {live[OFFLOOP]}")
    for scenario, other, bound in [
        ("idle", THREAD_LOOP, 1.5),
        ("busy", THREAD_LOOP, 1.0),
        ("busy", STREAMS, 1.0),
        ("lag", THREAD_LOOP, 1.5),
    ]:
        ours, theirs = p99(scenario, OFFLOOP), p99(scenario, other)
        check(
            f"offloop p99 ({scenario}) within {bound}x of {other!r}",
            math.isfinite(ours) and ours <= bound * theirs,
            _versus(ours, theirs),
        )
    for scenario in ("healthz50", "metrics50"):
        ours, theirs = p99(scenario, OFFLOOP), p99(scenario, THREAD)
        check(
            f"offloop p99 ({scenario}) within 1.5x of {THREAD!r}",
            math.isfinite(ours) and ours <= 1.5 * theirs,
            _versus(ours, theirs),
        )
    ours_fail = fail_after[OFFLOOP].median
    check(
        "offloop /healthz fails within the probe timeout + 0.25 s of a loop block",
        ours_fail <= PROBE_TIMEOUT + 0.25,
        f"{ours_fail:.3f} s (a thread that answers by itself: {fail_after[THREAD].median:.3f} s)",
    )
    # Eight such clients used to delay a GET by over a second.
    blank_p99 = p99("blank", OFFLOOP)
    check(
        f"offloop p99 after {BLANK_CLIENTS} blank-line clients under 100 ms",
        blank_p99 < 0.1,
        _ms(blank_p99).strip(),
    )


if __name__ == "__main__":
    main()

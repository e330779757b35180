"""The bot's tick lateness while Flask serves a burst of requests, and what stopping costs.

A chat-bot program: a bot coroutine ticks every millisecond on the event loop
while 8 client threads send ``REQUESTS`` real HTTP requests to a Flask app in
the same process. Cases, interleaved round after round in one process:

- Flask through ``offloop.WSGIService`` (werkzeug, then waitress) under an
  ``offloop.Supervisor``;
- the naive recipe, ``threading.Thread(target=app.run, daemon=True)``
  (it cannot be stopped: every round leaves its server thread behind, which
  is the point);
- the bot alone, without any load (the floor).

Figures: the p99 of the bot's tick lateness (how much later than asked each
``asyncio.sleep`` woke up) during the burst, the time per request, and how
long ``stop()`` takes. Everything shares one GIL, so lateness is mostly the
cost of Python threads competing with the loop; the question is whether
offloop's adapter adds to it.

Run: ``.venv/bin/python -m benchmarks.bench_services``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable

import flask

import offloop
from offloop._services.wsgi import WSGIServer

from ._common import Result, check, interleaved, percentiles, table

REQUESTS = int(os.environ.get("OFFLOOP_BENCH_REQUESTS", "1000"))
CLIENTS = 8
TICK = 0.001

FLOOR = "bot alone, no load (floor)"
WERKZEUG = "Flask via WSGIService (werkzeug)"
WAITRESS = "Flask via WSGIService (waitress)"
NAIVE = "naive Thread(target=app.run)"

per_request: dict[str, list[float]] = {}
stop_times: dict[str, list[float]] = {}
naive_threads: list[threading.Thread] = []


def make_app() -> flask.Flask:
    app = flask.Flask("bench_services")

    @app.get("/")
    def index() -> str:
        return "ok"

    return app


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
        return int(resp.status)


async def measure(url: str | None, case: str) -> float:
    """Tick the bot during a burst of requests to ``url``; return the p99 lateness."""
    lateness: list[float] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def bot() -> None:
        while not stop.is_set():
            t0 = loop.time()
            await asyncio.sleep(TICK)
            lateness.append(loop.time() - t0 - TICK)

    ticker = asyncio.create_task(bot())
    t0 = time.perf_counter()
    if url is None:
        await asyncio.sleep(0.5)  # as long as a burst takes, roughly
    else:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as clients:
            codes = await asyncio.gather(
                *(loop.run_in_executor(clients, fetch, url) for _ in range(REQUESTS))
            )
        assert codes == [200] * REQUESTS
        per_request.setdefault(case, []).append((time.perf_counter() - t0) / REQUESTS)
    stop.set()
    await ticker
    return percentiles(lateness, (99,))[0]


def with_service(server: WSGIServer, case: str) -> Callable[[], float]:
    def run() -> float:
        async def main() -> float:
            sv = offloop.Supervisor(name="bench", grace=5.0)
            web = sv.add(
                offloop.WSGIService(
                    make_app(),
                    port=0,
                    server=server,
                    threads=CLIENTS if server == "waitress" else None,  # werkzeug: a thread each
                    access_log=False,
                )
            )
            async with sv:
                p99 = await measure(web.url + "/", case)
                t0 = time.perf_counter()
            stop_times.setdefault(case, []).append(time.perf_counter() - t0)
            return p99

        return asyncio.run(main())

    return run


def naive() -> float:
    with socket.socket() as probe:  # app.run cannot report the port it bound: pick one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app()
    thread = threading.Thread(
        target=app.run,
        kwargs={"host": "127.0.0.1", "port": port, "threaded": True},
        daemon=True,
    )
    thread.start()
    naive_threads.append(thread)
    _wait_listening(port)
    return asyncio.run(measure(f"http://127.0.0.1:{port}/", NAIVE))


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def floor() -> float:
    return asyncio.run(measure(None, FLOOR))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def main() -> None:
    # Same logging cost for every case: none (werkzeug's request log, flask's banner).
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("waitress").setLevel(logging.ERROR)
    import flask.cli

    flask.cli.show_server_banner = lambda *args, **kwargs: None
    cases: dict[str, Callable[[], float]] = {
        WERKZEUG: with_service("werkzeug", WERKZEUG),
        WAITRESS: with_service("waitress", WAITRESS),
        NAIVE: naive,
        FLOOR: floor,
    }
    lateness = interleaved(cases)
    table(
        f"bot tick lateness p99 during {REQUESTS} requests from {CLIENTS} threads",
        lateness,
        reference=NAIVE,
        unit=_ms,
    )
    # [1:]: the warm-up round of interleaved() is not a sample.
    cost = {name: Result(name, samples[1:]) for name, samples in per_request.items()}
    table("time per request (same bursts)", cost, reference=NAIVE)
    stop = Result("WSGIService stop", [t for ts in stop_times.values() for t in ts[1:]])
    print(f"\nWSGIService: supervisor exit (stop + join) median {_ms(stop.median)}")
    alive = sum(t.is_alive() for t in naive_threads)
    print(
        f"naive recipe: {alive} of {len(naive_threads)} app.run threads still alive (unstoppable)"
    )
    worst = max(lateness[WERKZEUG].median, lateness[WAITRESS].median)
    ratio_ = worst / lateness[NAIVE].median
    check(
        "WSGIService adds no tick lateness over the naive thread (within 1.5x)",
        ratio_ <= 1.5,
        f"{ratio_:.2f}x the naive recipe's p99",
    )
    check("WSGIService stops in under 0.5 s", stop.median < 0.5, _ms(stop.median).strip())


if __name__ == "__main__":
    main()

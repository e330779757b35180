"""A chat-bot program, done right: a bot, Flask, aiohttp, a file watcher and a ``while True`` loop.

One process runs, side by side and under one :class:`offloop.Supervisor`:

- ``bot``: a chat-bot coroutine on the event loop; every tick it also calls
  both web apps, to show they answer while everything else runs;
- ``flask``: a Flask app served from threads by :class:`offloop.WSGIService`;
- ``aiohttp``: an aiohttp app on the same event loop (:class:`offloop.AiohttpService`);
- ``watcher``: a watchdog observer on a folder (:class:`offloop.WatchService`),
  its events handled by an ``async def`` on the loop;
- ``loop``: what was a ``while True`` + ``time.sleep`` loop, now a periodic
  service (``@sv.every``): every tick a run in its own thread writes a file
  into the watched folder, on a schedule that does not drift.

The supervisor also serves its probes (``status_port=0``: any free port):
``/healthz`` (answered by the event loop itself, so a blocked loop fails it),
``/readyz`` (every service ready) and ``/metrics`` (Prometheus); the bot asks
``/readyz`` once.

Ctrl-C stops everything within a second (``grace=1``). Run it with
``python -m offloop demo`` or ``python examples/chatbot.py [--seconds N]``,
or under the CLI with ``python -m offloop run examples.chatbot:build``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import flask
from aiohttp import web

import offloop


def say(who: str, message: str) -> None:
    """One line of the demo's story, flushed at once (the output may be a pipe).

    One write per line: print() writes the text and the newline separately, so
    lines from the loop thread and the event loop could interleave.
    """
    sys.stdout.write(f"{who:<8}| {message}\n")
    sys.stdout.flush()


def build(
    folder: Path | None = None, *, interval: float = 0.5, seconds: float | None = None
) -> offloop.Supervisor:
    """The supervisor with every part of the program.

    Args:
        folder: the folder the loop writes to and the watcher watches (a new
            temporary folder by default).
        interval: seconds between ticks of the bot and the loop.
        seconds: stop by itself after this long (``None``: until Ctrl-C).
    """
    folder = folder if folder is not None else Path(tempfile.mkdtemp(prefix="offloop-demo-"))
    return build_with_stats(folder, interval=interval, seconds=seconds)[0]


def build_with_stats(
    folder: Path, *, interval: float, seconds: float | None
) -> tuple[offloop.Supervisor, dict[str, int]]:
    """:func:`build`, plus the counters the parts update (for the final summary)."""
    # status_port=0: the probes on any free port of 127.0.0.1, read from sv.status_url.
    sv = offloop.Supervisor(grace=1.0, name="chatbot", status_port=0)
    stats = {"bot_ticks": 0, "files_written": 0, "files_seen": 0, "requests_ok": 0}

    # -- Flask: blocking WSGI code, served from threads --------------------------------
    flask_app = flask.Flask("chatbot")

    @flask_app.get("/")
    def hello() -> dict[str, Any]:
        return {
            "from": "flask",
            "thread": threading.current_thread().name,
            "bot_ticks": stats["bot_ticks"],
        }

    web_flask = sv.add(offloop.WSGIService(flask_app, port=0, name="flask", access_log=False))

    # -- aiohttp: async code, on the supervisor's own loop -----------------------------
    aio_app = web.Application()

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"from": "aiohttp", **stats, "services": _states(sv)})

    aio_app.router.add_get("/", status)
    web_aio = sv.add(offloop.AiohttpService(aio_app, port=0, name="aiohttp", access_log=False))

    # -- the file watcher: events from watchdog's thread, handled on the loop ----------
    async def on_file(event: Any) -> None:
        if event.event_type == "created":
            stats["files_seen"] += 1
            say("watcher", f"saw {Path(event.src_path).name} created")

    sv.add(offloop.WatchService(folder, on_file, patterns=["*.txt"], name="watcher"))

    # -- the `while True` loop, as a periodic service ----------------------------------
    # `while True: write(); time.sleep(interval)` ignored Ctrl-C and drifted by the
    # time each turn took. Each run is now one turn, in a thread of its own, due on
    # a fixed grid; a run that raised would be restarted like any service.
    @sv.every(interval, first=interval, name="loop")
    def write_note() -> None:
        n = stats["files_written"] = stats["files_written"] + 1
        (folder / f"note-{n}.txt").write_text(f"note {n}\n")
        say("loop", f"wrote note-{n}.txt (thread {threading.current_thread().name})")

    # -- the bot: a coroutine that must keep ticking -----------------------------------
    @sv.service(name="bot")
    async def bot() -> None:
        await sv.wait_ready()  # the services after this one have started too
        say("demo", f"ready: every service is running (watching {folder})")
        say("demo", f"open {web_flask.url}/  (Flask through offloop.WSGIService)")
        say("demo", f"open {web_aio.url}/  (aiohttp through offloop.AiohttpService)")
        say(
            "demo", f"the loop writes a note every {interval:g}s (@sv.every: a drift-free schedule)"
        )
        say("probes", f"{sv.status_url}/healthz  (live: the event loop itself answers)")
        say("probes", f"{sv.status_url}/readyz  (ready: every service is running)")
        say("probes", f"{sv.status_url}/metrics  (Prometheus text format)")
        say("demo", "press Ctrl-C to stop")
        async with aiohttp.ClientSession() as session:
            await _probe(session, f"{sv.status_url}/readyz")
            while True:
                await asyncio.sleep(interval)
                stats["bot_ticks"] += 1
                say("bot", f"tick {stats['bot_ticks']} (event loop)")
                await _ask(session, "flask", web_flask.url, "thread", stats)
                await _ask(session, "aiohttp", web_aio.url, "files_seen", stats)

    if seconds is not None:

        @sv.service(name="timer", restart="no")
        async def timer() -> None:
            await asyncio.sleep(seconds)
            say("demo", f"{seconds:g} seconds are up: stopping")
            sv.stop()

    return sv, stats


async def _ask(
    session: aiohttp.ClientSession, who: str, url: str, key: str, stats: dict[str, int]
) -> None:
    try:
        async with session.get(url + "/") as resp:
            body = await resp.json()
    except aiohttp.ClientError as exc:  # e.g. the server is restarting
        say(who, f"GET {url}/ failed: {exc!r}")
        return
    stats["requests_ok"] += resp.status == 200
    say(who, f"GET {url}/ -> {resp.status}, {key}={body[key]!r}")


async def _probe(session: aiohttp.ClientSession, url: str) -> None:
    try:
        async with session.get(url) as resp:
            body = await resp.json()
    except aiohttp.ClientError as exc:
        say("probes", f"GET {url} failed: {exc!r}")
        return
    say("probes", f"GET {url} -> {resp.status}, ready={body['ready']!r}")


def _states(sv: offloop.Supervisor) -> dict[str, str]:
    return {name: str(status.state) for name, status in sv.status().items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until Ctrl-C (or ``--seconds``); return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--interval", type=float, default=0.5, help="tick interval (0.5)")
    args = parser.parse_args(argv)
    return run(seconds=args.seconds, interval=args.interval)


def run(*, seconds: float | None, interval: float) -> int:
    """Build the supervisor on a temporary folder and run it; return the exit code."""
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("offloop").setLevel(logging.INFO)  # the supervisor's own story
    with tempfile.TemporaryDirectory(prefix="offloop-demo-") as tmp:
        sv, stats = build_with_stats(Path(tmp), interval=interval, seconds=seconds)
        try:
            code = sv.run()  # owns the loop; Ctrl-C / SIGTERM stop it gracefully
        except offloop.ServiceFailed as exc:
            say("demo", f"failed: {exc}")
            return 1
    say(
        "demo",
        f"stopped cleanly: bot ticked {stats['bot_ticks']} times, {stats['requests_ok']} HTTP "
        f"requests answered, {stats['files_written']} files written, "
        f"{stats['files_seen']} seen by the watcher",
    )
    say("demo", "final states: " + ", ".join(f"{n}={s}" for n, s in _states(sv).items()))
    return code


if __name__ == "__main__":
    sys.exit(main())

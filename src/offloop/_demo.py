"""``offloop demo``: the seed's program, done right.

A bot coroutine ticks on the event loop while a blocking "http service" (a
``while True`` loop with ``time.sleep``) runs in a worker thread through
``offloop.to_thread``. Both print ticks side by side; after a few seconds the
service is asked to stop through its token and everything ends cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import offloop


def http_service(interval: float) -> int:
    """A blocking service loop, as in the seed: ``while True`` + ``time.sleep``."""
    token = offloop.current_token()
    ticks = 0
    while not token:
        time.sleep(interval)  # blocking on purpose: this is what the thread absorbs
        ticks += 1
        print(f"  http service tick {ticks} (worker thread)", flush=True)
    print("  http service: stop requested, leaving the loop", flush=True)
    return ticks


async def bot_start(interval: float, stop: asyncio.Event) -> int:
    """The chat bot: a coroutine that must keep ticking."""
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(interval)
        ticks += 1
        print(f"bot tick {ticks} (event loop)", flush=True)
    return ticks


async def main(seconds: float, interval: float) -> int:
    """Run the bot and the blocking service side by side for ``seconds``."""
    stop = asyncio.Event()
    async with offloop.ThreadPool(1, name="http", on_cancel="wait") as pool:
        service = pool.run(http_service, interval)
        bot = asyncio.create_task(bot_start(interval, stop))
        await asyncio.sleep(seconds)
        stop.set()
        service.cancel()  # sets the service's token; "wait" lets it finish its tick
        bot_ticks = await bot
        with contextlib.suppress(asyncio.CancelledError):  # cancelled while still queued
            await service
    print(f"done: bot ticked {bot_ticks} times while the blocking service ran beside it")
    return 0


def _handle(args: argparse.Namespace) -> int:
    return asyncio.run(main(args.seconds, args.interval))


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo", help="run the seed's bot + blocking service program, done right"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run (3)")
    parser.add_argument("--interval", type=float, default=0.5, help="tick interval (0.5)")
    parser.set_defaults(handler=_handle)

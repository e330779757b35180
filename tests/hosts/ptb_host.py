"""The python-telegram-bot recipe, polling the fake Telegram API.

Run as ``python -m tests.hosts.ptb_host URL TOKEN [stall] [noshutdown] [early] [slowstop]``;
with ``stall``, a last service never finishes starting; with ``noshutdown``, the
program forgets ``post_shutdown``, and a thread service says when it is told
to stop; with ``early``, a service crashes as soon as it has started (while
``run_polling`` still sets up its polling), and the supervisor's stop ends only
once the bot has answered an ``/ask`` (``run_polling`` is in ``run_forever``);
with ``slowstop``, a last service takes its whole grace to stop.

``/ask`` replies with every service's answer; ``/crash KIND`` crashes one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from telegram import Update
from telegram.ext import Application, CommandHandler, ContextTypes

import offloop
from tests.helpers import WAIT
from tests.hosts.side import Side, Stalled

sv = offloop.Supervisor(name="side", grace=2)
side = Side(sv)
answered = threading.Event()


async def start_services(application: Application) -> None:  # type: ignore[type-arg]
    await sv.start()


async def stop_services(application: Application) -> None:  # type: ignore[type-arg]
    await sv.aclose()


async def ask(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    assert update.message is not None
    await update.message.reply_text(await side.ask_all("hi"))
    answered.set()


async def crash(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    side.crash(" ".join(context.args or []))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url, token, *options = sys.argv[1:]
    if "stall" in options:
        sv.add(Stalled())
    if "slowstop" in options:

        @sv.service(restart="no", name="slow")
        async def slow() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                print("SLOW SERVICE STOPPING", file=sys.stderr, flush=True)
                await asyncio.Event().wait()  # until the stop's grace is over

    if "early" in options:

        @sv.service(restart="no", name="lingering")
        def lingering(token: offloop.StopToken) -> None:
            token.wait()
            answered.wait(WAIT)

        @sv.service(restart="no", name="early")  # ready at once, so start() returns
        async def early() -> None:
            raise ConnectionResetError("the early service broke")

    builder = Application.builder().token(token).base_url(f"{url}/bot").post_init(start_services)
    if "noshutdown" in options:

        @sv.service(restart="no", name="told")
        def told(token: offloop.StopToken) -> None:
            token.wait()
            print(f"THREAD SERVICE TOLD TO STOP: {token.reason}", file=sys.stderr, flush=True)

    else:
        builder = builder.post_shutdown(stop_services)
    application = builder.build()
    application.add_handler(CommandHandler("ask", ask))
    application.add_handler(CommandHandler("crash", crash))
    application.run_polling()

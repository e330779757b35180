"""The python-telegram-bot recipe, polling the fake Telegram API.

Run as ``python -m tests.hosts.ptb_host URL TOKEN [stall]``; with ``stall``,
a last service never finishes starting.

``/ask`` replies with every service's answer; ``/crash KIND`` crashes one.
"""

from __future__ import annotations

import logging
import sys

from telegram import Update
from telegram.ext import Application, CommandHandler, ContextTypes

import offloop
from tests.hosts.side import Side, Stalled

sv = offloop.Supervisor(name="side", grace=2)
side = Side(sv)


async def start_services(application: Application) -> None:  # type: ignore[type-arg]
    await sv.start()


async def stop_services(application: Application) -> None:  # type: ignore[type-arg]
    await sv.aclose()


async def ask(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    assert update.message is not None
    await update.message.reply_text(await side.ask_all("hi"))


async def crash(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    side.crash(" ".join(context.args or []))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url, token, *options = sys.argv[1:]
    if "stall" in options:
        sv.add(Stalled())
    application = (
        Application.builder()
        .token(token)
        .base_url(f"{url}/bot")
        .post_init(start_services)
        .post_shutdown(stop_services)
        .build()
    )
    application.add_handler(CommandHandler("ask", ask))
    application.add_handler(CommandHandler("crash", crash))
    application.run_polling()

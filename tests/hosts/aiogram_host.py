"""The aiogram 3 recipe, polling the fake Telegram API.

Run as ``python -m tests.hosts.aiogram_host URL TOKEN``.

``/ask`` replies with every service's answer; ``/crash KIND`` crashes one.
"""

from __future__ import annotations

import logging
import sys

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

import offloop
from tests.hosts.side import Side

sv = offloop.Supervisor(name="side", grace=2)
side = Side(sv)
dp = Dispatcher()


@dp.startup()
async def start_services() -> None:
    await sv.start()


@dp.shutdown()
async def stop_services() -> None:
    await sv.aclose()


@dp.message(Command("ask"))
async def ask(message: Message) -> None:
    await message.answer(await side.ask_all("hi"))


@dp.message(Command("crash"))
async def crash(message: Message, command: CommandObject) -> None:
    side.crash(str(command.args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    url, token = sys.argv[1:]
    session = AiohttpSession(api=TelegramAPIServer.from_base(url))
    dp.run_polling(Bot(token, session=session))

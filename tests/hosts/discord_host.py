"""The discord.py 2 recipe at the hook level: ``python -m tests.hosts.discord_host URL TOKEN``.

``client.run()`` is the real one: it logs in against the fake API (``Route.BASE``
points there) and calls ``setup_hook``; only ``connect()``, the gateway's
websocket, is replaced by a poll of the fake API's ``/fake-gateway``, where
``/ask`` gets every service's answer and ``/crash KIND`` crashes one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord
import discord.http

import offloop
from tests.hosts.side import Side

sv = offloop.Supervisor(name="side", grace=2)
side = Side(sv)


class Bot(discord.Client):
    """The recipe: the services start in setup_hook and stop in close, on SIGTERM too."""

    async def setup_hook(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.close_soon)
        await sv.start()

    def close_soon(self) -> None:
        self.closing = asyncio.ensure_future(self.close())  # a task needs a reference

    async def close(self) -> None:
        try:
            await sv.aclose()
        finally:
            await super().close()


class TestBot(Bot):
    """The recipe's bot with the gateway replaced by the fake API."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(intents=discord.Intents.none())
        self.gateway = f"{url}/fake-gateway/{token}"

    async def connect(self, *, reconnect: bool = True) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.is_closed():
                async with session.get(self.gateway) as resp:
                    text = (await resp.json())["text"]
                if text == "/ask":
                    answer = {"text": await side.ask_all("hi")}
                    async with session.post(f"{self.gateway}/sent", json=answer):
                        pass
                elif text is not None and text.startswith("/crash "):
                    side.crash(text.split()[1])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    url, token = sys.argv[1:]
    discord.http.Route.BASE = f"{url}/api/v10"
    TestBot(url, token).run(token, log_handler=None)

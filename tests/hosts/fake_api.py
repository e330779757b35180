"""A fake Telegram Bot API (and the two Discord routes a login needs) on 127.0.0.1.

One server for every host test, each test under a token of its own. The test
pushes a user's message with :meth:`FakeAPI.push`; the bot gets it from
``getUpdates`` (or, for the discord.py program, from ``/fake-gateway``, which
stands in for the gateway's websocket), and what the bot sends back
(``sendMessage``) is read with :meth:`FakeAPI.next_sent`.

``getUpdates`` answers as soon as a message is there, else after at most
:data:`HOLD` seconds (not the bot's long-poll ``timeout``), so that a
framework that waits for its last poll when it stops is not held up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from typing import Any, Final

from aiohttp import web

from offloop import LoopThread
from tests.helpers import WAIT

HOLD: Final = 0.2

BOT_USER: Final = {
    "id": 4242,
    "is_bot": True,
    "first_name": "Side",
    "username": "side_test_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
DISCORD_USER: Final = {
    "id": "4242",
    "username": "side",
    "discriminator": "0",
    "avatar": None,
    "bot": True,
}
CHAT: Final = {"id": 77, "type": "private", "first_name": "Tester"}
USER: Final = {"id": 77, "is_bot": False, "first_name": "Tester"}


class FakeAPI:
    """The server, run on an offloop LoopThread of its own; its methods are for the test thread."""

    def __init__(self) -> None:
        self._lt = LoopThread(name="fake-api")
        self._inbox: dict[str, asyncio.Queue[str]] = {}
        self._sent: dict[str, list[str]] = {}
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> FakeAPI:
        self.url = self._lt.call(self._serve)
        return self

    def close(self) -> None:
        self._lt.call(self._close)
        self._lt.close()

    def push(self, token: str, text: str) -> None:
        """A user sends ``text`` to the bot with this token."""
        self._lt.call(self._push, token, text)

    def next_sent(self, token: str, timeout: float = WAIT) -> str:
        """The next message the bot with this token sent; fails after ``timeout`` seconds."""
        with self._changed:
            sent = self._sent.setdefault(token, [])
            if not self._changed.wait_for(lambda: bool(sent), timeout):
                raise AssertionError(f"the bot {token!r} sent nothing within {timeout}s")
            return sent.pop(0)

    # -- on the server's loop --------------------------------------------------------------

    async def _serve(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._telegram)
        app.router.add_get("/api/v10/users/@me", self._discord_me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self._discord_app)
        app.router.add_get("/fake-gateway/{token}", self._gateway)
        app.router.add_post("/fake-gateway/{token}/sent", self._gateway_sent)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _push(self, token: str, text: str) -> None:
        self._queue(token).put_nowait(text)

    def _queue(self, token: str) -> asyncio.Queue[str]:
        return self._inbox.setdefault(token, asyncio.Queue())

    def _record(self, token: str, text: str) -> None:
        with self._changed:
            self._sent.setdefault(token, []).append(text)
            self._changed.notify_all()

    async def _next_text(self, token: str, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(self._queue(token).get(), min(timeout, HOLD))
        except asyncio.TimeoutError:
            return None

    async def _telegram(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"]
        params = await _params(request)
        result: Any = True
        if method == "getMe":
            result = BOT_USER
        elif method == "getUpdates":
            text = await self._next_text(token, float(params.get("timeout") or 0))
            result = [] if text is None else [self._update(text)]
        elif method == "sendMessage":
            self._record(token, str(params["text"]))
            result = self._message(str(params["text"]), BOT_USER)
        return web.json_response({"ok": True, "result": result})

    def _update(self, text: str) -> dict[str, Any]:
        n = next(self._ids)
        message = self._message(text, USER)
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return {"update_id": n, "message": message}

    def _message(self, text: str, sender: dict[str, Any]) -> dict[str, Any]:
        return {
            "message_id": next(self._ids),
            "date": int(time.time()),
            "chat": CHAT,
            "from": sender,
            "text": text,
        }

    async def _discord_me(self, request: web.Request) -> web.Response:
        return _discord_json(DISCORD_USER)

    async def _discord_app(self, request: web.Request) -> web.Response:
        return _discord_json(
            {
                "id": "4243",
                "name": "side",
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": DISCORD_USER,
                "verify_key": "0" * 64,
            }
        )

    async def _gateway(self, request: web.Request) -> web.Response:
        text = await self._next_text(request.match_info["token"], HOLD)
        return web.json_response({"text": text})

    async def _gateway_sent(self, request: web.Request) -> web.Response:
        self._record(request.match_info["token"], (await request.json())["text"])
        return web.json_response({})


def _discord_json(data: dict[str, Any]) -> web.Response:
    # Exactly 'application/json': discord.py reads any other type (even with a
    # charset, as json_response() sends) as text.
    return web.Response(
        body=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )


async def _params(request: web.Request) -> dict[str, Any]:
    if request.content_type == "application/json":
        return dict(await request.json())
    if request.can_read_body:
        return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    return dict(request.query)

"""The services every host program runs beside its framework, and how a request reaches each.

A Flask app under :class:`~offloop.WSGIService`, a thread service and an
async service, each with ``restart="no"`` so that one crash fails the
supervisor. ``ask(kind, text)`` sends a request through one of them;
``crash(kind)`` makes the thread or the async service raise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys

import aiohttp
import flask

from offloop import Service, StopToken, Supervisor, WSGIService

KINDS = ("flask", "thread", "async")

Job = tuple[str, "concurrent.futures.Future[str]"]


class Side:
    """The three services beside a host, added to ``sv``."""

    def __init__(self, sv: Supervisor) -> None:
        app = flask.Flask("side")

        @app.get("/echo")
        def echo() -> str:
            return f"flask {flask.request.args['text']}"

        self.web = sv.add(WSGIService(app, host="127.0.0.1", port=0, name="flask"), restart="no")
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.async_jobs: asyncio.Queue[Job] | None = None

        @sv.service(restart="no", name="thread")
        def worker(token: StopToken) -> None:
            token.add_callback(lambda _: self.jobs.put(None))  # wakes the get() below
            while (job := self.jobs.get()) is not None:
                text, reply = job
                if text == "crash":
                    raise ConnectionResetError("the thread service broke")
                reply.set_result(f"thread {text}")

        @sv.service(restart="no", name="async")
        async def server() -> None:
            jobs: asyncio.Queue[Job] = asyncio.Queue()
            self.async_jobs = jobs
            while True:
                text, reply = await jobs.get()
                if text == "crash":
                    raise ConnectionResetError("the async service broke")
                reply.set_result(f"async {text}")

    async def ask(self, kind: str, text: str) -> str:
        """The answer of one service to ``text``, through its own channel."""
        if kind == "flask":
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.web.url}/echo", params={"text": text}) as resp,
            ):
                return await resp.text()
        reply: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._send(kind, (text, reply))
        return await asyncio.wrap_future(reply)

    async def ask_all(self, text: str) -> str:
        """Every service's answer, joined: what a host's probe replies."""
        return " | ".join([await self.ask(kind, text) for kind in KINDS])

    def crash(self, kind: str) -> None:
        """Make the thread or the async service raise (restart='no': the supervisor fails)."""
        print(f"CRASHING {kind}", file=sys.stderr, flush=True)
        self._send(kind, ("crash", concurrent.futures.Future()))

    def _send(self, kind: str, job: Job) -> None:
        if kind == "thread":
            self.jobs.put(job)
        elif kind == "async":
            assert self.async_jobs is not None
            self.async_jobs.put_nowait(job)
        else:
            raise ValueError(f"no service {kind!r} to send to")


class Stalled(Service):
    """A service whose start never finishes: the host is stopped while ``start()`` runs."""

    def __init__(self) -> None:
        self.name = "stalled"

    async def start(self) -> None:
        print("STALLED STARTING", file=sys.stderr, flush=True)
        await asyncio.Event().wait()  # until the stop cancels it

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        pass

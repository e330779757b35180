"""The loop from_thread uses from plain threads: it lives as long as the program, and can be chosen.

An object made through ``from_thread`` (an aiohttp ``ClientSession``) is bound
to that loop, so the loop must not retire when idle. The idle test uses the
real defaults: rather than waiting, it moves the clocks that retirement reads
(the loop's ``time()`` and the loop threads' ``monotonic``) a day ahead, and
shows with a control that the same jump does retire a loop thread with an
idle timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import offloop
from offloop import Portal, from_thread
from offloop._loops import loopthread
from offloop._loops.shared import SHARED_IDLE_TIMEOUT, SharedLoopThread
from offloop._loops.target import shared
from tests.helpers import WAIT, in_plain_thread, wait_until, where_am_i

DAY = 86400.0


@pytest.fixture
def server() -> Iterator[str]:
    """An aiohttp server on 127.0.0.1, in a loop thread of its own."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    with offloop.LoopThread(name="lifetime-server") as lt:
        runner, port = lt.call(start)
        yield f"http://127.0.0.1:{port}/"
        lt.call(runner.cleanup)


def jump_clocks(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``loop`` and every loop thread's idle check see a day gone by, then wake the loop."""
    monkeypatch.setattr(loopthread, "monotonic", lambda: time.monotonic() + DAY)
    monkeypatch.setattr(loop, "time", lambda: time.monotonic() + DAY)
    loop.call_soon_threadsafe(lambda: None)  # it recomputes its timers' deadlines


async def get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        return await response.text()


def test_a_session_made_through_from_thread_works_after_any_idle_time(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a Flask view does: one ClientSession, made and used from plain threads.
    session = in_plain_thread(lambda: Portal().context(aiohttp.ClientSession).enter())
    assert in_plain_thread(lambda: from_thread(get, session, server)) == "hello"
    lt = shared.current
    assert lt is not None
    loop = lt.loop
    assert loop is not None

    # Control: the same jump retires a loop thread that has the old idle timeout.
    control = SharedLoopThread("offloop-shared-loop-control", SHARED_IDLE_TIMEOUT)
    first = control.get()
    assert first.call(asyncio.sleep, 0, "used") == "used"
    assert first.loop is not None
    jump_clocks(first.loop, monkeypatch)
    jump_clocks(loop, monkeypatch)
    wait_until(lambda: first.state is offloop.LoopThreadState.CLOSED, what="the control retiring")

    # from_thread's loop is still the same one, and the session still works.
    assert in_plain_thread(lambda: from_thread(get, session, server)) == "hello"
    assert shared.current is lt
    assert lt.state is offloop.LoopThreadState.RUNNING
    in_plain_thread(lambda: from_thread(session.close))


def test_a_context_left_open_on_the_shared_loop_exits_at_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "at_exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import contextlib
            import aiohttp
            import offloop

            @contextlib.asynccontextmanager
            async def pool():
                try:
                    yield "pool"
                finally:
                    print("pool closed at exit", flush=True)

            session = offloop.Portal().context(aiohttp.ClientSession).enter()
            print(offloop.Portal().context(pool).enter(), flush=True)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["pool", "pool", "closed", "at", "exit"]
    assert "Unclosed" not in proc.stderr  # aiohttp's warning for a session never closed


def test_set_from_thread_loop_chooses_a_loop_thread() -> None:
    with offloop.LoopThread(name="chosen") as lt:
        offloop.set_from_thread_loop(lt)
        try:
            name, loop = in_plain_thread(lambda: from_thread(where_am_i))
            assert (name, loop) == ("offloop-loop-chosen", lt.loop)
            thread = in_plain_thread(lambda: offloop.from_thread_sync(threading.current_thread))
            assert thread.name == "offloop-loop-chosen"
        finally:
            offloop.set_from_thread_loop(None)
    assert in_plain_thread(lambda: offloop.from_thread_sync(threading.current_thread)).name == (
        "offloop-shared-loop"
    )


async def test_set_from_thread_loop_chooses_the_hosts_loop() -> None:
    loop = asyncio.get_running_loop()
    offloop.set_from_thread_loop(loop)
    try:
        # asyncio's executor thread is a plain thread (no offloop pool started it).
        seen = await asyncio.to_thread(lambda: from_thread(where_am_i))
        assert seen == (threading.current_thread().name, loop)
        ran_on = await asyncio.to_thread(offloop.from_thread_sync, asyncio.get_running_loop)
        assert ran_on is loop
    finally:
        offloop.set_from_thread_loop(None)


def test_set_from_thread_loop_refuses_what_cannot_run() -> None:
    with pytest.raises(TypeError, match="set_from_thread_loop"):
        offloop.set_from_thread_loop("loop")  # type: ignore[arg-type]
    closed = asyncio.new_event_loop()
    closed.close()
    with pytest.raises(offloop.PoolClosedError, match="closed"):
        offloop.set_from_thread_loop(closed)
    loop = asyncio.new_event_loop()
    offloop.set_from_thread_loop(loop)
    try:
        loop.close()  # closed while chosen
        with pytest.raises(offloop.PoolClosedError, match="set_from_thread_loop"):
            in_plain_thread(lambda: from_thread(asyncio.sleep, 0))
    finally:
        offloop.set_from_thread_loop(None)


async def test_a_plain_thread_on_the_chosen_loop_is_told_what_cancelled_its_coroutine() -> None:
    # No worker of ours sent the plain thread its work: the message must not
    # say so, nor tell it to return from a worker function.
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    tasks: list[asyncio.Task[object]] = []

    async def waits() -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        await asyncio.Event().wait()

    offloop.set_from_thread_loop(loop)
    try:
        calling = asyncio.ensure_future(asyncio.to_thread(from_thread, waits))
        await asyncio.wait_for(started.wait(), WAIT)
        tasks[0].cancel()  # by something on the loop, not by the caller
        with pytest.raises(offloop.CallerGoneError) as caught:
            await asyncio.wait_for(calling, WAIT)
    finally:
        offloop.set_from_thread_loop(None)
    message = str(caught.value)
    assert "was cancelled on the event loop it ran on" in message, message
    assert "sent this work" not in message, message
    assert "worker function" not in message, message
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)

    def portal_to_loop() -> None:
        Portal(loop).call(waits)

    started.clear()
    calling = asyncio.ensure_future(asyncio.to_thread(portal_to_loop))
    await asyncio.wait_for(started.wait(), WAIT)
    tasks[1].cancel()
    with pytest.raises(offloop.CallerGoneError, match="on the event loop it ran on"):
        await asyncio.wait_for(calling, WAIT)

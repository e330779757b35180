"""The lifecycle every service shares: its states, and its own message for each refused move."""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from pathlib import Path

import flask
import pytest

from offloop import StopToken, WSGIService
from offloop._services.functions import ThreadService
from offloop._services.lifecycle import LifecycleService, LifecycleState
from offloop._services.process import ProcessService
from tests.helpers import WAIT, bounded


def state(svc: LifecycleService) -> LifecycleState:
    return svc.state  # a call, so mypy does not keep a narrowed state across an await


def waits_for_its_token(path: str, token: StopToken) -> None:
    # Module level: a spawned child imports it by name.
    Path(path).write_text("running")
    token.wait()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_each_refused_move_has_its_own_message_naming_the_service() -> None:
    release = threading.Event()

    def slow_to_stop(token: StopToken) -> None:
        token.wait()
        release.wait(WAIT)  # still cleaning up: the service stays STOPPING

    svc = ThreadService(slow_to_stop, "slow", pass_token=True)
    with pytest.raises(RuntimeError) as never_started:
        await svc.wait()
    assert str(never_started.value) == (
        f"Cannot wait {svc!r}: it has not been started; call start() first."
    )
    await svc.start()
    with pytest.raises(RuntimeError) as running:
        await svc.start()
    assert str(running.value) == (
        f"Cannot start {svc!r}: it is already running; stop it before starting it again."
    )
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0)  # stop() has set the token and waits for the thread
    assert state(svc) is LifecycleState.STOPPING
    with pytest.raises(RuntimeError) as still_stopping:
        await svc.start()
    assert str(still_stopping.value) == (
        f"Cannot start {svc!r}: it is still stopping; wait for stop() to return first."
    )
    assert "<ThreadService 'slow' stopping fn=" in str(still_stopping.value)
    release.set()
    await asyncio.wait_for(stopping, WAIT)
    assert state(svc) is LifecycleState.ENDED


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_function_service_that_raises_ends_crashed_and_starts_again() -> None:
    runs: list[int] = []

    def fails_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise ValueError("boom")

    svc = ThreadService(fails_once, "flaky", pass_token=False)
    await svc.start()
    with pytest.raises(ValueError, match="boom"):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert state(svc) is LifecycleState.CRASHED
    assert repr(svc).startswith("<ThreadService 'flaky' crashed fn=")
    await svc.start()
    await asyncio.wait_for(svc.wait(), WAIT)
    assert state(svc) is LifecycleState.ENDED
    assert len(runs) == 2


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_a_process_service_is_starting_until_its_child_is_ready(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    fn = functools.partial(waits_for_its_token, str(marker))
    svc = ProcessService(fn, "child", is_async=False, pass_token=True)
    start = asyncio.create_task(svc.start())
    # One step: start() has spawned the child and waits for its "ready", which
    # the loop cannot have read yet (this step was queued before it listened).
    await asyncio.sleep(0)
    assert svc.pid is not None
    assert state(svc) is LifecycleState.STARTING
    with pytest.raises(RuntimeError) as starting:
        await svc.start()
    assert str(starting.value) == (
        f"Cannot start {svc!r}: it is already starting; wait for that start() to return."
    )
    await asyncio.wait_for(start, WAIT)
    assert state(svc) is LifecycleState.RUNNING
    await asyncio.wait_for(svc.stop(), WAIT)
    assert state(svc) is LifecycleState.ENDED


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_wait_after_a_failed_start_says_the_start_failed() -> None:
    blocker = socket.create_server(("127.0.0.1", 0))
    try:
        svc = WSGIService(flask.Flask("offloop_test"), port=blocker.getsockname()[1], name="web")
        with pytest.raises(OSError, match="cannot listen"):
            await svc.start()
    finally:
        blocker.close()
    assert state(svc) is LifecycleState.CRASHED
    with pytest.raises(RuntimeError) as failed:
        await svc.wait()
    assert str(failed.value) == (
        f"Cannot wait for {svc!r}: it has not been started: its last start() failed; "
        f"call start() again."
    )

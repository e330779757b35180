"""A WatchService whose supervisor's event loop is closed without a stop (python-telegram-bot).

``run_polling()`` closes its loop without cancelling the tasks left on it: a
program without a ``post_shutdown`` that closes the supervisor never stops the
service, and no ``stop()`` can run on the closed loop. The loop's ``close()``
stops the observer instead and waits for its threads, within the grace.
Real folders, files and links under ``tmp_path``, real events.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from offloop import Supervisor, WatchService
from offloop._services import watch as watch_module
from tests.conftest import new_loop
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until

from .test_watch_symlink import publish

CLOSED = "its event loop was closed while it ran"


def watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("offloop-watch-")]


def closed_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if CLOSED in r.getMessage()]


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    """What the observer threads (or any other) raised, which would otherwise go to stderr."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def close_after_an_event(
    loop: asyncio.AbstractEventLoop, sv: Supervisor, delivered: list[Any], write: Any
) -> None:
    """Start ``sv`` on ``loop``, see an event delivered after ``write()``, close the loop."""
    try:
        loop.run_until_complete(sv.start())
        write()
        loop.run_until_complete(await_until(lambda: bool(delivered), WAIT, "an event"))
    finally:
        loop.close()  # with the supervisor's tasks still pending, as run_polling() does


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_loop_closed_under_a_watched_folder_stops_its_observer(
    loop_kind: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[BaseException | None],
) -> None:
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    sv = Supervisor(name="closed", grace=WAIT)
    delivered: list[Any] = []
    sv.add(WatchService(tmp_path, delivered.append, name="inbox"))
    close_after_an_event(
        new_loop(loop_kind), sv, delivered, lambda: (tmp_path / "a.txt").write_text("x")
    )
    # Stopped and joined within close(): the program may end right after it.
    assert watch_threads() == []
    (tmp_path / "b.txt").write_text("x")  # nobody watches any more
    [warning] = closed_warnings(caplog)
    assert "still running" not in warning
    assert thread_errors == []
    gc.collect()  # the pending tasks' "destroyed but pending" errors, here not later


def test_a_loop_closed_under_a_followed_link_stops_its_observer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_errors: list[BaseException | None]
) -> None:
    caplog.set_level(logging.WARNING, logger="offloop.supervisor")
    publish(tmp_path, 1, "a: 1\n")
    sv = Supervisor(name="closed", grace=WAIT)
    delivered: list[Any] = []
    sv.add(WatchService(tmp_path / "app.yaml", delivered.append, name="config"))
    close_after_an_event(new_loop("asyncio"), sv, delivered, lambda: publish(tmp_path, 2, "a: 2\n"))
    assert watch_threads() == []
    [warning] = closed_warnings(caplog)
    assert "still running" not in warning
    assert thread_errors == []
    gc.collect()


def test_an_event_that_comes_as_the_loop_closes_is_dropped_quietly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[BaseException | None],
) -> None:
    # The observer thread is handing an event over when the loop closes: it
    # finds the loop closed, drops the event and ends, with nothing raised.
    caplog.set_level(logging.DEBUG)
    sv = Supervisor(name="closed", grace=WAIT)
    delivered: list[Any] = []
    sv.add(WatchService(tmp_path, delivered.append, name="inbox"))
    real_change = watch_module._root_change
    held, late = threading.Event(), tmp_path / "late.txt"
    handed: list[bool] = []

    def held_change(run: Any) -> str | None:
        # In the observer thread, for the late file's event: until the loop's
        # close() has told the observer to stop.
        if late.exists() and not held.is_set():
            held.set()
            handed.append(run.observer.stopped_event.wait(WAIT))
        return real_change(run)

    monkeypatch.setattr(watch_module, "_root_change", held_change)
    loop = new_loop("asyncio")
    try:
        loop.run_until_complete(sv.start())
        late.write_text("x")
        loop.run_until_complete(await_until(held.is_set, WAIT, "the late event"))
    finally:
        loop.close()
    assert handed == [True]
    assert watch_threads() == []
    assert delivered == []
    assert thread_errors == []
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not [r for r in caplog.records if "is closed" in r.getMessage()], caplog.text
    del loop
    gc.collect()


@pytest.mark.parametrize("held", ["building", "queued"])
def test_a_loop_closed_during_a_start_stops_the_observer_that_start_opens(
    held: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    thread_errors: list[BaseException | None],
) -> None:
    # A restart under way when the loop closes: the observer its worker is
    # building is stopped once the start is done with it; a worker that has
    # not begun yet opens none. The supervisor's close hook is played by hand
    # here: it calls loop_closed(), then joins live_threads().
    svc = WatchService(tmp_path, print, name="inbox")
    real_open, real_observer = WatchService._open, WatchService._observer
    opening, closed, opened = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        opening.set()
        assert closed.wait(WAIT), "the loop was never closed"

    def queued_open(self: WatchService, *args: Any) -> None:
        try:
            if held == "queued":
                hold()
            real_open(self, *args)
        finally:
            opened.set()

    def held_observer(self: WatchService, *args: Any) -> Any:
        observer = real_observer(self, *args)
        if held == "building":
            hold()
        return observer

    monkeypatch.setattr(WatchService, "_open", queued_open)
    monkeypatch.setattr(WatchService, "_observer", held_observer)
    loop = new_loop("asyncio")
    try:
        starting = loop.create_task(svc.start())
        loop.run_until_complete(await_until(opening.is_set, WAIT, "the observer's start"))
    finally:
        loop.close()
    svc.loop_closed()
    if held == "queued":
        run = svc._opening
        assert run is not None
        assert run.closer is not None
        run.closer.join(WAIT)  # before the worker takes the run's lock
        del run
    closed.set()
    for thread in svc.live_threads():
        thread.join(WAIT)
    assert opened.wait(WAIT)
    assert svc.live_threads() == []
    assert watch_threads() == []
    assert thread_errors == []
    # The start, left pending on the closed loop, is collected quietly.
    del loop, starting, svc
    gc.collect()

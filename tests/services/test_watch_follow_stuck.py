"""WatchService's follow mode on a hung mount: a look that never returns does not hold the stop.

A look at a followed symlink resolves the link and stats the file it leads
to, in a worker; on a stuck network mount (NFS, SMB) either call blocks until
the mount answers. ``os.stat`` or ``os.path.realpath`` is wrapped for the
link: it can hold a call, as such a mount does, until the test lets it through.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from offloop import WatchService
from offloop._services import watch as watch_module
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded

from .test_watch_symlink import publish, watch_threads


class Hung:
    """A filesystem call on ``path``, held off the loop while ``when()`` is true (a stuck mount)."""

    def __init__(self, real: Callable[..., Any], path: Path) -> None:
        self.real = real
        self.path = str(path)
        self.loop_thread = threading.get_ident()
        self.when: Callable[[], bool] = lambda: False
        self.entered = threading.Event()  # a call is held
        self.gate = threading.Event()  # lets the held calls through
        self.returned = threading.Event()  # a held call has returned
        self.held = 0

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        hold = (
            isinstance(target, (str, os.PathLike))
            and os.fspath(target) == self.path
            and kwargs.get("follow_symlinks", True)
            and threading.get_ident() != self.loop_thread
            and not self.gate.is_set()
            and self.when()
        )
        if not hold:
            return self.real(target, *args, **kwargs)
        self.held += 1
        self.entered.set()
        try:
            assert self.gate.wait(WAIT), "the held call was never let through"
            return self.real(target, *args, **kwargs)
        finally:
            self.returned.set()


@pytest.fixture
def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(watch_module, "ROOT_CHECK_INTERVAL", 3600.0)  # looks made by the test
    publish(tmp_path, 1, "a: 1\n")
    return tmp_path / "app.yaml"


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_stop_does_not_wait_for_a_look_stuck_on_its_stat(
    link: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = Hung(os.stat, link)
    monkeypatch.setattr(os, "stat", stat)
    svc = WatchService(link, lambda event: None, name="config")
    await svc.start()
    run = svc._run
    assert run is not None
    follow = run.follow
    assert follow is not None
    try:
        await await_until(lambda: not follow.looking, WAIT, "the start's look to end")
        stat.when = lambda: True
        svc._look_again(run)  # as an event, or the periodic check, does
        await await_until(stat.entered.is_set, WAIT, "a look to be held")
        await asyncio.wait_for(svc.stop(), WAIT)  # the stat is still held
        assert svc.state.value == "stopped"
        assert not run.tasks
        assert watch_threads() == []
    finally:
        stat.gate.set()
        await svc.stop()
    # The pool's worker is free again once the mount answers.
    await await_until(stat.returned.is_set, WAIT, "the held stat to return")


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_look_resolves_the_link_before_it_takes_the_runs_lock(
    link: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop (and a loop's close()) takes that lock to stop the observer:
    # a look resolving the link under it, on a stuck mount, would hold them
    # until the supervisor's grace ran out.
    realpath = Hung(os.path.realpath, link)
    monkeypatch.setattr(os.path, "realpath", realpath)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(link, queue.put_nowait, name="config")
    await svc.start()
    run = svc._run
    assert run is not None
    try:
        realpath.when = run.lock.locked  # a mount stuck while the lock is held
        publish(link.parent, 2, "a: 2\n")  # moves the target's watch
        await await_until(
            lambda: not queue.empty() or realpath.entered.is_set(), WAIT, "the look's event"
        )
        assert not realpath.entered.is_set(), "a look resolved the link under the run's lock"
        event = queue.get_nowait()
        assert (event.event_type, event.src_path) == ("modified", str(link))
        await asyncio.wait_for(svc.stop(), WAIT)
    finally:
        realpath.gate.set()
        await svc.stop()
    assert realpath.held == 0
    assert watch_threads() == []

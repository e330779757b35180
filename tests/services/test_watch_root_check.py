"""WatchService's periodic root check: a stat of the watched folder, made off the loop.

On a stuck network mount (NFS, SMB) a stat blocks until the mount answers, so
it must never run on the event loop. os.stat is wrapped for the watched
folder only: it records which threads stat it and can hold a stat, as such a
mount does, until the test lets it through.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from offloop import WatchService
from offloop._services import watch as watch_module
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded


class MountStat:
    """os.stat of one folder, recorded, and held while ``hold`` is set, as on a stuck mount."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.real = os.stat
        self.loop_thread = threading.get_ident()
        self.lock = threading.Lock()
        self.threads: set[int] = set()
        self.calls = 0
        self.held = 0  # stats that were held
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold = False
        self.entered = threading.Event()  # a stat is held
        self.gate = threading.Event()  # lets the held stats through

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if not isinstance(target, (str, os.PathLike)) or os.fspath(target) != self.folder:
            return self.real(target, *args, **kwargs)
        with self.lock:
            self.threads.add(threading.get_ident())
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            hold = (
                self.hold and not self.gate.is_set() and threading.get_ident() != self.loop_thread
            )
            self.held += hold
        try:
            if hold:  # never on the loop: the test could not go on to open the gate
                self.entered.set()
                assert self.gate.wait(WAIT), "the held stat was never let through"
            return self.real(target, *args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def mount(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> MountStat:
    stat = MountStat(inbox)
    monkeypatch.setattr(os, "stat", stat)
    # Ticks a hundred times faster than usual: a check doubled by a tick would show.
    monkeypatch.setattr(watch_module, "ROOT_CHECK_INTERVAL", 0.01)
    return stat


@bounded(20)
async def test_the_periodic_root_check_stats_the_folder_off_the_loop(
    inbox: Path, mount: MountStat
) -> None:
    svc = WatchService(inbox, lambda event: None, name="inbox")
    await svc.start()
    try:
        started = mount.calls
        await await_until(lambda: mount.calls >= started + 3, WAIT, "three root checks")
        assert svc.state.value == "running"
    finally:
        await svc.stop()
    assert mount.threads  # the folder was stat-ed
    assert mount.loop_thread not in mount.threads  # but never by the loop's thread


@bounded(20)
async def test_a_slow_root_check_is_not_doubled_by_the_next_ticks(
    inbox: Path, mount: MountStat
) -> None:
    svc = WatchService(inbox, lambda event: None, name="inbox")
    await svc.start()
    run = svc._run
    assert run is not None
    try:
        mount.hold = True
        await await_until(mount.entered.is_set, WAIT, "a root check to be held")
        held = run.checking
        assert held is not None
        for _ in range(3):  # ticks while it is held
            svc._check_root(run)
            await asyncio.sleep(0)
        assert run.checking is held
        assert [t for t in run.tasks if not t.done()] == [held]
        mount.gate.set()
        calls = mount.calls
        # The checks go on once the held one has ended, one at a time.
        await await_until(lambda: mount.calls >= calls + 2, WAIT, "the checks to go on")
        assert svc.state.value == "running"
    finally:
        mount.gate.set()
        await svc.stop()
    assert mount.held == 1
    assert mount.most_in_flight == 1
    assert mount.loop_thread not in mount.threads


@bounded(20)
async def test_stop_does_not_wait_for_a_root_check_stuck_on_its_stat(
    inbox: Path, mount: MountStat
) -> None:
    svc = WatchService(inbox, lambda event: None, name="inbox")
    await svc.start()
    try:
        mount.hold = True
        await await_until(mount.entered.is_set, WAIT, "a root check to be held")
        await asyncio.wait_for(svc.stop(), WAIT)  # the stat is still held
        assert svc.state.value == "stopped"
        assert svc._run is not None
        assert not svc._run.tasks
    finally:
        mount.gate.set()
        await svc.stop()
    # The pool's worker is free again once the mount answers.
    await await_until(lambda: mount.in_flight == 0, WAIT, "the held stat to return")
    assert mount.loop_thread not in mount.threads

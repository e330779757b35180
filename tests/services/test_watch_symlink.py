"""WatchService on a file that is a symlink: a Kubernetes ConfigMap, a dotfile.

Real links and files in a temporary folder. The periodic root check is set an
hour apart where a test shows that an event comes from a watched folder, so
only the folder watches can deliver it.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from offloop import WatchService
from offloop._services import watch as watch_module
from offloop._services import watch_follow
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded


def watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("offloop-watch-")]


def publish(root: Path, version: int, text: str) -> Path:
    """Write a ConfigMap's ``app.yaml`` as the kubelet does; return the new version's file.

    Each version is a folder of its own; ``..data`` points at the current one and
    is replaced by a rename; ``app.yaml`` is ``..data/app.yaml`` and never changes
    itself. The previous version's folder is deleted.
    """
    folder = root / f"..v{version}"
    folder.mkdir()
    (folder / "app.yaml").write_text(text)
    (root / "..data_tmp").symlink_to(folder.name)
    os.replace(root / "..data_tmp", root / "..data")
    if version > 1:
        shutil.rmtree(root / f"..v{version - 1}")
    link = root / "app.yaml"
    if not link.is_symlink():
        link.symlink_to(Path("..data") / "app.yaml")
    return folder / "app.yaml"


async def watching(path: Path, **options: Any) -> tuple[WatchService, asyncio.Queue[Any]]:
    """A started WatchService on ``path`` whose events go to the queue returned with it."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(path, queue.put_nowait, **options)
    await svc.start()
    return svc, queue


async def next_event(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), WAIT)


@pytest.fixture
def no_periodic_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "ROOT_CHECK_INTERVAL", 3600.0)


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_configmap_update_is_one_modified_event_on_the_file(tmp_path: Path) -> None:
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    svc, queue = await watching(path, name="config")
    try:
        for version in (2, 3):
            publish(tmp_path, version, f"a: {version}\n")
            event = await next_event(queue)
            assert (event.event_type, event.src_path, event.is_directory) == (
                "modified",
                str(path),
                False,
            )
            assert path.read_text() == f"a: {version}\n"
            assert queue.empty()  # one event per update, not the folder's raw events
        assert svc.state.value == "running"
    finally:
        await svc.stop()
    assert watch_threads() == []  # the emitters of moved watches joined too


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_the_new_version_is_watched_after_an_update(tmp_path: Path) -> None:
    # The old version's folder is deleted by the update, and the file the link
    # leads to is in the new one: an edit in place there must be seen too.
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    svc, queue = await watching(path, name="config")
    try:
        current = publish(tmp_path, 2, "a: 2\n")
        assert (await next_event(queue)).event_type == "modified"
        run = svc._run
        assert run is not None
        follow = run.follow
        assert follow is not None
        await await_until(
            lambda: follow.target_dir == str(current.parent) and not follow.looking,
            WAIT,
            "the watch to move",
        )
        with current.open("a") as f:
            f.write("b: 2\n")
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
    finally:
        await svc.stop()
    assert watch_threads() == []


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_link_to_a_file_in_another_folder_sees_edits_there(tmp_path: Path) -> None:
    # A dotfile linked from a repository: the file is edited where it is.
    (tmp_path / "dotfiles").mkdir()
    (tmp_path / "home").mkdir()
    real = tmp_path / "dotfiles" / "bot.toml"
    real.write_text("token = 1\n")
    path = tmp_path / "home" / "bot.toml"
    path.symlink_to(real)
    svc, queue = await watching(path, name="dotfile", patterns=["*.toml"])
    try:
        real.write_text("token = 2\n")
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
    finally:
        await svc.stop()


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_link_that_stops_and_starts_leading_to_a_file(tmp_path: Path) -> None:
    first = tmp_path / "first.txt"
    first.write_text("1")
    path = tmp_path / "current.txt"
    path.symlink_to(first.name)
    svc, queue = await watching(path, name="current")
    try:
        first.unlink()  # the link dangles
        assert (await next_event(queue)).event_type == "deleted"
        second = tmp_path / "second.txt"
        second.write_text("2")
        (tmp_path / "tmp-link").symlink_to(second.name)
        os.replace(tmp_path / "tmp-link", path)
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("created", str(path))
        assert svc.state.value == "running"
    finally:
        await svc.stop()


@bounded(20)
async def test_a_change_along_the_chain_in_an_unwatched_folder_is_found_by_the_check(
    tmp_path: Path,
) -> None:
    # path -> links/cfg -> v1/cfg.txt; "links" is neither the path's folder nor
    # the target's, so only the periodic check sees links/cfg retargeted.
    for name in ("app", "links", "v1", "v2"):
        (tmp_path / name).mkdir()
    (tmp_path / "v1" / "cfg.txt").write_text("1")
    (tmp_path / "v2" / "cfg.txt").write_text("2")
    (tmp_path / "links" / "cfg").symlink_to(tmp_path / "v1" / "cfg.txt")
    path = tmp_path / "app" / "cfg.txt"
    path.symlink_to(tmp_path / "links" / "cfg")
    svc, queue = await watching(path, name="chain")
    try:
        (tmp_path / "links" / "tmp").symlink_to(tmp_path / "v2" / "cfg.txt")
        os.replace(tmp_path / "links" / "tmp", tmp_path / "links" / "cfg")
        svc._check_root(svc._run)  # type: ignore[arg-type]  # the periodic check, now
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
        assert path.read_text() == "2"
    finally:
        await svc.stop()


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_raising_handler_on_a_followed_file_crashes_the_service(tmp_path: Path) -> None:
    publish(tmp_path, 1, "a: 1\n")

    def handler(event: Any) -> None:
        raise ValueError(f"cannot parse {event.src_path}")

    svc = WatchService(tmp_path / "app.yaml", handler, name="config")
    await svc.start()
    publish(tmp_path, 2, "a: [\n")
    with pytest.raises(ValueError, match=r"cannot parse .*app\.yaml"):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "crashed"
    assert watch_threads() == []


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_an_update_during_start_is_one_event_not_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kubelet swaps the version, deleting the old folder, after the start
    # looked at the link but before its watches are in place: the start must
    # not fail on the vanished folder, and the change is reported.
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    real = watch_follow.Followed

    class UpdatedMeanwhile(real):  # type: ignore[misc,valid-type]
        def __init__(self, followed: Path) -> None:
            super().__init__(followed)
            publish(tmp_path, 2, "a: 2\n")

    monkeypatch.setattr(watch_module, "Followed", UpdatedMeanwhile)
    svc, queue = await watching(path, name="config")
    try:
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
        assert svc.state.value == "running"
    finally:
        await svc.stop()
    assert watch_threads() == []


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_stop_during_a_move_of_the_target_watch_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The move adds a watch, and its emitter thread, under the run's lock;
    # the stop takes that lock to stop the observer, so it waits for the
    # move, and the watch it added goes with the observer. (The stop once
    # failed to wait for the look: asyncio.wait() refused the pool's future,
    # and the error was logged as never retrieved.)
    caplog.set_level(logging.ERROR)
    real_move = watch_follow.move_target_watch_locked
    entered, gate = threading.Event(), threading.Event()
    moved: list[str] = []

    def held_move(run: Any, follow: Any, folder: str | None) -> None:
        entered.set()
        assert gate.wait(WAIT), "the move was never let through"
        real_move(run, follow, folder)
        moved.append("moved")

    publish(tmp_path, 1, "a: 1\n")
    svc = WatchService(tmp_path / "app.yaml", lambda event: None, name="config")
    await svc.start()
    run = svc._run
    assert run is not None
    monkeypatch.setattr(watch_follow, "move_target_watch_locked", held_move)
    publish(tmp_path, 2, "a: 2\n")
    await await_until(entered.is_set, WAIT, "a move of the target watch")
    stopping = asyncio.ensure_future(svc.stop())
    for _ in range(10):  # turns in which a stop that did not wait would end
        await asyncio.sleep(0)
    assert not stopping.done()
    assert not run.closed
    gate.set()
    await asyncio.wait_for(stopping, WAIT)
    assert moved == ["moved"]
    assert svc.state.value == "stopped"
    assert watch_threads() == []
    del stopping
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_the_followed_file_is_looked_at_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stat on a stuck network mount blocks whichever thread makes it: never the loop's.
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    lookers: set[int] = set()
    real_stat, real_realpath = os.stat, os.path.realpath

    def recording_stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        # Not publish()'s own lstat of the link (follow_symlinks=False).
        if os.fspath(target) == str(path) and kwargs.get("follow_symlinks", True):
            lookers.add(threading.get_ident())
        return real_stat(target, *args, **kwargs)

    def recording_realpath(target: Any, *args: Any, **kwargs: Any) -> str:
        if os.fspath(target) == str(path):
            lookers.add(threading.get_ident())
        return str(real_realpath(target, *args, **kwargs))

    monkeypatch.setattr(os, "stat", recording_stat)
    monkeypatch.setattr(os.path, "realpath", recording_realpath)
    svc, queue = await watching(path, name="config")
    try:
        publish(tmp_path, 2, "a: 2\n")
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
    finally:
        await svc.stop()
    assert lookers  # the path was looked at
    assert threading.get_ident() not in lookers  # but not by the loop's thread


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_changes_during_a_slow_look_make_one_more_look_not_one_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One look at a time, so events come in order; the changes made while it
    # is held (a slow mount) are looked at once, after it.
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    svc, queue = await watching(path, name="config")
    run = svc._run
    assert run is not None
    follow = run.follow
    assert follow is not None
    await await_until(lambda: not follow.looking, WAIT, "the start's look to end")
    real_state = watch_follow.file_state
    entered, gate = threading.Event(), threading.Event()
    looks: list[int] = []

    def slow_state(followed: Path) -> Any:
        looks.append(threading.get_ident())
        entered.set()
        assert gate.wait(WAIT), "the look was never let through"
        return real_state(followed)

    monkeypatch.setattr(watch_follow, "file_state", slow_state)
    try:
        publish(tmp_path, 2, "a: 2\n")
        await await_until(entered.is_set, WAIT, "a look at version 2")
        publish(tmp_path, 3, "a: 3\n")
        await await_until(lambda: follow.again, WAIT, "the changes during the look to be noted")
        gate.set()
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
        await await_until(lambda: not follow.looking and not follow.again, WAIT, "the looks to end")
        assert len(looks) >= 2  # the held one, and one after it
        assert queue.empty()  # version 3 was seen by the held look: nothing new after it
    finally:
        gate.set()
        await svc.stop()


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_a_target_folder_that_cannot_be_watched_is_warned_about_once_per_streak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As when the inotify watch limit is reached: watchdog's schedule() raises.
    caplog.set_level(logging.INFO, logger="offloop")
    observers_api = pytest.importorskip("watchdog.observers.api")
    real_schedule = observers_api.BaseObserver.schedule
    refused: set[str] = set()
    attempts: list[str] = []

    def schedule(observer: Any, handler: Any, folder: str, **options: Any) -> Any:
        if os.path.normpath(folder) in refused:
            attempts.append(folder)
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real_schedule(observer, handler, folder, **options)

    monkeypatch.setattr(observers_api.BaseObserver, "schedule", schedule)
    publish(tmp_path, 1, "a: 1\n")
    path = tmp_path / "app.yaml"
    svc, queue = await watching(path, name="config")
    run = svc._run
    assert run is not None
    follow = run.follow
    assert follow is not None

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    try:
        folder = str(tmp_path / "..v2")  # tmp_path is resolved already
        refused.add(folder)
        current = publish(tmp_path, 2, "a: 2\n")
        event = await next_event(queue)  # the change itself is still seen
        assert (event.event_type, event.src_path) == ("modified", str(path))
        await await_until(lambda: attempts != [], WAIT, "a first attempt to watch")
        await await_until(lambda: not follow.looking, WAIT, "the look to end")
        tried = len(attempts)
        svc._look_again(run)  # as the periodic check does, once a second
        await await_until(lambda: len(attempts) > tried, WAIT, "the watch to be tried again")
        await await_until(lambda: not follow.looking, WAIT, "the look to end")
        assert warnings() == [
            f"WatchService 'config' cannot watch {folder!r}, the folder of the file its "
            f"followed link {str(path)!r} leads to: [Errno {errno.ENOSPC}] inotify watch limit "
            f"reached. Until it can, a change made to that file in place is only seen by the "
            f"check once a second, which also tries the watch again; to fix it, raise the "
            f"limit of inotify watches (sysctl fs.inotify.max_user_watches)."
        ]
        refused.clear()  # the limit was raised
        svc._look_again(run)
        await await_until(lambda: follow.target_dir == folder, WAIT, "the watch to be in place")
        recovered = [r.getMessage() for r in caplog.records if "now watches" in r.getMessage()]
        assert recovered == [
            f"WatchService 'config' now watches {folder!r}, the folder of the file its followed "
            f"link {str(path)!r} leads to, which it could not watch before."
        ]
        with current.open("a") as f:  # seen by the watch, with no periodic check
            f.write("b: 2\n")
        event = await next_event(queue)
        assert (event.event_type, event.src_path) == ("modified", str(path))
        assert len(warnings()) == 1
    finally:
        await svc.stop()
    assert watch_threads() == []


@pytest.mark.usefixtures("no_periodic_check")
@bounded(20)
async def test_patterns_match_the_given_path_not_the_file_the_link_leads_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The events name the given path, so the patterns filter on it too: a
    # link app.yaml -> v1/app.conf is a "*.yaml" file, not a "*.conf" one.
    caplog.set_level(logging.WARNING, logger="offloop")
    (tmp_path / "v1").mkdir()
    real = tmp_path / "v1" / "app.conf"
    real.write_text("a: 1\n")
    path = tmp_path / "app.yaml"
    path.symlink_to(real)
    yaml_svc, yaml_events = await watching(path, name="yaml", patterns=["*.yaml"])
    conf_svc, conf_events = await watching(path, name="conf", patterns=["*.conf"])
    try:
        # Said at the start, where the mistake can be fixed: nothing will come.
        assert [r.getMessage() for r in caplog.records] == [
            f"WatchService 'conf' follows the symlink {str(path)!r}, but none of its "
            f"patterns ['*.conf'] matches that path, so it will deliver no event: patterns "
            f"are matched against the path it was given, not the file the link leads to. "
            f"Add a pattern that matches {path.name!r}, or pass patterns=None."
        ]
        run = conf_svc._run
        assert run is not None
        follow = run.follow
        assert follow is not None
        before = follow.state
        real.write_text("a: 2\n")
        event = await next_event(yaml_events)
        assert (event.event_type, event.src_path) == ("modified", str(path))
        # The conf service saw the change too, and delivered nothing for it.
        await await_until(
            lambda: follow.state != before and not follow.looking, WAIT, "the conf look"
        )
        assert conf_events.empty()
    finally:
        await conf_svc.stop()
        await yaml_svc.stop()

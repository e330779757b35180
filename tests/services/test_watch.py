"""WatchService: real files in a temporary folder, events delivered on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from offloop import OffloopError, Supervisor, WatchService
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded


def watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("offloop-watch-")]


async def next_event_for(queue: asyncio.Queue[Any], path: Path, seen: list[Any]) -> Any:
    """Take events until one is about ``path``; record every event taken in ``seen``."""

    async def take() -> Any:
        while True:
            event = await queue.get()
            seen.append(event)
            if Path(event.src_path) == path and not event.is_directory:
                return event

    return await asyncio.wait_for(take(), WAIT)


@bounded(20)
async def test_async_handler_gets_real_file_events_on_the_loop(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    threads: list[int] = []

    async def handler(event: Any) -> None:
        threads.append(threading.get_ident())
        await queue.put(event)

    svc = WatchService(tmp_path, handler, name="inbox")
    assert repr(svc) == f"<WatchService 'inbox' idle path={str(tmp_path)!r}>"
    await svc.start()
    assert repr(svc) == f"<WatchService 'inbox' running path={str(tmp_path)!r}>"
    assert "offloop-watch-inbox" in watch_threads()
    target = tmp_path / "report.txt"
    target.write_text("hello")
    event = await next_event_for(queue, target, [])
    assert event.event_type in ("created", "modified")
    assert set(threads) == {loop_thread}  # delivered on the supervisor's loop
    await svc.stop()
    assert watch_threads() == []  # observer and emitter threads joined
    assert repr(svc) == f"<WatchService 'inbox' stopped path={str(tmp_path)!r}>"


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_plain_handler_is_called_on_the_loop_and_patterns_filter(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    threads: list[int] = []

    def handler(event: Any) -> None:
        threads.append(threading.get_ident())
        queue.put_nowait(event)

    svc = WatchService(tmp_path, handler, patterns=["*.txt"])
    assert "patterns=['*.txt']" in repr(svc)
    await svc.start()
    (tmp_path / "skip.log").write_text("no")
    target = tmp_path / "keep.txt"
    target.write_text("yes")
    seen: list[Any] = []
    # Events arrive in order: had skip.log passed the filter, it would come first.
    await next_event_for(queue, target, seen)
    assert all(str(e.src_path).endswith(".txt") for e in seen)
    assert set(threads) == {loop_thread}
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_not_recursive_ignores_sub_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(tmp_path, queue.put_nowait, recursive=False)
    await svc.start()
    (tmp_path / "sub" / "deep.txt").write_text("x")
    target = tmp_path / "top.txt"
    target.write_text("x")
    seen: list[Any] = []
    await next_event_for(queue, target, seen)
    assert not any("deep.txt" in str(e.src_path) for e in seen)
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_stop_waits_for_a_handler_in_flight(tmp_path: Path) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()
    finished: list[str] = []

    async def handler(event: Any) -> None:
        if event.is_directory:
            return
        entered.set()
        await gate.wait()
        finished.append(Path(event.src_path).name)

    svc = WatchService(tmp_path, handler)
    await svc.start()
    (tmp_path / "a.txt").write_text("x")
    await asyncio.wait_for(entered.wait(), WAIT)
    stopping = asyncio.ensure_future(svc.stop())
    await await_until(lambda: watch_threads() == [], WAIT, "the observer to stop")
    assert not stopping.done()  # the handler still runs
    gate.set()
    await asyncio.wait_for(stopping, WAIT)
    assert "a.txt" in finished


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", ["async", "plain"])
@bounded(20)
async def test_a_raising_handler_crashes_the_service(tmp_path: Path, kind: str) -> None:
    calls: list[str] = []

    def check(event: Any) -> None:
        calls.append(event.src_path)
        if str(event.src_path).endswith("bad.txt"):
            raise ValueError(f"cannot parse {event.src_path}")

    async def async_check(event: Any) -> None:
        check(event)

    svc = WatchService(tmp_path, async_check if kind == "async" else check, name="parser")
    await svc.start()
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot parse .*bad\.txt"):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "crashed"
    assert watch_threads() == []  # wait() raised with nothing left running
    await svc.start()  # a fresh observer
    queue: asyncio.Queue[Any] = asyncio.Queue()
    svc.handler = queue.put_nowait
    target = tmp_path / "good.txt"
    target.write_text("x")
    await next_event_for(queue, target, [])
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_deleting_the_watched_folder_crashes_the_service(tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    svc = WatchService(folder, lambda event: None, name="inbox")
    await svc.start()
    await asyncio.to_thread(shutil.rmtree, folder)
    # watchdog stops watching a deleted root: the service must not go on "running".
    with pytest.raises(
        FileNotFoundError, match=r"stopped watching: the folder .*inbox' was deleted"
    ):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "crashed"
    assert watch_threads() == []


@pytest.mark.loops("asyncio")
@bounded(20)
@pytest.mark.parametrize("recreate", [False, True], ids=["renamed", "renamed-and-recreated"])
async def test_renaming_the_watched_folder_away_crashes_the_service(
    tmp_path: Path, recreate: bool
) -> None:
    # watchdog reports no move for the root itself, and its events went on
    # under the old name; a folder made again at the path was never watched.
    folder = tmp_path / "inbox"
    folder.mkdir()
    svc = WatchService(folder, lambda event: None, name="inbox")
    await svc.start()
    folder.rename(tmp_path / "elsewhere")
    if recreate:
        folder.mkdir()
    how = "replaced by another folder" if recreate else "deleted or moved away"
    with pytest.raises(
        FileNotFoundError, match=rf"stopped watching: the folder .*inbox' was {how}"
    ):
        await asyncio.wait_for(svc.wait(), WAIT)
    assert svc.state.value == "crashed"
    assert watch_threads() == []


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_missing_folder_fails_start_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "later"
    svc = WatchService(missing, print, name="later")
    with pytest.raises(
        FileNotFoundError, match=r"<WatchService 'later' .*cannot watch .*does not exist"
    ):
        await svc.start()
    missing.mkdir()
    await svc.start()  # nothing was left half-started
    await svc.stop()


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"WatchService\(path\) must be a str or a path"):
        WatchService(42, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"WatchService\(handler\) must be a function"):
        WatchService(tmp_path, "print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"write patterns=\['\*\.txt'\]"):
        WatchService(tmp_path, print, patterns="*.txt")


@pytest.mark.loops("asyncio", "uvloop")
@bounded(20)
async def test_under_a_supervisor(tmp_path: Path) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    sv = Supervisor(name="files", grace=2.0)
    sv.add(WatchService(tmp_path, queue.put, name="inbox", patterns=["*.csv"]))
    async with sv:
        assert sv.status()["inbox"].state == "running"
        target = tmp_path / "data.csv"
        target.write_text("a,b")
        await next_event_for(queue, target, [])
    assert sv.status()["inbox"].state == "stopped"
    assert watch_threads() == []


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_start_cancelled_midway_leaves_no_observer_behind(tmp_path: Path) -> None:
    svc = WatchService(tmp_path, print)
    # Cancelled while the observer is queued, being built, started, or just started.
    for turns in range(5):
        starting = asyncio.ensure_future(svc.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        if starting.cancelled():
            assert svc.state.value in ("idle", "crashed")  # idle: cancelled before it began
            assert watch_threads() == []  # the cancelled start() undid what it began
        else:
            await svc.stop()
    await svc.start()  # and the next start works
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_watched_file_saved_by_replacement_keeps_the_service_running(
    tmp_path: Path,
) -> None:
    # Editors write a temporary file and rename it over the target: a new
    # inode each save, which is no reason to crash a service watching a file.
    target = tmp_path / "config.toml"
    target.write_text("a = 1\n")
    events: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(target, events.put_nowait, name="config")
    await svc.start()
    try:
        tmp = tmp_path / "config.toml.tmp"
        tmp.write_text("a = 2\n")
        tmp.replace(target)
        seen: list[Any] = []
        await asyncio.wait_for(_event_of(events, "moved", seen), WAIT)
        await asyncio.sleep(0)  # let a crash (it used to be one) land first
        assert svc.state.value == "running", seen
    finally:
        await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_watched_file_gets_only_its_own_events_save_after_save(tmp_path: Path) -> None:
    # watchdog < 7 (the newest on Python 3.10) watched the file's inode: the
    # first save ended the watch. The events of the folder's other files
    # (here a sibling written first, and the temporary files) are not the
    # file's: in order, they would come before the first move.
    target = tmp_path / "config.toml"
    target.write_text("a = 0\n")
    events: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(target, events.put_nowait, name="config")
    await svc.start()
    try:
        (tmp_path / "other.toml").write_text("b = 1\n")
        seen: list[Any] = []
        for n in (1, 2):
            tmp = tmp_path / f"config.toml.{n}.tmp"
            tmp.write_text(f"a = {n}\n")
            tmp.replace(target)
            moved = await asyncio.wait_for(_event_of(events, "moved", seen), WAIT)
            assert (Path(moved.src_path), Path(moved.dest_path)) == (tmp, target)
        assert all(target in (Path(e.src_path), Path(e.dest_path or e.src_path)) for e in seen)
        assert svc.state.value == "running"
    finally:
        await svc.stop()


async def _event_of(queue: asyncio.Queue[Any], kind: str, seen: list[Any]) -> Any:
    while True:
        event = await queue.get()
        seen.append(event)
        if event.event_type == kind:
            return event


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_relative_folder_still_watched_after_the_program_changes_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    events: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService("data", events.put_nowait, name="data")
    await svc.start()
    try:
        monkeypatch.chdir(tmp_path.parent)  # "data" now names nothing here
        await asyncio.sleep(0)
        svc._check_root(svc._run)  # type: ignore[arg-type]  # the periodic check, now
        (tmp_path / "data" / "new.txt").write_text("x")
        created = await asyncio.wait_for(_event_of(events, "created", []), WAIT)
        assert Path(created.src_path).name == "new.txt"  # relative, as it was given
        assert svc.state.value == "running"  # it used to crash: "'data' was deleted"
    finally:
        await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_a_folder_reached_through_a_symlink_is_watched(tmp_path: Path) -> None:
    # A deploy's "current -> releases/42", a home folder on another disk: the
    # folder is the link's target, and events name paths under the link.
    real = tmp_path / "releases" / "42"
    (real / "conf").mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    svc = WatchService(link, queue.put_nowait, name="linked")
    await svc.start()
    (real / "top.txt").write_text("written through the real path")
    event = await next_event_for(queue, link / "top.txt", [])
    assert event.event_type in ("created", "modified")
    (link / "conf" / "deep.txt").write_text("written through the link, in a sub-folder")
    await next_event_for(queue, link / "conf" / "deep.txt", [])
    assert svc.state.value == "running"
    await svc.stop()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_stop_during_start_waits_for_the_start_then_stops(tmp_path: Path) -> None:
    svc = WatchService(tmp_path, lambda event: None, name="early")
    start = asyncio.create_task(svc.start())
    await asyncio.sleep(0)  # start() now waits for its observer, built in a worker thread
    assert svc.state.value == "starting"
    await asyncio.wait_for(svc.stop(), WAIT)
    await asyncio.wait_for(start, WAIT)
    assert svc.state.value == "stopped"
    assert watch_threads() == []  # the observer the start built was stopped too


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", ["async", "plain"])
@bounded(20)
async def test_a_handler_raising_system_exit_crashes_the_service_not_the_loop(
    tmp_path: Path, kind: str
) -> None:
    # As in an 'async def' service: SystemExit escaping a task or a callback
    # would end the event loop at once, skipping every service's stop.
    def leave(event: Any) -> None:
        raise SystemExit(3)

    async def async_leave(event: Any) -> None:
        leave(event)

    svc = WatchService(tmp_path, async_leave if kind == "async" else leave, name="quitter")
    await svc.start()
    (tmp_path / "any.txt").write_text("x")
    with pytest.raises(OffloopError) as info:
        await asyncio.wait_for(svc.wait(), WAIT)
    assert str(info.value) == (
        "The handler of <WatchService 'quitter' running path="
        f"{str(tmp_path)!r}> raised SystemExit(3), which would have ended the whole event "
        "loop at once; it counts as a crash of this service."
    )
    assert isinstance(info.value.__cause__, SystemExit)
    assert svc.state.value == "crashed"
    assert watch_threads() == []


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", ["async", "plain"])
@bounded(20)
async def test_a_handler_raising_keyboard_interrupt_stops_the_supervisor_gracefully(
    tmp_path: Path, kind: str
) -> None:
    sv = Supervisor(grace=5)
    neighbour_stopped = threading.Event()

    @sv.service
    def neighbour(token: Any) -> None:
        token.wait()
        neighbour_stopped.set()

    def interrupt(event: Any) -> None:
        raise KeyboardInterrupt

    async def async_interrupt(event: Any) -> None:
        interrupt(event)

    watcher = WatchService(tmp_path, async_interrupt if kind == "async" else interrupt)
    sv.add(watcher, restart="always")

    async def poke() -> None:
        await await_until(lambda: watcher.state.value == "running", WAIT, "the watcher")
        (tmp_path / "any.txt").write_text("x")

    poker = asyncio.create_task(poke())
    await asyncio.wait_for(sv.serve(), WAIT)  # returns: a stop, not a failure
    await poker
    assert neighbour_stopped.is_set()
    assert sv.status()["watch"].state == "stopped"
    assert "raised KeyboardInterrupt" in str(sv.status()["watch"].last_error)

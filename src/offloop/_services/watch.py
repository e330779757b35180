"""``WatchService``: watchdog file events delivered on the supervisor's event loop.

watchdog calls its handlers in its own observer thread, where an ``async``
handler cannot run and a plain one races with the loop's data. The adapter
hands every event over to the loop with ``call_soon_threadsafe``: a coroutine
function is run as a task there (tracked, so ``stop()`` waits for it), a
plain function is called there. The observer thread and its emitter threads
are stopped and joined on ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

from .._core.errors import OffloopError
from .._core.extras import require
from .._core.token import current_token
from .._core.validate import describe
from .._threads.tothread import service_pool
from .adapters import check_name
from .base import ServiceInterrupted
from .functions import describe_thread
from .lifecycle import LifecycleService, logger
from .watch_follow import (
    FileState,
    Followed,
    look,
    move_target_watch_locked,
    name_emitters,
    target_dir,
)

__all__ = ["WatchService"]

EventHandler = Callable[[Any], object]

#: Seconds between checks that the watched root is still the folder the
#: service started on (it may be renamed away without a single event).
ROOT_CHECK_INTERVAL = 1.0


class _WatchRun:
    """One run of a WatchService, start() .. its end: its observer, its handler tasks."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.observer: Any = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.ending: asyncio.Task[None] | None = None
        self.crashed = False
        self.error: Exception | None = None
        # Held while the observer is built and started, or stopped, in a worker thread.
        self.lock = threading.Lock()
        self.closed = False
        # The watched root's (device, inode): a root renamed away keeps sending
        # events under its old name, and watchdog reports no move for it.
        self.root: tuple[int, int] | None = None
        self.path: Path | None = None
        self.check: asyncio.TimerHandle | None = None
        # The root check running in a worker (see WatchService._check_root):
        # one at a time, so a stat stuck on a network mount is not joined by
        # another every second, and the next one is timed from its end.
        self.checking: asyncio.Task[str | None] | None = None
        # Set when the path is a symlink to a file: see Followed.
        self.follow: Followed | None = None
        # That link's look running in a worker (see WatchService._look_again).
        self.looking: asyncio.Task[FileState] | None = None
        # Stops the observer when the loop was closed under the run (see
        # WatchService.loop_closed), where no _end() can run.
        self.closer: threading.Thread | None = None

    def threads(self) -> list[threading.Thread]:
        observer = self.observer
        if observer is None:
            return []
        return [t for t in [observer, *observer.emitters] if t.is_alive()]


class WatchService(LifecycleService):
    """Watch a folder with watchdog; deliver every file event to ``handler`` on the loop.

    ``handler(event)`` receives watchdog's ``FileSystemEvent`` (``event_type``,
    ``src_path``, ``dest_path``, ``is_directory``). A coroutine function is
    awaited as a task on the supervisor's loop, a plain function is called
    there, so handlers never need locks, and a plain one must be quick: it
    blocks the loop while it runs, once per event (one file write is several
    events). A handler that raises crashes the service (the supervisor's
    restart policy then applies), and so does the folder being deleted,
    renamed away or replaced. ``stop()`` stops the observer, then waits for
    the handler tasks still running.

    Args:
        path: the folder (or file) to watch; it must exist when the service starts.
            A file that is a symlink (a Kubernetes ConfigMap's) is followed: a
            change of the file it leads to is one ``modified`` event on
            ``path`` (``deleted``/``created`` when it stops or starts leading
            to a file), which ``patterns`` filter by ``path``, not by the
            file the link leads to.
        handler: called with each event, see above.
        recursive: watch sub-folders too.
        patterns: glob patterns such as ``["*.txt"]``; an event is delivered
            when its path (or, for a move, its destination) matches one,
            matched from the right like :meth:`pathlib.PurePath.match`.
            ``None`` delivers every event.
        name: the service's name (default ``"watch"``).

    Raises:
        TypeError: an argument has the wrong type.
        MissingExtraError: watchdog is not installed (the ``[watch]`` extra).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: EventHandler,
        *,
        recursive: bool = True,
        patterns: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"WatchService(path) must be a str or a path, got {describe(path)}.")
        if not callable(handler):
            raise TypeError(
                f"WatchService(handler) must be a function taking the event (plain or "
                f"'async def'), got {describe(handler)}."
            )
        if isinstance(patterns, str):
            raise TypeError(
                f"WatchService(patterns=...) must be a list of glob patterns, got the str "
                f"{patterns!r}; write patterns=[{patterns!r}]."
            )
        if patterns is not None and not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"WatchService(patterns=...) must be a list of str glob patterns, got {patterns!r}."
            )
        # Fail here, where the service is written, not when the supervisor starts it.
        require("watchdog.observers", "watch", feature="WatchService")
        super().__init__(check_name(name, "watch", "WatchService"))
        self.path = Path(path)
        self.handler = handler
        self.recursive = bool(recursive)
        self.patterns = None if patterns is None else tuple(patterns)
        self._run: _WatchRun | None = None
        # The run whose start() is under way, until it returns or raises.
        self._opening: _WatchRun | None = None

    def __repr__(self) -> str:
        patterns = f" patterns={list(self.patterns)}" if self.patterns else ""
        return f"<WatchService {self.name!r} {self._state.value} path={str(self.path)!r}{patterns}>"

    def matches(self, *paths: str | bytes | None) -> bool:
        """Whether an event on these paths passes the ``patterns`` filter."""
        if self.patterns is None:
            return True
        for raw in paths:
            if not raw:
                continue
            path = PurePath(os.fsdecode(raw))
            if any(path.match(pattern) for pattern in self.patterns):
                return True
        return False

    async def start(self) -> None:
        """Start a fresh observer on ``path``; return once it watches.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            MissingExtraError: watchdog is not installed.
            RuntimeError: the service is already running or still stopping.
        """
        done = self._begin()
        run = self._opening = _WatchRun(done)
        try:
            require("watchdog.observers", "watch", feature="WatchService")
            # Building the observer starts its inotify thread, and starting it adds a
            # watch per sub-folder (blocking on a big tree): both happen off the loop,
            # as does every look at the path (a stuck network mount blocks a stat).
            await service_pool().run(self._open, run, asyncio.get_running_loop())
        except GeneratorExit:
            # Garbage-collected while pending: the loop was closed under this
            # start, and nothing can be awaited any more. Stop the observer
            # the worker opens without waiting (loop_closed() has, if a
            # supervisor watched the loop's close()).
            self.loop_closed()
            raise
        except BaseException:
            self._start_failed()
            await service_pool().run(_close, run)  # whatever the worker opened (it may still run)
            raise
        finally:
            self._opening = None
        self._run = run
        self._ready()
        # The root's identity was taken just now: the first check comes a
        # period later. A followed link is looked at once (see _open).
        self._root_checked(run, None)

    def _check_root(self, run: _WatchRun) -> None:
        # A root renamed away or replaced may send no event at all any more.
        if run.done.done() or run.crashed or run.ending is not None:
            return
        if run.root is None:  # a file: nothing to stat, only the follow mode's look
            self._root_checked(run, None)
            return
        if run.checking is not None:
            return  # that check schedules the next one when it ends
        # Off the loop: a stat on a stuck network mount would block it until
        # the mount answers. A task, for _end() and kill() (see _look_again).
        task = asyncio.create_task(service_pool().run(_root_change, run))
        run.checking = task
        run.tasks.add(task)
        task.add_done_callback(lambda t: self._root_check_done(run, t))

    def _root_check_done(self, run: _WatchRun, task: asyncio.Task[str | None]) -> None:
        run.checking = None
        self._task_done(run, task)  # a check that raised crashes the service
        if not task.cancelled() and task.exception() is None:
            self._root_checked(run, task.result())

    def _root_checked(self, run: _WatchRun, how: str | None) -> None:
        """Act on a root check's finding, then time the next check from now."""
        if run.done.done() or run.crashed or run.ending is not None:
            return  # stopping, or crashed meanwhile: no next check
        if how is not None:
            self._lost_root(run, how)
            return
        if run.follow is not None:
            # Catches changes along a chain of links that no watched folder sees.
            self._look_again(run)
        if run.check is not None:
            run.check.cancel()  # a check made out of turn: keep a single timer
        run.check = asyncio.get_running_loop().call_later(
            ROOT_CHECK_INTERVAL, self._check_root, run
        )

    def _open(self, run: _WatchRun, loop: asyncio.AbstractEventLoop) -> None:
        """Build and start the run's observer (in a worker thread); undo it if start() gave up."""
        with run.lock:
            if run.closed:  # closed before this worker began (see loop_closed): open nothing
                return
            if not self.path.exists():
                raise FileNotFoundError(
                    f"{self!r} cannot watch {str(self.path)!r}: it does not exist. Create it "
                    f"before the service starts."
                )
            # Absolute: the program may change directory. Folders only: an
            # editor saving a watched file replaces it (a new inode) every time.
            run.path = Path(os.path.abspath(self.path))
            run.root = _identity(run.path) if run.path.is_dir() else None
            if run.path.is_symlink() and not run.path.is_dir():
                run.follow = Followed(run.path)
                run.follow.owner = self.name
                if not self.matches(str(self.path)):
                    # Its only events are on the path: say so now, not never.
                    logger.warning(
                        "WatchService %r follows the symlink %r, but none of its patterns %s "
                        "matches that path, so it will deliver no event: patterns are matched "
                        "against the path it was given, not the file the link leads to. Add a "
                        "pattern that matches %r, or pass patterns=None.",
                        self.name,
                        str(self.path),
                        list(self.patterns or ()),
                        self.path.name,
                    )
            run.observer = self._observer(run, loop)
            run.observer.start()
            if run.follow is not None:
                # Not scheduled with the observer: a ConfigMap update may have
                # deleted the target's folder since the link was read, and
                # its emitter would fail the observer's start. Here a folder
                # gone is left unwatched; the first look (start() makes one
                # at once) moves the watch and reports the change.
                move_target_watch_locked(run, run.follow, target_dir(run.follow.path))
            if current_token():  # the awaiting start() was cancelled: nobody else will stop it
                _close_locked(run)

    def _observer(self, run: _WatchRun, loop: asyncio.AbstractEventLoop) -> Any:
        events = require("watchdog.events", "watch", feature="WatchService")
        version = require("watchdog.version", "watch", feature="WatchService")
        service = self
        watched, only = str(self.path), None
        follow = run.follow
        if follow is not None:
            return self._follow_observer(run, loop, follow)
        if version.VERSION_MAJOR < 7 and run.path is not None and not run.path.is_dir():
            # watchdog < 7 (the newest for Python 3.10) watches a file's inode:
            # an editor's save, a new file renamed over it, ends the watch with
            # a "deleted" event. Watch its folder and keep the file's events.
            watched, only = str(self.path.parent), self.path
        elif run.path is not None and run.path.is_symlink() and run.path.is_dir():
            # watchdog watches a symlink itself (IN_DONT_FOLLOW on inotify), which
            # sends no event for the folder's files; a trailing separator makes
            # the kernel resolve it, and events keep the path the user gave.
            watched = os.path.join(watched, "")

        class Forward(events.FileSystemEventHandler):  # type: ignore[misc,name-defined]  # lazy
            def dispatch(self, event: Any) -> None:
                # Runs in the observer thread: filter here, handle on the loop.
                if only is not None and not any(
                    path and _same_path(path, only)
                    for path in (event.src_path, getattr(event, "dest_path", None))
                ):
                    return
                if event.event_type in ("deleted", "moved") and _same_path(
                    event.src_path, service.path
                ):
                    how = event.event_type
                else:
                    how = _root_change(run)
                if how is not None:
                    # watchdog stops watching a root that is gone: crash, so the
                    # restart policy applies and the status stops saying "running".
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(service._lost_root, run, how)
                    return
                if service.matches(event.src_path, getattr(event, "dest_path", None)):
                    # RuntimeError: the loop is closed, nobody to deliver to.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(service._deliver, run, event)

        return self._new_observer(Forward(), watched, recursive=self.recursive and only is None)

    def _new_observer(self, handler: Any, folder: str, *, recursive: bool) -> Any:
        """A watchdog observer named after the service, watching ``folder`` for ``handler``."""
        observers = require("watchdog.observers", "watch", feature="WatchService")
        observer = observers.Observer()
        observer.name = f"offloop-watch-{self.name}"
        observer.schedule(handler, folder, recursive=recursive)
        name_emitters(observer)
        return observer

    def _follow_observer(
        self, run: _WatchRun, loop: asyncio.AbstractEventLoop, follow: Followed
    ) -> Any:
        """An observer for a symlinked file: its events only make the loop look again."""
        events = require("watchdog.events", "watch", feature="WatchService")
        service = self

        class Nudge(events.FileSystemEventHandler):  # type: ignore[misc,name-defined]  # lazy
            def dispatch(self, event: Any) -> None:
                # Runs in the observer thread. A racing flag costs at most one
                # look too many, never one too few: the look clears it first.
                if not follow.pending:
                    follow.pending = True
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        loop.call_soon_threadsafe(service._look_again, run)

        follow.handler = Nudge()
        # Folders, not the file: watchdog would watch the link, or the file it
        # leads to now. A trailing separator makes the kernel resolve a
        # symlinked folder rather than watch the link (see _observer).
        return self._new_observer(
            follow.handler, os.path.join(follow.link_dir, ""), recursive=False
        )

    # -- on the loop ---------------------------------------------------------------------

    def _look_again(self, run: _WatchRun) -> None:
        """Look at what a followed symlink leads to now, in a worker; see :meth:`_looked`."""
        follow = run.follow
        if follow is None or run.done.done() or run.crashed or run.ending is not None:
            return
        follow.pending = False
        if follow.looking:
            # That look may have made its stat before this change: one more after it.
            follow.again = True
            return
        follow.looking = True
        # Off the loop: a stat on a stuck network mount would block it. A task,
        # not the pool's future: _end() waits for run.tasks with asyncio.wait(),
        # which refuses the coroutine-like OffloadFuture.
        task = asyncio.create_task(service_pool().run(look, run))
        run.looking = task
        run.tasks.add(task)
        task.add_done_callback(lambda t: self._looked(run, follow, t))

    def _looked(self, run: _WatchRun, follow: Followed, task: asyncio.Future[FileState]) -> None:
        """Report a change of the file a watched symlink leads to, as an event on the link."""
        follow.looking = False
        run.looking = None
        self._task_done(run, task)  # a look that raised crashes the service
        if task.cancelled() or task.exception() is not None:
            return
        before, now = follow.state, task.result()
        follow.state = now
        if now != before and self.matches(str(self.path)):
            events = require("watchdog.events", "watch", feature="WatchService")
            if before is None:
                event = events.FileCreatedEvent(str(self.path))
            elif now is None:
                event = events.FileDeletedEvent(str(self.path))
            else:
                event = events.FileModifiedEvent(str(self.path))
            self._deliver(run, event)
        if follow.again:
            follow.again = False
            self._look_again(run)

    def _deliver(self, run: _WatchRun, event: Any) -> None:
        if run.done.done() or run.crashed:
            return  # the run has ended, or is ending after a crash: drop the event
        try:
            result = self.handler(event)
        except Exception as exc:
            self._crash(run, exc)
            return
        except (SystemExit, KeyboardInterrupt) as exc:
            # Raised out of this callback, either would end the loop at once.
            self._crash(run, self._escaped(exc))
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._guarded(result))
            run.tasks.add(task)
            task.add_done_callback(lambda t: self._task_done(run, t))

    async def _guarded(self, awaitable: Awaitable[object]) -> object:
        try:
            return await awaitable
        # A task lets these two escape through the event loop, which ends the
        # whole supervisor at once, with no grace for the other services.
        except (SystemExit, KeyboardInterrupt) as exc:
            raise self._escaped(exc) from exc

    def _escaped(self, exc: BaseException) -> Exception:
        """The crash for a handler's SystemExit or KeyboardInterrupt (as in a TaskService)."""
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl-C on Python 3.10 lands in whatever code runs: stop everything
            # gracefully, as the supervisor's own Ctrl-C handling does.
            crash: Exception = ServiceInterrupted(
                f"The handler of {self!r} raised KeyboardInterrupt, so its supervisor stops "
                f"every service, as on Ctrl-C."
            )
        else:
            crash = OffloopError(
                f"The handler of {self!r} raised {exc!r}, which would have ended the whole "
                f"event loop at once; it counts as a crash of this service."
            )
        crash.__cause__ = exc
        return crash

    def _lost_root(self, run: _WatchRun, how: str) -> None:
        self._crash(
            run,
            FileNotFoundError(
                f"{self!r} stopped watching: the folder {str(self.path)!r} was {how}. "
                f"Recreate it; the restart policy restarts the service."
            ),
        )

    def _task_done(self, run: _WatchRun, task: asyncio.Future[Any]) -> None:
        run.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and isinstance(exc, Exception):
            self._crash(run, exc)

    def _crash(self, run: _WatchRun, exc: Exception) -> None:
        if not run.crashed and not run.done.done():
            run.crashed = True
            if run.ending is not None:  # stopping already: the stop ends with this error
                run.error = exc
                return
            run.ending = asyncio.get_running_loop().create_task(
                self._end(run, exc), name=f"offloop-watch-{self.name}-crash"
            )

    async def _end(self, run: _WatchRun, exc: Exception | None) -> None:
        """Stop the observer, settle the handler tasks, end the run (with ``exc`` if it crashed)."""
        if run.check is not None:
            run.check.cancel()
        for looking in (run.checking, run.looking):
            if looking is not None:
                # Its finding no longer matters, and a stat stuck on a network
                # mount would hold the stop until the supervisor's grace ran
                # out. The worker returns to the pool whenever the stat does;
                # a look that then moves the target's watch finds the run
                # closed and leaves the observer alone.
                looking.cancel()
        try:
            await service_pool().run(_close, run)
            if exc is not None:  # a crash: the other handlers are not waited for
                for task in run.tasks:
                    task.cancel()
            while run.tasks:
                await asyncio.wait(set(run.tasks))
        finally:
            self._finish(run.done, exc if exc is not None else run.error)

    async def stop(self) -> None:
        """Stop and join the observer, then wait for the handler tasks still running."""
        await self._start_settled()
        done = self._mark_stopping()
        run = self._run
        if done is None or run is None:
            return
        if run.ending is None:
            run.ending = asyncio.get_running_loop().create_task(
                self._end(run, None), name=f"offloop-watch-{self.name}-stop"
            )
        await asyncio.wait({run.ending})

    def loop_closed(self) -> None:
        # No stop() can run on the closed loop: the observer would watch on,
        # handing events to a loop that is gone, until the program exits.
        # Stopped in a thread of its own, as _end() does in a worker: the stop
        # joins the observer's threads, and first waits for a look or a start
        # that holds run.lock. The supervisor joins it within its grace (see
        # live_threads) and names it if it is still running then.
        for run in (self._opening, self._run):
            if run is None or run.closer is not None:
                continue
            run.closer = threading.Thread(
                target=_close, args=(run,), name=f"offloop-watch-{self.name}-close", daemon=True
            )
            run.closer.start()

    def live_threads(self) -> list[threading.Thread]:
        threads = []
        for run in (self._opening, self._run):
            if run is not None:
                if run.closer is not None and run.closer.is_alive():
                    threads.append(run.closer)
                threads.extend(run.threads())
        return threads

    def kill(self) -> list[str]:
        """Cancel the handler tasks; report the observer threads that have not stopped yet."""
        run = self._run
        if run is None:
            return []
        for task in list(run.tasks):
            task.cancel()
        if run.check is not None:
            run.check.cancel()
        abandoned = [describe_thread(t) for t in run.threads()]
        self._finish(run.done)
        return abandoned


def _close(run: _WatchRun) -> None:
    """Stop the run's observer and join its threads (blocking: run off the loop)."""
    with run.lock:  # waits for an _open() still in progress
        _close_locked(run)


def _close_locked(run: _WatchRun) -> None:
    observer = run.observer
    if run.closed:
        return
    run.closed = True  # also for an _open() yet to begin, which then opens nothing
    if observer is None:
        return
    observer.stop()  # also stops and joins the emitters and the inotify thread
    if observer.ident is not None:  # it was started
        observer.join()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _root_change(run: _WatchRun) -> str | None:
    # How the watched folder changed since the start, if it did.
    if run.root is None or run.path is None:  # a file, or not started yet
        return None
    now = _identity(run.path)
    if now == run.root:
        return None
    return "deleted or moved away" if now is None else "replaced by another folder"


def _same_path(reported: str | bytes, watched: Path) -> bool:
    path = os.fsdecode(reported)
    return os.path.normpath(path) == os.path.normpath(str(watched))

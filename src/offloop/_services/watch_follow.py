"""``WatchService``'s follow mode: a watched file that is a symlink (a Kubernetes ConfigMap's).

watchdog watches the link itself, or the file it led to when the watch
began; neither sees a ConfigMap update, which swaps a symlink (``..data``)
further along the chain and deletes the old file's folder. So the link's
folder and the current target's folder are watched, any event there (and
the periodic root check) looks again, and a change of what the path leads to
is reported as one event on the path itself (see ``WatchService._looked``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any, Protocol

from .lifecycle import logger

__all__ = ["FileState", "Followed", "look", "move_target_watch", "name_emitters", "target_dir"]

#: What a followed path leads to: (device, inode, size, mtime_ns), or None for no file.
FileState = tuple[int, int, int, int] | None


class FollowedRun(Protocol):
    """What the target watch's move needs of a WatchService's run."""

    # Held while the observer is built and started, or stopped.
    lock: threading.Lock
    closed: bool
    observer: Any
    follow: Followed | None


class Followed:
    """A watched file that is a symlink, and what it led to when last looked at."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = file_state(path)
        self.link_dir = str(path.parent)
        # The folder whose watch is in place: set by move_target_watch_locked,
        # first once the observer runs (the folder may be gone by then).
        self.target_dir: str | None = None
        # The watch on target_dir, when that is not link_dir.
        self.target_watch: Any = None
        # A look is scheduled on the loop: events in between need no other.
        self.pending = False
        # A worker looks (see look()): one at a time, so their results come in order.
        self.looking = False
        # Something changed during that look, maybe after its stat: look once more after it.
        self.again = False
        # The observer's handler, built with the observer (watchdog is imported lazily).
        self.handler: Any = None
        # The service's name, for the log: set by its start.
        self.owner = ""
        # The target's folder that could not be watched, until one is: the
        # warning is logged once per streak of failures, not once a second.
        self.unwatched: str | None = None


def file_state(path: Path) -> FileState:
    """What the file at ``path`` (links followed) is now; None if it leads to no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def target_dir(path: Path) -> str | None:
    """The folder of the file ``path`` leads to now, if it leads to one."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    return folder if os.path.isdir(folder) else None


def look(run: FollowedRun) -> FileState:
    """What the followed link leads to now, its target's folder watched (in a worker).

    Off the loop: on a stuck network mount a stat blocks until the mount
    answers. The watch moves before the stat, so a change the stat misses
    is one the new watch reports.
    """
    follow = run.follow
    assert follow is not None
    # Resolved before the move takes run.lock: the stop takes it to stop the
    # observer, and must not wait for a mount that does not answer.
    folder = target_dir(follow.path)
    if folder != follow.target_dir:
        move_target_watch(run, folder)
    return file_state(follow.path)


def move_target_watch(run: FollowedRun, folder: str | None) -> None:
    """Watch ``folder``, that of the file the followed link leads to, instead of the old one.

    Off the loop. ``folder`` may be out of date by the time the lock is
    taken: the link's folder is always watched, so a change made since is an
    event there, and another look follows.
    """
    follow = run.follow
    assert follow is not None
    with run.lock:  # not while start() or stop() is on the observer
        move_target_watch_locked(run, follow, folder)


def move_target_watch_locked(run: FollowedRun, follow: Followed, folder: str | None) -> None:
    observer = run.observer
    if run.closed or observer is None:
        return
    if folder == follow.target_dir:
        return
    if follow.target_watch is not None:
        # The old folder may be gone (a ConfigMap's previous version)
        # and its emitter stopped with it: unschedule still joins it.
        with contextlib.suppress(KeyError):  # forgotten already
            observer.unschedule(follow.target_watch)
        follow.target_watch = None
    if folder is not None and folder != follow.link_dir:
        try:
            follow.target_watch = observer.schedule(
                follow.handler, os.path.join(folder, ""), recursive=False
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                _unwatchable(follow, folder, exc)
            folder = None  # the next look (once a second at least) tries again
        name_emitters(observer)
    if folder is not None and follow.unwatched is not None:
        logger.info(
            "WatchService %r now watches %r, the folder of the file its followed link %r "
            "leads to, which it could not watch before.",
            follow.owner,
            folder,
            str(follow.path),
        )
        follow.unwatched = None
    # Set once the watch is in place; the stat that follows the move (see
    # look()) catches a change made before it was.
    follow.target_dir = folder


def _unwatchable(follow: Followed, folder: str, exc: OSError) -> None:
    # Not a folder gone meanwhile (a ConfigMap's next update): one that is
    # there and cannot be watched, and will not be until someone acts.
    if follow.unwatched is not None:
        return  # warned already: the retries, once a second, stay quiet
    follow.unwatched = folder
    if exc.errno == errno.ENOSPC:
        fix = "raise the limit of inotify watches (sysctl fs.inotify.max_user_watches)"
    elif exc.errno == errno.EMFILE:
        fix = "raise the limit of inotify instances (sysctl fs.inotify.max_user_instances)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "let the program's user read that folder"
    else:
        fix = "check that folder"
    logger.warning(
        "WatchService %r cannot watch %r, the folder of the file its followed link %r leads "
        "to: %s. Until it can, a change made to that file in place is only seen by the check "
        "once a second, which also tries the watch again; to fix it, %s.",
        follow.owner,
        folder,
        str(follow.path),
        exc,
        fix,
    )


def name_emitters(observer: Any) -> None:
    # Named after the observer ("offloop-watch-<service>"), so a leak check
    # and a stack dump tell whose threads they are.
    for n, emitter in enumerate(observer.emitters, 1):
        emitter.name = f"{observer.name}-emitter-{n}"

"""``offloop run --reload``: run the program in a child process, restart it when its code changes.

As uvicorn's reloader does, the process the user started never imports the
program: it watches the source files (with ``watchfiles``, the ``[reload]``
extra) and runs ``offloop run`` without ``--reload`` in a child. When a
Python file changes, the child is stopped as on Ctrl-C (SIGTERM, so every
service gets the supervisor's bounded stop) and a new one starts. A child
that cannot start (a syntax error, an import that fails) or that crashes
shows its error on the same terminal, and the reloader keeps watching for
the change that fixes it.

The child runs in a process group of its own: a Ctrl-C in the terminal goes
to the reloader only, which then stops the child once. Were both to get it,
the reloader's SIGTERM would be the child's second signal, which means "exit
now" to ``offloop run``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

__all__ = ["PARENT_ENV", "STOP_WAIT", "child_argv", "run_reloader", "stop_with_parent"]

logger: Final = logging.getLogger("offloop.reload")

#: Seconds a child gets to stop after SIGTERM before it is killed: the
#: supervisor's own bound (its grace plus the forced exit's margin) ends it
#: sooner, so this only catches a child that ignores the signal.
STOP_WAIT: Final = 30.0

#: How often, in milliseconds, the watcher wakes without a change to see
#: whether the child has exited or a signal came.
TICK_MS: Final = 250

#: The quiet time, in milliseconds, that ends a burst of changes (an editor
#: saving, a ``git checkout``): one restart for the burst.
SETTLE_MS: Final = 100


#: The environment variable that tells a child the reloader's pid.
PARENT_ENV: Final = "OFFLOOP_RELOADER_PID"

#: Seconds between two looks of a child at whether its reloader still lives.
PARENT_CHECK: Final = 0.5


def stop_with_parent() -> None:
    """In a child of the reloader: stop gracefully (SIGTERM to itself) once the reloader is gone.

    The child has a process group of its own, so nothing else would end it
    when the reloader is killed outright (SIGKILL, a crash).
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(PARENT_CHECK)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="offloop-reload-parent", daemon=True).start()


def _is_reload_dir(option: str) -> bool:
    # argparse takes any unique prefix of an option: "--reload-" and longer
    # prefixes of "--reload-dir" (shorter ones also prefix "--reload").
    return len(option) > len("--reload") and "--reload-dir".startswith(option)


def child_argv(argv: Sequence[str]) -> list[str]:
    """The ``offloop run`` arguments without the reloader's own options, however spelled."""
    out: list[str] = []
    skip = False
    for arg in argv:
        option, has_value, _ = arg.partition("=")
        if skip:
            skip = False
        elif arg == "--reload":
            pass
        elif _is_reload_dir(option):
            skip = not has_value
        else:
            out.append(arg)
    return out


class _Child:
    """One run of the program: ``python -m offloop run ...`` in its own process group."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "offloop", *argv],
            env={**os.environ, PARENT_ENV: str(os.getpid())},
            # os.setpgrp, not process_group=0: that keyword is Python >= 3.11.
            preexec_fn=getattr(os, "setpgrp", None),
        )
        self.reported = False
        logger.info("started the program (pid %d)", self.popen.pid)

    def exited(self) -> int | None:
        return self.popen.poll()

    def stop(self, wait: float) -> None:
        """SIGTERM, as the supervisor's graceful stop; SIGKILL if it outlasts ``wait``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                logger.error(
                    "the program (pid %d) did not stop %gs after SIGTERM; killed it",
                    self.popen.pid,
                    wait,
                )
                self.popen.kill()
                self.popen.wait()


def run_reloader(argv: Sequence[str], dirs: Sequence[Path], *, stop_wait: float = STOP_WAIT) -> int:
    """Run ``offloop run *argv`` in a child; restart it when a ``.py`` file in ``dirs`` changes.

    Returns once a SIGINT or SIGTERM stopped the reloader (and its child): 0,
    or ``128 + signal number`` after a second signal.
    """
    from .._core.extras import require

    watchfiles: Any = require("watchfiles", "reload", feature="offloop run --reload")
    stop = threading.Event()
    signals: list[int] = []
    current: list[_Child] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
        if len(signals) > 1:  # out of patience: the child goes down with us
            for running in current:
                if running.popen.poll() is None:
                    running.popen.kill()
            os._exit(128 + signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    watched = ", ".join(str(d) for d in dirs)
    logger.info("watching %s for changes of Python files", watched)
    child = _Child(list(argv))
    current.append(child)
    try:
        for changes in watchfiles.watch(
            *dirs,
            watch_filter=watchfiles.PythonFilter(),
            stop_event=stop,
            step=SETTLE_MS,
            rust_timeout=TICK_MS,
            yield_on_timeout=True,
            raise_interrupt=False,
        ):
            if stop.is_set():
                break
            code = child.exited()
            if code is not None and not child.reported:
                child.reported = True
                if code == 0:  # every service ended, or it was stopped: not an error
                    logger.info(
                        "the program ended with exit code 0; the reloader restarts it on the "
                        "next change"
                    )
                else:
                    logger.error(
                        "the program exited with code %d; fix the error and save: the "
                        "reloader restarts it on the next change",
                        code,
                    )
            if not changes:
                continue
            names = sorted({os.path.relpath(path) for _, path in changes})
            logger.warning("changed: %s; restarting the program", ", ".join(names))
            began = time.monotonic()
            child.stop(stop_wait)
            logger.info("stopped the program in %.2fs", time.monotonic() - began)
            child = current[0] = _Child(list(argv))
    finally:
        child.stop(stop_wait)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped watching")
    return 0

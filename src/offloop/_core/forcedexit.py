"""Last-moment cleanups for a process that ends with ``os._exit``.

A forced exit (a second Ctrl-C, or the supervisor's stop watchdog) skips every
``atexit`` handler and ``finally`` block. What must still happen then, such as
killing the children of ``isolate="process"`` services so they do not run on
as orphans, registers here; the forced exit runs it. A module registers when it
is imported, so nothing is imported (or paid for) by programs that never use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

__all__ = ["on_forced_exit", "run_forced_exit_hooks"]

_hooks: Final[list[Callable[[], None]]] = []


def on_forced_exit(hook: Callable[[], None]) -> None:
    """Run ``hook()`` if the process is forced to exit; it must take no lock."""
    if hook not in _hooks:
        _hooks.append(hook)


def run_forced_exit_hooks() -> None:
    """Run every registered hook, ignoring their errors (the process is ending)."""
    for hook in list(_hooks):
        with contextlib.suppress(Exception):
            hook()

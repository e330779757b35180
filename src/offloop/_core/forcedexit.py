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

__all__ = ["ForcedExitHook", "on_forced_exit", "run_forced_exit_hooks"]

#: A hook gets the code the forced exit is to end the process with, and may
#: return another one (``offloop check`` exits 3 when it found blocks).
ForcedExitHook = Callable[[int], int | None]

_hooks: Final[list[ForcedExitHook]] = []


def on_forced_exit(hook: ForcedExitHook) -> None:
    """Run ``hook(code)`` if the process is forced to exit; it must take no lock."""
    if hook not in _hooks:
        _hooks.append(hook)


def run_forced_exit_hooks(code: int) -> int:
    """Run every registered hook, ignoring their errors; return the code to exit with.

    ``code`` is the one the forced exit chose (``128 + signal``); a hook that
    returns a code replaces it for the hooks after it and for the exit.
    """
    for hook in list(_hooks):
        with contextlib.suppress(Exception):
            replaced = hook(code)
            if replaced is not None:
                code = replaced
    return code

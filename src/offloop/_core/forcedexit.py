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

__all__ = [
    "forced_exit_code",
    "on_forced_exit",
    "replace_forced_exit_code",
    "run_forced_exit_hooks",
]

_hooks: Final[list[Callable[[], None]]] = []
# The code the forced exit under way ends the process with; empty outside of one.
_code: Final[list[int]] = []


def on_forced_exit(hook: Callable[[], None]) -> None:
    """Run ``hook()`` if the process is forced to exit; it must take no lock."""
    if hook not in _hooks:
        _hooks.append(hook)


def forced_exit_code() -> int | None:
    """The exit code of the forced exit under way (for a hook), or None outside of one."""
    return _code[-1] if _code else None


def replace_forced_exit_code(code: int) -> None:
    """Make the forced exit under way end the process with ``code`` (from a hook).

    ``offloop check`` exits with its own code when it found blocks, as it does
    after a script that ended by itself.
    """
    if _code:
        _code[-1] = code


def run_forced_exit_hooks(code: int) -> int:
    """Run every registered hook, ignoring their errors; return the code to exit with.

    ``code`` is the one the forced exit chose (``128 + signal``); a hook may
    replace it with :func:`replace_forced_exit_code`.
    """
    _code.append(code)
    for hook in list(_hooks):
        with contextlib.suppress(Exception):
            hook()
    return _code[-1]

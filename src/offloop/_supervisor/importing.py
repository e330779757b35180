"""A supervisor that starts while ``offloop run app:sv`` imports ``app`` is refused.

A module written as a script calls ``sv.run()`` at its top level. Imported by
the command, that call would run the whole program inside the import, without
the command's live table, status port or reload, and the command would then
find a supervisor that has already run. While :func:`importing_target` is
active, starting any supervisor raises :class:`StartedOnImport` at once, which
the command turns into its usage error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Final

from .._core.errors import OffloopError

__all__ = ["StartedOnImport", "check_not_importing", "guard_advice", "importing_target"]

# The targets being imported (a stack: nothing stops an import from running
# the command's loader again).
_targets: Final[list[str]] = []


class StartedOnImport(OffloopError, RuntimeError):
    """A supervisor was started while ``offloop run`` imported the module that holds it."""


@contextlib.contextmanager
def importing_target(target: str) -> Iterator[None]:
    """While active, a supervisor that starts raises :class:`StartedOnImport`."""
    _targets.append(target)
    try:
        yield
    finally:
        _targets.pop()


def check_not_importing(what: str) -> None:
    """Raise :class:`StartedOnImport` if ``what`` (a supervisor's start) runs inside the import.

    Raises:
        StartedOnImport: ``offloop run`` is importing its target module.
    """
    if _targets:
        target = _targets[-1]
        raise StartedOnImport(
            f"{what} was called while 'offloop run {target}' imported the module "
            f"{target.partition(':')[0]!r} to find its supervisor: the module starts it when "
            f"it is imported (sv.run() or asyncio.run(...) at its top level). "
            f"{guard_advice(target)}"
        )


def guard_advice(target: str) -> str:
    """What to do about a module ``offloop run target`` found starting its supervisor."""
    module = target.partition(":")[0]
    return (
        f"Put that call under 'if __name__ == \"__main__\":' so that "
        f"'python {module.replace('.', os.sep)}.py' still runs it and 'offloop run {target}' can."
    )

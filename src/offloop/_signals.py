"""The blocking entry point: own an event loop, turn SIGINT/SIGTERM into a graceful stop.

The first signal asks the supervisor to stop (bounded by its ``grace``); a
second one means the user has run out of patience, so the process exits at
once with ``128 + signal number`` (the shell's convention for "killed by").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["run_with_signals"]

logger: Final = logging.getLogger("offloop.supervisor")

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

#: How long leftover tasks (ones that ignore cancellation) get when the loop closes.
LEFTOVER_WAIT: Final = 1.0


def run_with_signals(sv: Supervisor, main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main()`` on a new loop with SIGINT/SIGTERM stopping ``sv``; return 0.

    Raises:
        RuntimeError: called from a thread whose event loop is running.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            f"{sv!r}.run() was called from a running event loop; it would need to block "
            f"that loop. Use 'await sv.serve()' in async code instead."
        )
    loop = asyncio.new_event_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.warning(
                "%s: received %s, stopping gracefully within %gs (send it again to exit at once)",
                sv.name,
                name,
                sv.grace,
            )
            sv._request_stop_threadsafe(f"received {name}")
            return
        logger.error("%s: received %s again, exiting now", sv.name, name)
        _flush()
        os._exit(128 + signum)

    installed: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            try:
                loop.add_signal_handler(sig, on_signal, sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                signal.signal(sig, lambda s, _f: loop.call_soon_threadsafe(on_signal, s))
            installed.append(sig)
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        return 0
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            for sig in installed:
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                    signal.signal(sig, signal.SIG_DFL)
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    # Bounded, unlike asyncio.run(): a task that swallows cancellation must not
    # keep the process alive after the supervisor said it stopped.
    done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_WAIT))
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "task %s raised while stopping", task.get_name(), exc_info=task.exception()
            )
    for task in pending:
        logger.warning("abandoned task %s, which ignores cancellation", task.get_name())


def _flush() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("offloop").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()

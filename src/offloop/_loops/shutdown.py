"""Shut an event loop down the way ``asyncio.run`` does, with each caller's differences.

Used by a LoopThread's thread when its loop stops and by ``Supervisor.run()``
when its main coroutine returns. The loop itself is closed by the caller,
which has more to undo first (its thread's event loop, signal handlers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

__all__ = ["shut_down"]

TaskReport = Callable[["asyncio.Task[Any]"], None]


def shut_down(
    loop: asyncio.AbstractEventLoop,
    *,
    sweeps: int,
    on_raised: TaskReport,
    wait: float | None = None,
    on_ignored: TaskReport | None = None,
    executor: concurrent.futures.ThreadPoolExecutor | None = None,
) -> None:
    """Cancel ``loop``'s tasks and let them clean up, then shut down its async generators.

    Runs the (stopped, not closed) loop until that is done.

    Args:
        sweeps: how many times the tasks are cancelled again while the cleanup
            of cancelled ones starts new tasks.
        on_raised: told of each cancelled task that ended with an exception
            other than its cancellation.
        wait: how long the cancelled tasks of one sweep get to end; ``None``
            waits as long as they take, as ``asyncio.run`` does.
        on_ignored: told of each task still running after ``wait`` (one that
            ignores its cancellation); it is left behind.
        executor: the loop's default executor, to be waited for after the
            async generators (``loop.shutdown_default_executor()``), followed
            by one more round of sweeps for the tasks started meanwhile.
            ``None`` leaves it to ``loop.close()``, which does not wait.
    """
    _cancel_tasks(loop, sweeps, wait, on_raised, on_ignored)
    loop.run_until_complete(loop.shutdown_asyncgens())
    if executor is None:
        return
    try:
        loop.run_until_complete(loop.shutdown_default_executor())
    except RuntimeError:
        # It waits in a new thread, and Python 3.12.0 and 3.12.1 start none
        # in atexit handlers, where the shared loop threads close: wait here.
        executor.shutdown(wait=True)
    # Tasks started meanwhile (by run_coroutine_threadsafe on the loop, or by
    # the cleanup itself) would otherwise be closed with the loop, never
    # cancelled, their callers waiting forever.
    _cancel_tasks(loop, sweeps, wait, on_raised, on_ignored)


def _cancel_tasks(
    loop: asyncio.AbstractEventLoop,
    sweeps: int,
    wait: float | None,
    on_raised: TaskReport,
    on_ignored: TaskReport | None,
) -> None:
    for _ in range(sweeps):
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=wait))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                on_raised(task)
        if on_ignored is not None:
            for task in pending:
                on_ignored(task)

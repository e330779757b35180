"""The body of a LoopThread's thread, its shutdown, and its finalizer.

:func:`serve` runs the loop until it stops, then shuts it down the way
``asyncio.run`` does; it holds its LoopThread only weakly (see ``loopthread.py``).
:func:`dropped` is the finalizer of a LoopThread collected unclosed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import warnings
import weakref
from typing import Any, Final, Protocol

from .shutdown import shut_down

__all__ = ["LoopOwner", "Serving", "dropped", "serve", "stop_serving"]


class Serving:
    """Whether a loop thread's loop still runs ``run_forever()``, not yet its shutdown.

    Set and read only on the loop thread, so a plain attribute is enough.
    """

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


class LoopOwner(Protocol):
    """What :func:`serve` tells the LoopThread it serves (if it is still alive)."""

    def _loop_stopped(self, exited: bool) -> None: ...

    def _loop_closed(self) -> None: ...


def serve(
    ref: weakref.ref[LoopOwner],
    loop: asyncio.AbstractEventLoop,
    executor: concurrent.futures.ThreadPoolExecutor,
    serving: Serving,
) -> None:
    # The loop thread. It holds its LoopThread only for a moment, after the
    # loop stopped: a frame local here would keep a dropped one alive.
    asyncio.set_event_loop(loop)
    try:
        exited = False
        try:
            loop.run_forever()
        except (SystemExit, KeyboardInterrupt):
            exited = True  # delivered to the call whose coroutine raised it
        finally:
            # A late stop from the finalizer must not cut the shutdown short.
            serving.on = False
            lt = ref()
            if lt is not None:  # else it was dropped: nobody is left to tell
                lt._loop_stopped(exited)
            del lt
            # What asyncio.run does after the main coroutine, waiting for every
            # task as it does: a LoopThread's callers wait for their outcomes.
            shut_down(loop, sweeps=_CANCEL_SWEEPS, on_raised=_report_raised, executor=executor)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        lt = ref()
        if lt is not None:
            lt._loop_closed()


def dropped(
    loop: asyncio.AbstractEventLoop, serving: Serving, name: str, thread_name: str, pid: int
) -> None:
    """The finalizer of a started LoopThread collected unclosed: stop its loop, warn."""
    # Takes no lock and waits for nothing: it runs on any thread, maybe the
    # loop thread itself or one holding the LoopThread's lock.
    if os.getpid() != pid:
        return  # a forked child's copy: the loop thread is the parent's
    try:
        loop.call_soon_threadsafe(stop_serving, loop, serving)
    except RuntimeError:  # the loop is closed: its thread has ended
        return
    warnings.warn(
        f"LoopThread {name!r} was garbage collected without being closed; its thread "
        f"{thread_name} and its event loop are being stopped now (tasks still there are "
        f"cancelled). Close a loop thread when done with it: 'with LoopThread(...) as lt:' "
        f"or 'async with', or call 'lt.close()' ('await lt.aclose()' in async code).",
        ResourceWarning,
        # Past weakref.finalize: where the last reference went (the user's line, the
        # event loop ending the step that held the last call, or gc.collect()).
        stacklevel=3,
    )


def stop_serving(loop: asyncio.AbstractEventLoop, serving: Serving) -> None:
    """On the loop thread: stop ``run_forever()``, not the shutdown's ``run_until_complete()``.

    A stop asked for from another thread may arrive after the loop stopped for
    a reason of its own (a coroutine's SystemExit): a plain ``loop.stop()``
    would then end the shutdown's first run early, its tasks never cancelled
    and their callers never answered.
    """
    if serving.on:
        loop.stop()


#: How many times the close cancels the loop's tasks again while cancelling
#: them starts new ones (a task's cleanup that creates tasks).
_CANCEL_SWEEPS: Final = 5


def _report_raised(task: asyncio.Task[Any]) -> None:
    task.get_loop().call_exception_handler(
        {
            "message": "unhandled exception in a task cancelled by LoopThread.close()",
            "exception": task.exception(),
            "task": task,
        }
    )

"""Async crossings: run a coroutine on a loop thread's loop and await its outcome on the caller's.

``LoopThread.run`` and ``to_loop`` (an async caller): the coroutine is created
on the target loop, inside a copy of the caller's context, and its outcome
comes back through one ``call_soon_threadsafe`` on the caller's own loop. The
sync crossings, and the task start both kinds share, are in ``crossing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .._core.offload import mark_retrieved
from .crossing import CallHost, _coroutine, _create_task, _step_now

__all__ = ["Remote", "start_async"]


class Remote:
    """One async crossing: the caller's future and the task running on the other loop."""

    __slots__ = ("caller", "finished", "future", "host", "loop", "started", "task")

    def __init__(
        self,
        caller: asyncio.AbstractEventLoop,
        loop: asyncio.AbstractEventLoop,
        host: CallHost,
    ) -> None:
        self.caller = caller
        self.loop = loop
        self.future: asyncio.Future[Any] = caller.create_future()
        self.host = host
        self.finished = False
        self.started = False
        self.task: asyncio.Task[None] | None = None

    def cancel_remote(self) -> None:
        # On the target loop, after the awaiter was cancelled.
        task = self.task
        if task is not None:
            task.cancel()
        else:
            self.finished = True  # not started yet: start_async will skip it

    async def receive(self) -> Any:
        """Await the outcome on the caller's loop; cancelling cancels the remote task."""
        try:
            return await self.future
        except asyncio.CancelledError:
            if not self.finished:
                # A closed loop took the task with it: nothing to cancel.
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self.cancel_remote)
            raise
        except BaseException:
            # Not bound to a local: this frame would hold the error then.
            if self.future.done():
                # The error's traceback holds this frame, which holds self: were
                # self to keep the future holding the error, that would be a
                # cycle (and the host it reaches freed only by the collector).
                del self.future
            else:
                # Thrown in while the outcome is on its way: GeneratorExit as
                # the caller's coroutine is closed (collected pending, say), or
                # an exception of the caller's. Nobody will await the outcome,
                # so a coroutine still running there is cancelled, as for a
                # cancellation, and an error delivered later is not reported
                # as never retrieved: the caller left before it came.
                self.future.add_done_callback(mark_retrieved)
                if not self.finished:
                    with contextlib.suppress(RuntimeError):
                        self.loop.call_soon_threadsafe(self.cancel_remote)
            raise


def start_async(
    remote: Remote,
    async_fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Start an async crossing's coroutine (runs on the target loop, in the caller's context)."""
    host = remote.host
    if remote.finished:
        host._call_finished()
        return
    try:
        refused = host._start_refused(async_fn)  # as in start_sync
        if refused is not None:
            raise refused
        coro = _coroutine(async_fn, args, kwargs)
    except BaseException as exc:
        host._call_finished()
        _deliver_threadsafe(remote, (False, exc))
        return
    loop = remote.loop
    try:
        remote.task = task = _create_task(loop, _run_async(remote, coro), coro)
    except BaseException as exc:  # as in start_sync
        host._call_finished()
        _deliver_threadsafe(remote, (False, exc))
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return
    if not _step_now(loop, task):
        task.add_done_callback(lambda t: _async_never_ran(t, remote, coro))


def _async_never_ran(
    task: asyncio.Task[None], remote: Remote, coro: Coroutine[Any, Any, Any]
) -> None:
    # As _sync_never_ran: cancelled before _run_async's body ever ran.
    if remote.started or not task.cancelled():
        return
    coro.close()
    remote.host._call_finished()
    error = remote.host._cancel_error(coro) or asyncio.CancelledError()
    _deliver_threadsafe(remote, (False, error))


async def _run_async(remote: Remote, coro: Coroutine[Any, Any, Any]) -> None:
    remote.started = True
    host = remote.host
    try:
        value = await coro
    except BaseException as exc:
        host._call_finished()
        _deliver_threadsafe(
            remote,
            (
                False,
                (host._cancel_error(coro) or exc)
                if isinstance(exc, asyncio.CancelledError)
                else exc,
            ),
        )
        exiting = isinstance(exc, (SystemExit, KeyboardInterrupt))  # as in _run_sync
        if exiting:
            host._exiting(asyncio.current_task())
        del remote, host, coro  # the error's traceback holds this frame: see _run_sync
        if exiting:
            raise
    else:
        host._call_finished()
        _deliver_threadsafe(remote, (True, value))


def _deliver_threadsafe(remote: Remote, outcome: tuple[bool, Any]) -> None:
    remote.finished = True
    try:  # noqa: SIM105 - hot path: try/except costs less than contextlib.suppress
        remote.caller.call_soon_threadsafe(_deliver, remote.future, outcome)
    except RuntimeError:  # the caller's loop is closed: nobody waits
        pass


def _deliver(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    elif isinstance(value, asyncio.CancelledError):
        future.cancel()  # the remote task's own cancellation reaches the awaiter
    else:
        future.set_exception(value)

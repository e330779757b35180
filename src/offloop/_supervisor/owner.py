"""A supervisor started with ``start()`` whose event loop ends without ``aclose()``: stop it anyway.

``async with sv:``, ``serve()``, ``run()`` and ``offloop.lifespan`` hold the
supervisor in a task that stops it on the way out, even a cancelled one. A
host's startup hook calling ``start()`` holds nothing: when ``main()`` returns
without ``aclose()``, ``asyncio.run`` cancels the tasks left on the loop. The
async services go with them, but the threads of the thread services would run
on, their tokens never set, and the supervisor would say "running" for ever.

:class:`LoopEndWatch` is a task that waits for the supervisor's stop. Cancelled
before it (``asyncio.run`` and ``Runner.close()`` cancel every task left, and
so do hosts that tidy up the same way), it treats that as the stop nobody
asked for: it sets the stop token of every thread service at once (the loop
may not run much longer), then runs the supervisor's usual shutdown and waits
for it. ``asyncio.run`` waits for the tasks it cancelled, so the shutdown gets
its grace period, and a thread that ignores its token is abandoned and
reported as in any stop. A stop already under way (``stop()`` was called, or
a service failed) when the loop ends is cancelled with the other tasks: the
watch tells the threads at once and runs that stop to its end. anyio stops its
process pool on the loop's end the same way: a task sleeping for ever whose
cancellation kills the workers.

A host may also close the loop without cancelling its tasks (python-telegram-bot's
``run_polling`` does): the watch is never cancelled then, and no stop can run
on a closed loop. A :class:`~offloop._core.loopclose.LoopCloseHook` still sets
the thread services' stop tokens from the loop's ``close()``, closes the loop
threads of the services that have one (``isolate="loop"``), waits for those
threads within grace, and logs what the program should do instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Final, Protocol

from .._core.loopclose import LoopCloseHook
from .._services.lifecycle import LifecycleService
from .supervised import Supervised

__all__ = ["LoopEndWatch", "Watched"]

logger: Final = logging.getLogger("offloop.supervisor")


class Watched(Protocol):
    """The Supervisor as :class:`LoopEndWatch` sees it (a Protocol: supervisor.py imports this)."""

    name: str
    _entries: dict[str, Supervised]
    _shutdown_requested: asyncio.Future[None] | None
    _shutdown_task: asyncio.Task[None] | None

    def _shutting_down(self) -> bool: ...

    def _request_shutdown(self, reason: str) -> asyncio.Task[None]: ...

    async def _finish_shutdown(self, task: asyncio.Task[None]) -> None: ...

    grace: float
    _host_task: asyncio.Task[Any] | None

    async def _shutdown(self) -> None: ...


class LoopEndWatch:
    """Stops a ``start()``-ed supervisor whose loop cancels its tasks before ``aclose()``."""

    def __init__(self, sv: Watched) -> None:
        self.sv = sv
        #: The loop's shutdown stopped the supervisor (no aclose() had begun a stop).
        self.ended = False
        self._task: asyncio.Task[None] | None = None
        self._close_hook: LoopCloseHook | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch from now on (once ``start()`` has the supervisor running)."""
        if self._task is None:
            self._task = loop.create_task(self._watch(), name=f"offloop-loop-end-{self.sv.name}")
            self._close_hook = LoopCloseHook(loop, self._loop_closed)

    async def wait_done(self) -> None:
        """Wait for the watch to end, once the supervisor's stop is over (from another task).

        Its last step comes after the stop's: whoever waited for the stop
        (``aclose()``, ``serve()``) waits for that step too, so that no task
        of the supervisor's is left on the loop when they return.
        """
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task})

    async def _watch(self) -> None:
        try:
            await self._watch_stop()
        finally:
            # The stop ran (or the loop goes on without this task): nothing
            # is left for the loop's close() to tell.
            if self._close_hook is not None:
                self._close_hook.cancel()

    async def _watch_stop(self) -> None:
        sv = self.sv
        requested = sv._shutdown_requested
        assert requested is not None
        try:
            # wait(), not await: cancelling this task must not cancel the future.
            await asyncio.wait({requested})
            # Until the stop is over: the loop's end cancels a shutdown task
            # under way too (stop() was called, or a service failed, and
            # main() returned without aclose()), maybe before it reached the
            # thread services.
            task = sv._shutdown_task
            if task is not None:
                await asyncio.wait({task})
            return
        except asyncio.CancelledError:
            task = sv._shutdown_task
            if task is None or not task.done():
                self._tell_services()
            if not sv._shutting_down():
                # The task that started the supervisor, cancelled in the same
                # sweep, may call aclose() from its cleanup, after awaits of
                # its own: that is the stop asked for, and it needs no
                # warning. Its threads were told above; its end or its stop
                # is waited for, within grace. Another task's cleanup gets
                # one step (it comes before this task's next one).
                host = sv._host_task
                if host is not None and not host.done() and host is not self._task:
                    await asyncio.wait(
                        {host, requested}, timeout=sv.grace, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    await asyncio.sleep(0)
                if not sv._shutting_down():
                    self._stop_unasked()
            # The stop is bounded by grace: waiting for it keeps the loop
            # running (asyncio.run waits for the tasks it cancelled) until the
            # services have stopped or were abandoned.
            task = sv._shutdown_task
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sv._finish_shutdown(task)
                if task.cancelled():
                    # The loop's end cancelled the shutdown task too: this
                    # task, cancelled once already, runs the stop to its end.
                    await sv._shutdown()
            raise

    def _loop_closed(self) -> None:
        # From the loop's close(), in the thread that closed it, with this
        # watch still waiting: the loop was closed without cancelling its
        # tasks and without aclose(). Nothing can run on it any more, but
        # the threads of the thread services can still be told to stop.
        task = self._task
        if task is None or task.done():
            return
        self.ended = True
        self._tell_services()
        for entry in list(self.sv._entries.values()):
            if isinstance(entry.service, LifecycleService):
                entry.service.loop_closed()
        # The program usually ends right after (run_polling returns): its
        # threads are daemons, cut off at the interpreter's exit, so they get
        # the stop's grace here to end, as the stop would have given them.
        left = _join_service_threads(self.sv, self.sv.grace)
        waited = f" (still running after {self.sv.grace:g}s: {', '.join(left)})" if left else ""
        told = (
            "the stop tokens of its thread services were set, the loop threads of its "
            f"isolate='loop' services closed, and their threads waited for{waited}"
        )
        if self.sv._shutdown_task is not None:
            # aclose() (or a failure, or stop()) had begun the stop: the host
            # cut it short, which is no program's missing aclose().
            logger.warning(
                "%s: its event loop was closed while it ran, before its stop had finished "
                "(python-telegram-bot's run_polling does that on a second Ctrl-C or stop "
                "signal during its shutdown): %s, but the services not stopped by then were "
                "not stopped gracefully. To let the stop finish, signal once and wait up to "
                "grace (%gs).",
                self.sv.name,
                told,
                self.sv.grace,
            )
            return
        logger.warning(
            "%s: its event loop was closed while it ran, without aclose() and without "
            "cancelling its tasks (python-telegram-bot's run_polling closes its loop that "
            "way): %s, but no service could be stopped gracefully. Call 'await sv.aclose()' "
            "in the host's shutdown hook (post_shutdown), or run the supervisor with "
            "'async with sv:'. (A program that does has had its shutdown hook skipped: "
            "python-telegram-bot skips post_shutdown on a second Ctrl-C or stop signal "
            "while it stops.)",
            self.sv.name,
            told,
        )

    def _tell_services(self) -> None:
        # At once, before any await: if the loop is closed without running
        # again (a host that cancels its tasks but does not wait for them),
        # the threads have been told. The loop cancelled the services' tasks
        # with this one: their stop() must not cancel them a second time.
        for entry in list(self.sv._entries.values()):
            service = entry.service
            if isinstance(service, LifecycleService):
                service.signal_stop("the supervisor's event loop is shutting down")
                service.tasks_cancelled()

    def _stop_unasked(self) -> None:
        sv = self.sv
        self.ended = True
        logger.warning(
            "%s: its event loop is shutting down (its tasks were cancelled) and aclose() has "
            "not been called: stopping its services now, as aclose() would (the stop tokens "
            "of its thread services are set). Stop it yourself before the loop ends: run it "
            "with 'async with sv:', or 'await sv.aclose()' in the host's shutdown.",
            sv.name,
        )
        sv._request_shutdown("its event loop is shutting down without aclose()")


def _join_service_threads(sv: Watched, grace: float) -> list[str]:
    """Wait up to ``grace`` seconds for the threads of ``sv``'s services; name those left."""
    # The threads the services hold, not every thread named
    # offloop-service-<name>: another supervisor (nested in a thread service,
    # or on another loop) may have a service of the same name, whose thread
    # was not told to stop and would hold this close() for the whole grace.
    deadline = time.monotonic() + grace
    left: list[str] = []
    current = threading.current_thread()
    for entry in list(sv._entries.values()):
        service = entry.service
        if not isinstance(service, LifecycleService):
            continue
        for thread in service.live_threads():
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    left.append(repr(thread.name))
    return left

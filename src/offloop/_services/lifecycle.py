"""The one lifecycle every offloop service goes through: its states and its illegal moves.

:class:`LifecycleState` is the state enum of the adapters (WSGI, aiohttp,
ASGI, watch) and of the function services (task, thread, loop, process);
:class:`LifecycleService` is their base class. It keeps the state and the
future of the current run, which ``wait()`` watches, and :meth:`_refusal` is
the one place where each illegal transition gets its own message, naming the
service with its ``repr``.

A run is ``start()`` .. its end: ``_begin()`` opens it (STARTING) and returns
its future, ``_ready()`` marks it RUNNING, ``_mark_stopping()`` STOPPING, and
``_finish(done, exc)`` ends it; ``_start_failed()`` records a ``start()`` that
raised. A stale run (one a restart has replaced) may still end late: its
future is settled but the state, which belongs to the new run, is left alone.
A run ``kill()`` abandoned (``_abandon()``) is ended at once; when its thread
or task ends after all, nobody waits for it, so its outcome goes to the log
(:func:`log_abandoned_end`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from typing import ClassVar, Final, Literal

from .base import Service, supervisor_name

__all__ = ["JOIN_BOUND", "LifecycleService", "LifecycleState", "log_abandoned_end"]

logger: Final = logging.getLogger("offloop.supervisor")

#: How long the loop may wait for a thread that has signalled its end to return.
#: It only has to leave its function, so this is never reached in practice.
JOIN_BOUND: Final = 1.0

Action = Literal["start", "wait"]


def log_abandoned_end(
    service: Service, what: str, exc: BaseException | None, *, cancelled: bool = False
) -> None:
    """Log how a run ``kill()`` abandoned ended: a crash at ERROR, with its traceback.

    ``what`` names the thread or task (``"thread 'offloop-service-x'"``). The
    run was ended when it was abandoned and the service may run again since,
    so this outcome changes nothing; without the log line a late crash
    would be silent.
    """
    if exc is not None:
        logger.error(
            "%s: service %r: its abandoned %s ended later with %r",
            supervisor_name(service),
            service.name,
            what,
            exc,
            exc_info=exc,
        )
        return
    how = "it was cancelled" if cancelled else "it returned"
    logger.warning(
        "%s: service %r: its abandoned %s ended later: %s",
        supervisor_name(service),
        service.name,
        what,
        how,
    )


class LifecycleState(enum.Enum):
    """Lifecycle of a service: IDLE -> STARTING -> RUNNING -> STOPPING -> its end.

    A server adapter ends STOPPED; a function service ENDED (its function
    returned, or was stopped); either ends CRASHED when its run raised or its
    ``start()`` failed. From any end, ``start()`` builds fresh resources and
    runs it again.
    """

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ENDED = "ended"
    CRASHED = "crashed"


_S = LifecycleState

#: Why each illegal transition is refused: (what was asked, the state it was asked in).
_REFUSALS: Final[dict[tuple[Action, LifecycleState], str]] = {
    ("start", _S.STARTING): "it is already starting; wait for that start() to return.",
    ("start", _S.RUNNING): "it is already running; stop it before starting it again.",
    ("start", _S.STOPPING): "it is still stopping; wait for stop() to return first.",
    ("wait", _S.IDLE): "it has not been started; call start() first.",
    ("wait", _S.CRASHED): "it has not been started: its last start() failed; call start() again.",
}


class LifecycleService(Service):
    """A service with an explicit :class:`LifecycleState` and one future per run.

    A subclass implements ``start()`` (``_begin()``, build fresh resources,
    ``_ready()``), ``stop()`` (``_mark_stopping()``, then ask its run to end)
    and ``kill()``, and calls :meth:`_finish` on the loop when a run ends.
    """

    #: The state a run that ended without an error leaves the service in.
    _CLEAN_END: ClassVar[LifecycleState] = LifecycleState.STOPPED
    #: How the refusal of an early ``wait()`` is worded for this kind of service.
    _WAIT_VERB: ClassVar[str] = "wait for"

    def __init__(self, name: str) -> None:
        self.name = name
        self._state = LifecycleState.IDLE
        self._done: asyncio.Future[None] | None = None
        # Settled when the current start() has ended, ready or not (see _start_settled).
        self._starting: asyncio.Future[None] | None = None
        # The task that runs the current start() (see _start_tasks).
        self._start_task: asyncio.Task[object] | None = None
        # The runs kill() abandoned that may still end: their future -> what ran them.
        self._abandoned: dict[asyncio.Future[None], str] = {}

    @property
    def state(self) -> LifecycleState:
        """Where the service is in its lifecycle (a :class:`LifecycleState`)."""
        return self._state

    def _refusal(self, action: Action) -> RuntimeError:
        """The error for ``action`` asked in the current state, which does not allow it."""
        verb = self._WAIT_VERB if action == "wait" else action
        why = _REFUSALS.get((action, self._state), f"not while it is {self._state.value}.")
        return RuntimeError(f"Cannot {verb} {self!r}: {why}")

    def _begin(self) -> asyncio.Future[None]:
        """Open a run (STARTING) and return the future that ends with it.

        Raises:
            RuntimeError: the service is starting, running or stopping.
        """
        if ("start", self._state) in _REFUSALS:
            raise self._refusal("start")
        self._state = LifecycleState.STARTING
        loop = asyncio.get_running_loop()
        self._starting = loop.create_future()
        self._start_task = asyncio.current_task()
        self._done = loop.create_future()
        return self._done

    def _start_ended(self) -> None:
        self._start_task = None
        starting = self._starting
        if starting is not None and not starting.done():
            starting.set_result(None)

    async def _start_settled(self) -> None:
        """In ``stop()``: let a ``start()`` still in progress end first (ready or failed).

        A service driven by hand may be stopped while its start awaits (a
        startup hook, a lifespan): returning at once would leave the start to
        bring up a server nobody stops, in a state saying "stopping". (A
        supervisor cancels the start before it stops the service.)

        Raises:
            RuntimeError: called from within that start (a startup hook
                awaiting ``stop()``), which would then never end.
        """
        starting = self._starting
        if self._state is LifecycleState.STARTING and starting is not None:
            if asyncio.current_task() in self._start_tasks():
                # A startup hook stopping its own service: each would wait
                # for the other for ever.
                raise RuntimeError(
                    f"Cannot stop {self!r} from within its own start() (a startup hook "
                    f"awaiting stop()): the start would wait for the stop, and the stop for "
                    f"the start. To fail the start, raise an exception there instead; to stop "
                    f"the service once it has started, run stop() in a task of its own "
                    f"(asyncio.create_task(service.stop())) without awaiting it there."
                )
            await asyncio.wait({starting})

    def _start_tasks(self) -> set[asyncio.Task[object]]:
        """The tasks the current ``start()`` waits for, whose code it runs (startup hooks)."""
        return set() if self._start_task is None else {self._start_task}

    def _ready(self) -> None:
        """The run has started (unless it already ended or is being stopped)."""
        if self._state is LifecycleState.STARTING:
            self._state = LifecycleState.RUNNING
        self._start_ended()

    def _start_failed(self) -> None:
        """``start()`` raised: no run is left to wait for or to stop."""
        self._state, self._done = LifecycleState.CRASHED, None
        self._start_ended()

    def _finish(
        self,
        done: asyncio.Future[None],
        exc: BaseException | None = None,
        *,
        cancelled: bool = False,
    ) -> None:
        """End the run ``done`` belongs to (call on the loop); a settled run is left as it is.

        ``cancelled``: the run ended by a cancellation (``exc`` is then None);
        it only changes how the late end of an abandoned run is logged.
        """
        if done.done():
            what = self._abandoned.pop(done, None)
            if what is not None:
                log_abandoned_end(self, what, exc, cancelled=cancelled)
            return
        if done is self._done:
            self._state = self._CLEAN_END if exc is None else LifecycleState.CRASHED
            self._start_ended()
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def _abandon(self, done: asyncio.Future[None], what: str) -> None:
        """``kill()`` left the run ``done`` behind (``what``: its thread or task): end it now.

        A dependent killed by a cascade is started again at once, and
        ``start()`` refuses a service still stopping. The thread or task, if it
        ever ends, finds its run settled and changes nothing but the log.
        """
        if not done.done():
            self._abandoned[done] = what
            self._finish(done)

    def _finish_threadsafe(self, done: asyncio.Future[None], exc: BaseException | None) -> None:
        """:meth:`_finish` from the run's own thread, as its very last step.

        The loop joins the thread before ending the run, so once ``wait()``
        returns the thread is gone (it only had to return from its function).
        A closed loop means nobody waits any more.
        """
        # The run's own loop: the service may have been restarted on another one since.
        loop = done.get_loop()
        # RuntimeError: the loop is closed, the supervisor is long gone.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish_joined, done, exc, threading.current_thread())

    def _finish_joined(
        self, done: asyncio.Future[None], exc: BaseException | None, thread: threading.Thread
    ) -> None:
        thread.join(JOIN_BOUND)
        self._finish(done, exc)

    async def wait(self) -> None:
        """Return when the run has ended; raise the error it crashed with.

        Raises:
            RuntimeError: the service has never been started, or its last
                ``start()`` failed.
            Exception: whatever made the run crash.
        """
        done = self._done
        if done is None:
            raise self._refusal("wait")
        # asyncio.wait, not await: cancelling the waiter must not cancel the run.
        await asyncio.wait({done})
        done.result()

    def signal_stop(self, reason: str) -> None:
        """Tell the threads that run the service's code to stop, without waiting (any thread).

        Sets the :class:`~offloop.StopToken` they watch; the default, for a
        service whose code runs in no thread of its own, does nothing. For
        the supervisor when its event loop is going away: the threads are told
        at once, before the loop may stop running, and ``stop()`` follows.
        """

    def loop_closed(self) -> None:
        """End what runs the service's code away from its event loop, which was closed under it.

        From the loop's ``close()``, in the thread that closed it, after
        :meth:`signal_stop`: no ``stop()`` can run on the closed loop, so a
        thread that only that ``stop()`` would end (a loop thread of the
        service's own) is told here, without waiting. The default, for a
        service that needs nothing more than :meth:`signal_stop`, does nothing.
        """

    def live_threads(self) -> list[threading.Thread]:
        """The threads running the service's code now, which :meth:`signal_stop` tells.

        For the supervisor whose loop is closed under it, which joins them
        (within grace). The default, for a service whose code runs in no
        thread of its own, is none.
        """
        return []

    def tasks_cancelled(self) -> None:
        """Note that the event loop's end has cancelled the task running the service's code.

        ``stop()`` then waits for that task, within the supervisor's grace,
        instead of cancelling it again: a second cancellation would cut short
        the cleanup it runs (a ``finally`` that awaits). The default, for a
        service whose code runs in no task of its own, does nothing.
        """

    def _mark_stopping(self) -> asyncio.Future[None] | None:
        """Move to STOPPING; return the run's future, or ``None`` if no run is left to stop."""
        done = self._done
        if done is None or done.done():
            if self._state is LifecycleState.STARTING:  # start() was interrupted
                self._state = self._CLEAN_END
            return None
        self._state = LifecycleState.STOPPING
        return done

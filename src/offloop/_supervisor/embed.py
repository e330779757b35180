"""A Supervisor inside a host that owns the event loop: ``start()``, ``aclose()``, ``wait_ready()``.

Bot frameworks and ASGI servers run the loop themselves and call the user's
code from their startup and shutdown hooks, often in different tasks. These
hooks cannot hold ``async with sv:`` open, so the supervisor offers the two
halves as calls, and decides where a failure goes once nobody awaits it:

- ``Supervisor(on_failure=fn)``: ``fn(failure)`` is called (on the
  supervisor's loop) and nothing else happens.
- The default, for a supervisor started with ``start()``: stop the host. If
  the task that called ``start()`` still runs (aiogram's polling, discord.py's
  runner, an ``asyncio.run`` main), it is cancelled; its shutdown path then
  calls ``aclose()``, which raises the :class:`~offloop.ServiceFailed` in
  place of the cancellation. If that task has ended and the loop runs a task
  with ``run_until_complete`` (``asyncio.run``'s main task), that task is
  cancelled once the services have stopped, with the failure as the
  cancellation's message (stopping the loop would end ``asyncio.run`` with
  "Event loop stopped before Future completed", which says nothing of the
  failure); if that task has ended by then, whatever the loop runs next is
  ended instead. Otherwise (python-telegram-bot runs ``post_init`` as a task of its
  own, then ``loop.run_forever()``) the loop is stopped, as
  ``Application.stop_running()`` does. Either way the host's shutdown hooks
  run, and the process ends with the error, not half-dead.
- ``offloop.lifespan(sv)`` (ASGI servers) replaces that default with SIGTERM to
  the process: cancelling the lifespan task does not stop uvicorn, its signal
  handler does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from .._core.errors import ServiceFailed
from .._core.validate import describe
from .._services._thirdparty import run_until_complete_task as main_task
from .status import SupervisorState

if TYPE_CHECKING:
    from .owner import LoopEndWatch

__all__ = ["Embeddable", "Embedding", "HostLifecycle", "OnFailure"]

logger: Final = logging.getLogger("offloop.supervisor")

#: What ``Supervisor(on_failure=...)`` takes: called with the failure, on the
#: supervisor's loop; a returned awaitable is awaited in a task of its own.
OnFailure = Callable[[ServiceFailed], object]

_SV = SupervisorState


class Embeddable(Protocol):
    """The Supervisor as :class:`Embedding` sees it (a Protocol: supervisor.py imports this)."""

    name: str
    _state: SupervisorState
    _loop: asyncio.AbstractEventLoop | None
    _failure: ServiceFailed | None
    _in_body: bool
    _shutdown_task: asyncio.Task[None] | None
    _loop_end: LoopEndWatch

    @property
    def state(self) -> SupervisorState: ...

    async def __aenter__(self) -> Any: ...

    def _request_shutdown(self, reason: str) -> asyncio.Task[None]: ...

    async def _finish_shutdown(self, task: asyncio.Task[None]) -> None: ...

    def _own_service(self, *, starting: bool = False) -> str | None: ...


class Embedding:
    """The embedding half of a Supervisor: who started it, who waits, where failure goes."""

    def __init__(self, sv: Embeddable, on_failure: OnFailure | None) -> None:
        if on_failure is not None and not callable(on_failure):
            raise TypeError(
                f"Supervisor(on_failure=...) takes a function called with the ServiceFailed "
                f"(e.g. application.stop_running), or None for the default; got "
                f"{describe(on_failure)}."
            )
        self.sv = sv
        self.on_failure = on_failure
        #: Started by start() (not 'async with', serve() or run()).
        self.started = False
        #: aclose() was called (before or after the start).
        self.closed = False
        self.caller: asyncio.Task[object] | None = None
        self.cancelled_caller = False
        #: Replaces the default failure action (offloop.lifespan's SIGTERM).
        self.host_stop: Callable[[ServiceFailed], None] | None = None
        self.waiters: list[asyncio.Future[None]] = []
        #: The tasks awaiting aclose(), which raises the failure to them itself.
        self.closing: set[asyncio.Task[object]] = set()
        self.callbacks: set[asyncio.Task[object]] = set()

    # -- start, close, ready --------------------------------------------------------------

    async def start(self) -> None:
        sv = self.sv
        self._refuse_own_start("start()")
        if sv._state is _SV.NEW and not self.closed:
            self.started = True
            self.caller = asyncio.current_task()
            await sv.__aenter__()
            # No 'async with' body: a failure goes to the failure action, not to this task.
            sv._in_body = False
            if sv.state is not _SV.RUNNING:  # the property: mypy narrowed _state above
                error = RuntimeError(
                    f"{sv!r} was stopped (stop() or aclose()) while start() was starting it; "
                    f"its services are not running."
                )
                task = asyncio.current_task()
                if self._closed() and task is not None:
                    # A host's shutdown hook stopped this start: the host may have
                    # abandoned the task awaiting it (python-telegram-bot leaves its
                    # post_init task behind on Ctrl-C), and an error nobody can await
                    # must not be logged as "never retrieved" as the program exits.
                    task.add_done_callback(functools.partial(_retrieve, error))
                raise error
            # Nobody holds the supervisor now: its loop may end without aclose().
            sv._loop_end.start(asyncio.get_running_loop())
            return
        if self.started and not self.closed:
            if sv._state in (_SV.STARTING, _SV.RUNNING):
                # Started already, maybe from another task (a host's hooks may overlap).
                await self.wait_ready()
                return
            if sv._failure is not None:
                raise sv._failure  # the outcome of that start, or of the run since
        raise RuntimeError(self._illegal("start"))

    async def aclose(self) -> None:
        sv = self.sv
        if sv._state is _SV.NEW:
            # Never started: nothing to stop, and it must not start any more.
            self.closed = True
            sv._state = _SV.STOPPED
            self.changed()
            return
        if sv._loop_end.ended and sv._state in (_SV.STOPPED, _SV.FAILED):
            # Its loop's end stopped it, and that loop may be gone: the stop is
            # over, so there is nothing to wait for, from any loop.
            self.closed = True
            if sv._failure is not None:
                raise sv._failure
            return
        self._check_loop("aclose")  # refused: nothing changed
        self.closed = True
        task = asyncio.current_task()
        closing = {task} if task is not None else set()
        self.closing |= closing
        try:
            await sv._finish_shutdown(sv._request_shutdown("aclose() was called"))
        finally:
            self.closing -= closing
        if sv._failure is not None:
            if self.cancelled_caller and asyncio.current_task() is self.caller:
                # The failure replaces the cancellation it caused (Python >= 3.11 counts them).
                uncancel = getattr(self.caller, "uncancel", None)
                if uncancel is not None:
                    uncancel()
            raise sv._failure

    async def wait_ready(self) -> None:
        sv = self.sv
        if sv._state is _SV.STARTING:
            self._refuse_own_start("wait_ready()")
        while sv._state is not _SV.RUNNING:
            if sv._state is not _SV.NEW and sv._state is not _SV.STARTING:
                if sv._failure is not None:
                    raise sv._failure
                raise RuntimeError(self._illegal("wait_ready"))
            if self.closed:
                raise RuntimeError(self._illegal("wait_ready"))
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                # From another loop's thread the state may have changed since
                # the check above, its wake-up finding nobody registered: look again.
                if sv._state is _SV.NEW or sv._state is _SV.STARTING:
                    await waiter
            finally:
                self.waiters.remove(waiter)

    def _refuse_own_start(self, call: str) -> None:
        # In the start of one of its own services, which the supervisor's start
        # waits for: the two would wait for each other until start_timeout.
        own = self.sv._own_service(starting=True)
        if own is not None:
            raise RuntimeError(
                f"{call} of {self.sv!r} was called in the start of its own service {own!r}, "
                f"which its start waits for: each would wait for the other. This is what "
                f"lifespan=offloop.lifespan(sv) does on an app that the same supervisor serves "
                f"(ASGIService): drop the lifespan from that app, or serve the app outside the "
                f"supervisor (uvicorn with the lifespan, no ASGIService)."
            )

    def changed(self) -> None:
        """The supervisor's state changed: wake the wait_ready() callers, on their own loops."""
        for waiter in list(self.waiters):
            with contextlib.suppress(RuntimeError):  # that caller's loop is closed
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    def _closed(self) -> bool:
        # A call, not the attribute: mypy keeps 'closed' narrowed across an await.
        return self.closed

    def _check_loop(self, action: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self.sv._loop:
            # serve() is awaited to wait for the services, aclose() to stop them:
            # each gets the way out that does what its caller wanted.
            if action == "serve":
                way_out = (
                    "Await serve() on the loop that started it; from another loop, await "
                    "sv.wait_ready() and stop it with sv.stop() (thread-safe)."
                )
            else:
                way_out = (
                    f"Await {action}() on that loop, or call sv.stop() (thread-safe) to stop "
                    f"it from here."
                )
            raise RuntimeError(
                f"{action}() of {self.sv!r} was called from another event loop (or thread) than "
                f"the one it runs on. {way_out}"
            )

    def _illegal(self, action: str) -> str:
        sv, state = self.sv, self.sv._state
        if action == "start":
            if self.closed:
                return (
                    f"Cannot start() {sv!r}: aclose() was called already. A supervisor runs "
                    f"once; create a new Supervisor to run the services again."
                )
            if state in (_SV.STARTING, _SV.RUNNING):
                return (
                    f"Cannot start() {sv!r}: it was started by 'async with', serve() or run(), "
                    f"which also stop it. Use 'await sv.wait_ready()' to wait for its services."
                )
            if state is _SV.STOPPING:
                return f"Cannot start() {sv!r}: it is stopping."
            return (
                f"Cannot start() {sv!r}: {self.stopped_how()}. A supervisor runs "
                f"once; create a new Supervisor to run the services again."
            )
        if state is _SV.STOPPING:
            return f"{sv!r} is stopping, so it will not be ready; it was stopped before."
        if self.closed and state is _SV.STOPPED and sv._loop is None:
            return f"{sv!r} was closed with aclose() before it started; it will never be ready."
        if sv._loop_end.ended:
            return f"{sv!r} has stopped, so it is not ready: {self.stopped_how()}."
        return f"{sv!r} has stopped, so it is not ready; it was stopped (no service failed)."

    def stopped_how(self) -> str:
        """How a supervisor that has run came to stop, for the refusals that follow."""
        if self.sv._loop_end.ended:
            return (
                "its event loop shut down while it ran, before aclose() was called, which "
                "stopped it"
            )
        if self.closed and self.sv._loop is None:
            # Its loop is set once it starts: aclose() came first (a host whose
            # startup failed before it got to start()), so it never ran.
            return "aclose() was called before it started, so it never runs"
        return "it has already run and stopped"

    # -- failure --------------------------------------------------------------------------

    def failed(self, failure: ServiceFailed) -> None:
        """A service failed beyond its policy; called before the shutdown is requested."""
        if self.sv._state is not _SV.RUNNING:
            return  # while starting: start(), 'async with' or serve() raise it
        loop = self.sv._loop
        assert loop is not None
        if self.on_failure is not None:
            loop.call_soon(self._call_user, self.on_failure, failure)
        elif self.started:
            loop.call_soon(self._stop_host, failure)

    def _call_user(self, fn: OnFailure, failure: ServiceFailed) -> None:
        try:
            result = fn(failure)
        except Exception:
            logger.exception("%s: on_failure=%r raised", self.sv.name, fn)
            return
        if isinstance(result, Awaitable):
            task = asyncio.ensure_future(result)
            self.callbacks.add(task)  # a strong reference until it ends
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[object]) -> None:
        self.callbacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: on_failure raised", self.sv.name, exc_info=task.exception())

    def _stop_host(self, failure: ServiceFailed) -> None:
        name = self.sv.name
        if self.host_stop is not None:
            self.host_stop(failure)
            return
        caller, loop = self.caller, self.sv._loop
        if caller is not None and not caller.done():
            logger.error(
                "%s: cancelling %s, the task that called start(), so that the host stops; its "
                "aclose() raises the failure (pass on_failure=... to choose otherwise)",
                name,
                caller.get_name(),
            )
            self.cancelled_caller = True
            caller.cancel(f"offloop: {failure}")
        elif loop is not None and not loop.is_closed() and (main := main_task(loop)) is not None:
            logger.error(
                "%s: cancelling %s, the task the event loop runs to completion (asyncio.run's "
                "main task), once the services have stopped, so that the program ends with the "
                "failure: the task that called start() has ended (pass on_failure=... to choose "
                "otherwise)",
                name,
                main.get_name(),
            )
            # Its aclose(), if it awaits one, raises the failure in place of this cancellation.
            self.caller, self.cancelled_caller = main, True
            shutdown = self.sv._shutdown_task
            if shutdown is None or shutdown.done():
                main.cancel(self._why(failure))
            else:
                shutdown.add_done_callback(functools.partial(self._stopped, main, failure))
        elif loop is not None and not loop.is_closed():
            self._stop_loop(loop)

    def _stopped(
        self, main: asyncio.Task[object], failure: ServiceFailed, shutdown: asyncio.Task[None]
    ) -> None:
        # The services have stopped: now end the task the loop was running to
        # completion when the failure came, unless it awaits aclose() by now,
        # which raises the failure to it (a cancellation would come first).
        if main in self.closing:
            self.cancelled_caller = False
            return
        if not main.done():
            main.cancel(self._why(failure))
            return
        loop = main.get_loop()
        if shutdown.cancelled() or loop.is_closed():
            return  # the loop's own end cancelled the stop: it is ending anyway
        # That task ended while the services stopped, and the loop went on to
        # the host's next step: python-telegram-bot's run_polling sets up its
        # polling one run_until_complete() at a time, then runs forever.
        now = main_task(loop)
        if now is None:
            self._stop_loop(loop)
            return
        logger.error(
            "%s: cancelling %s, the task the event loop runs to completion now, so that the "
            "host stops: %s, which it ran when the service failed, has ended",
            self.sv.name,
            now.get_name(),
            main.get_name(),
        )
        self.caller = now
        now.cancel(self._why(failure))

    def _why(self, failure: ServiceFailed) -> str:
        return (
            f"offloop: {failure} The supervisor {self.sv.name!r} cancelled this task, which the "
            f"event loop runs to completion, because the task that called start() had "
            f"ended; await sv.aclose() here to get the ServiceFailed, or pass "
            f"on_failure=... to the Supervisor to handle it yourself."
        )

    def _stop_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        logger.error(
            "%s: stopping the event loop (loop.stop()) so that the host stops: the task that "
            "called start() has ended (pass on_failure=... to choose otherwise)",
            self.sv.name,
        )
        loop.stop()


class HostLifecycle:
    """The Supervisor's calls for hosts that own the loop (kept here, beside their logic)."""

    _embed: Embedding

    async def start(self) -> None:
        """Start every service in order and return once all are ready: for a host's startup hook.

        For frameworks that own the event loop (uvicorn, aiogram,
        python-telegram-bot, discord.py): call it from the startup hook and
        :meth:`aclose` from the shutdown hook, which may run in another task.
        Calling it again (from any task) waits for the same start.

        A service that fails beyond its restart policy later goes to
        ``on_failure`` if given; by default the host is stopped: the task that
        called ``start()`` is cancelled if it still runs (its :meth:`aclose`
        then raises the :class:`~offloop.ServiceFailed`); else the task the
        loop runs to completion (``asyncio.run``'s main task), if any, is
        cancelled once the services have stopped, with the failure as its
        message (or, if it has ended by then, the one the loop runs then, or
        the loop); else the event loop is stopped (``loop.stop()``, which ends
        python-telegram-bot's ``run_polling``). See the Hosts guide for each
        framework.

        Raises:
            ServiceFailed: a service failed while starting (its ``__cause__``
                is the error); the ones started are stopped first.
            RuntimeError: the supervisor was entered with ``async with``,
                :meth:`serve` or :meth:`run`, has already run, was closed, or
                was stopped while starting.
        """
        await self._embed.start()

    async def aclose(self) -> None:
        """Stop every service in reverse order, in about ``grace`` seconds; for a shutdown hook.

        Waits for the stop, whoever began it. Calling it again, from any task
        on the supervisor's loop, waits for the same stop. On a supervisor
        that never started, it only makes sure it never will. Awaited in one
        of its own services (or a task one started), the wait ends as the
        stop reaches that service: its task is cancelled then, like every
        service's, so the ``await`` raises ``CancelledError``.

        Raises:
            ServiceFailed: a service failed beyond its restart policy (on every
                call), so that the host's shutdown ends with the error.
            RuntimeError: called from another loop or thread than the
                supervisor's (use :meth:`stop` there).
        """
        await self._embed.aclose()

    async def wait_ready(self) -> None:
        """Return once every service is ready; for code beside ``serve()`` or a ``start()``.

        Returns at once if the supervisor is running. May be awaited before
        the supervisor starts, on any loop.

        Raises:
            ServiceFailed: a service failed before all were ready, or the
                supervisor failed before this call.
            RuntimeError: the supervisor stopped (or was closed) before it was
                ready, or stopped since.
        """
        await self._embed.wait_ready()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _retrieve(error: BaseException, task: asyncio.Task[object]) -> None:
    # exception() marks whatever the task raised as retrieved: only when that is
    # ``error``, not something the host's code raised instead (a task of another
    # implementation, without asyncio's attribute, keeps its log).
    if getattr(task, "_exception", None) is error:
        task.exception()

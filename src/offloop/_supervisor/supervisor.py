"""The Supervisor: runs services side by side, restarts them, stops them in bounded time.

One *runner* task per service drives it through ``start()`` / ``wait()`` and
applies its restart policy. Shutdown is a single task that stops the services
in reverse order against one shared deadline (``grace``), then kills and
abandons whatever is left, so it always ends in about ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .._core.errors import ServiceFailed
from .._core.restart import RestartPolicy
from .._core.validate import check_seconds, check_thread_name, describe
from .._services.base import Service
from .cascade import Cascade, parked_message
from .embed import Embedding, HostLifecycle, OnFailure
from .health import LoopHealth
from .importing import check_not_importing
from .logs import LogFormat
from .order import check_depends_on, check_on_dependency_restart, check_oneshot, start_order
from .owner import LoopEndWatch
from .probes import DEFAULT_HOST, Probes
from .register import Registration
from .shutdown import Shutdown
from .status import ServiceState, ServiceStatus, SupervisorState
from .supervised import Supervised

if TYPE_CHECKING:
    from .._detect.detector import BlockingDetector

__all__ = ["Supervisor"]

logger: Final = logging.getLogger("offloop.supervisor")

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=Service)

#: The threshold behind ``detect_blocking=True``; the detector's own default.
DEFAULT_BLOCK_THRESHOLD: Final = 0.1

_counter = itertools.count(1)
_ST = ServiceState
_SV = SupervisorState


class Supervisor(HostLifecycle, Registration, Shutdown):
    """Runs services side by side: restarts them when they crash, stops them in bounded time.

    Register ``async def`` / ``def`` functions with :meth:`service` (scheduled
    ones with :meth:`every` and :meth:`cron`) and adapters (or your own
    :class:`~offloop.Service` subclasses) with :meth:`add`, then run them with
    ``async with sv:``, ``await sv.serve()`` or, from a script, ``sv.run()``;
    inside a framework that owns the loop, call :meth:`start` and :meth:`aclose`
    from its startup and shutdown hooks. A supervisor runs once.

    Args:
        grace: seconds the whole shutdown may take. Services are asked to stop
            politely in reverse order; what is still running when the time is
            up is killed (tasks cancelled, processes terminated, threads
            abandoned and reported with their stack).
        name: shown in logs and reprs.
        detect_blocking: watch the supervisor's event loop with an
            :class:`~offloop.BlockingDetector` while it runs: ``True`` for the
            default threshold (0.1 s), or the threshold in seconds (0.01 to
            86400, the detector's range). Each block
            is logged with the line that blocked (``offloop.detector`` logger);
            :attr:`detector` gives the report afterwards.
        on_failure: called with the :class:`~offloop.ServiceFailed`, on the
            supervisor's loop, when a service fails beyond its restart policy
            after every service was ready (an awaitable it returns is run as a
            task). With it, a supervisor started by :meth:`start` does nothing
            else; without it, :meth:`start`'s default stops the host (see
            there). Under ``async with``, :meth:`serve` and :meth:`run` the
            failure is raised as well.
        status_port: serve the probes (``/healthz``, ``/readyz``, ``/status``,
            ``/metrics``) on this port while the supervisor runs, however it
            is run: from before the first service starts to after the last
            one stopped. 0 picks a free port (see :attr:`status_url`); None
            (the default) serves none.
        status_host: the address they listen on: ``"127.0.0.1"`` (this
            machine only) by default; ``"0.0.0.0"`` for a probe from outside,
            such as Kubernetes'.

    Raises:
        TypeError, ValueError: ``grace`` is not a finite number of seconds >= 0,
            ``detect_blocking`` is neither a bool nor a number of seconds
            from 0.01 to 86400, ``on_failure`` is not callable,
            ``status_port`` is not an int from 0 to 65535, or
            ``status_host`` is not an IP address.
    """

    def __init__(
        self,
        *,
        grace: float = 5.0,
        name: str | None = None,
        detect_blocking: bool | float | None = None,
        on_failure: OnFailure | None = None,
        status_port: int | None = None,
        status_host: str = DEFAULT_HOST,
    ) -> None:
        # Finite: the signal watchdog waits grace plus a margin, and the
        # shutdown's deadline is computed from it.
        check_thread_name(name, "Supervisor", names="its logs, status and repr")
        self.grace = check_seconds(grace, "grace", positive=False, finite=True)
        self._block_threshold: float | None = None
        if detect_blocking is True:
            self._block_threshold = DEFAULT_BLOCK_THRESHOLD
        elif detect_blocking is not None and detect_blocking is not False:
            self._block_threshold = check_seconds(
                detect_blocking, "detect_blocking", positive=True, finite=True
            )
            from .._detect.thresholds import threshold_out_of_range

            # The detector's own range, checked now rather than when it starts.
            problem = threshold_out_of_range(self._block_threshold, "detect_blocking")
            if problem is not None:
                raise ValueError(f"{problem}. Pass True for the default (0.1 s).")
        self._probes = Probes(status_port, status_host)
        self._detector: BlockingDetector | None = None
        # The loop's lag and the detector's last blocks, for the probes and the status.
        self._health = LoopHealth()
        self.name = name if name is not None else f"supervisor-{next(_counter)}"
        self._entries: dict[str, Supervised] = {}
        self._state = _SV.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._shutdown_requested: asyncio.Future[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._failure: ServiceFailed | None = None
        # A service's KeyboardInterrupt: raised again from 'async with', as Ctrl-C would be.
        self._interrupt: BaseException | None = None
        self._host_task: asyncio.Task[Any] | None = None
        self._in_body = False
        self._serving = 0
        self._host_cancelled = False
        self._stop_early = False
        # While the start waits for a service to be ready: that service and the
        # future it waits on (_check_start fails the start if it never comes).
        self._awaited: tuple[Supervised, asyncio.Future[None]] | None = None
        # Loop time by which the shutdown has ended (grace plus its overrun):
        # run() gives the tasks left on its loop what remains of it.
        self._stop_deadline: float | None = None
        self._embed = Embedding(self, on_failure)
        # A start()-ed supervisor whose loop ends without aclose() stops anyway.
        self._loop_end = LoopEndWatch(self)
        self._cascade = Cascade(self)

    def _add(
        self,
        service: Service,
        policy: RestartPolicy,
        depends_on: object = (),
        oneshot: object = False,
        on_dependency_restart: object = "restart",
    ) -> None:
        name = getattr(service, "name", None)
        if self._state is not _SV.NEW:
            if self._state in (_SV.STOPPED, _SV.FAILED):
                why = self._embed.stopped_how()
                hint = "A supervisor runs once; create a new Supervisor to run the services."
            else:
                why = "it has already started"
                hint = "Add every service before entering it (or calling serve() or run())."
            raise RuntimeError(f"Cannot add the service {name!r} to {self!r}: {why}. {hint}")
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{service!r} has no usable name (got {describe(name)}); a service needs a "
                f"non-empty str 'name' attribute."
            )
        if any(e.service is service for e in self._entries.values()):
            raise ValueError(f"{service!r} is already supervised by {self!r}.")
        if name in self._entries:
            raise ValueError(
                f"{self!r} already has a service named {name!r}; pass name=... to give "
                f"this one another name."
            )
        deps = check_depends_on(depends_on, name)
        once = check_oneshot(oneshot, policy.restart, name)
        follow = check_on_dependency_restart(on_dependency_restart, name)
        self._entries[name] = Supervised(
            service, policy, self, depends_on=deps, oneshot=once, on_dependency_restart=follow
        )

    # -- introspection -------------------------------------------------------------------

    @property
    def state(self) -> SupervisorState:
        """The supervisor's :class:`~offloop.SupervisorState`."""
        return self._state

    @property
    def detector(self) -> BlockingDetector | None:
        """The :class:`~offloop.BlockingDetector` watching the loop (``detect_blocking``), or None.

        It exists from the start of the run on and keeps its
        :meth:`~offloop.BlockingDetector.report` after the supervisor stopped.
        """
        return self._detector

    @property
    def status_url(self) -> str | None:
        """The probes' base URL while served (``status_port``), e.g. ``http://127.0.0.1:8081``.

        None before the supervisor has bound its port and once the shutdown
        closed it; ``f"{sv.status_url}/readyz"`` is the readiness probe.
        """
        return self._probes.url

    @property
    def services(self) -> dict[str, Service]:
        """The supervised services by name, in start order."""
        return {name: e.service for name, e in self._entries.items()}

    def status(self) -> dict[str, ServiceStatus]:
        """A snapshot of every service's :class:`~offloop.ServiceStatus`, by name, in start order.

        Safe to call from any thread.
        """
        return {name: e.status() for name, e in list(self._entries.items())}

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for e in list(self._entries.values()):
            counts[e.state.value] = counts.get(e.state.value, 0) + 1
        detail = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no services"
        return f"<Supervisor {self.name!r} {self._state.value} ({detail}) grace={self.grace:g}>"

    # -- running -------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        """Start every service in order, each once it is ready; return the supervisor.

        Raises:
            ServiceFailed: a service failed beyond its restart policy while
                starting (the ones already started are stopped first).
            ValueError: a ``depends_on`` names no service, or they form a cycle.
            StatusPortError: ``status_port`` cannot be bound (nothing started).
            RuntimeError: the supervisor was already entered or has run before.
        """
        if self._state is not _SV.NEW:
            raise RuntimeError(self._illegal_start("enter"))
        check_not_importing(f"Starting {self!r}")
        # Before anything changes: an unknown name or a cycle leaves the supervisor new.
        order = start_order({n: e.depends_on for n, e in self._entries.items()})
        self._entries = {n: self._entries[n] for n in order}
        # Before any service, so /healthz answers while they start; a port in
        # use leaves the supervisor new, like a bad depends_on.
        await self._probes.open(self)
        if self.state is not _SV.NEW:  # aclose()d while binding (the property: mypy narrowed)
            await self._probes.close()
            raise RuntimeError(self._illegal_start("enter"))
        loop = asyncio.get_running_loop()
        if self._block_threshold is not None:
            from .._detect.detector import BlockingDetector

            # Before the state changes: a detector that cannot start leaves the
            # supervisor as it was, so it can be fixed and entered again.
            try:
                self._detector = BlockingDetector(
                    loop, threshold=self._block_threshold, on_block=self._health.record_block
                ).start()
            except BaseException:
                await self._probes.close()
                raise
        self._health.start(loop)
        # Only now, with no await until the shutdown future exists: a stop() that
        # sees the loop asks it for a shutdown, which a supervisor left new (its
        # detector failed) has not set up; an earlier stop() sets _stop_early.
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._host_task = asyncio.current_task()
        self._shutdown_requested = loop.create_future()
        try:
            self._state = _SV.STARTING
            logger.info("%s: starting %d service(s)", self.name, len(self._entries))
            if self._stop_early:
                self._request_shutdown("stop requested before start")
            for entry in self._entries.values():
                if self._shutdown_requested.done():
                    break
                entry.ready = loop.create_future()
                entry.runner = loop.create_task(
                    entry.supervise(), name=f"offloop-supervise-{entry.name}"
                )
                entry.runner.add_done_callback(self._runner_done)
                self._awaited = (entry, entry.ready)
                await asyncio.wait(
                    {entry.ready, self._shutdown_requested}, return_when=asyncio.FIRST_COMPLETED
                )
            self._awaited = None
            stopping = self._shutdown_requested.done()
            if not stopping:
                self._state = _SV.RUNNING
                logger.info("%s: all %d service(s) ready", self.name, len(self._entries))
                self._embed.changed()
                self._check_all_ended()
        except BaseException:
            # Cut short before the body (Ctrl-C under asyncio.run, which on
            # Python 3.10 raises KeyboardInterrupt wherever the main thread
            # is, even after the services started): no body means no
            # __aexit__, so leave nothing behind here.
            await self._finish_shutdown(self._request_shutdown("start was interrupted"))
            raise
        if stopping:
            await self._finish_shutdown(self._request_shutdown("stopping"))
            if self._failure is not None:
                raise self._failure
        self._in_body = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every service in reverse order, in about ``grace`` seconds at most.

        Raises:
            ServiceFailed: a service failed beyond its restart policy (unless
                the block raised an exception of its own, which then propagates).
        """
        self._in_body = False
        await self._finish_shutdown(self._request_shutdown("leaving 'async with'"))
        cancelled_here = self._host_cancelled and exc_type is asyncio.CancelledError
        failed = self._failure is not None and (exc_type is None or cancelled_here)
        # A service's KeyboardInterrupt ends a body it cut short as Ctrl-C would,
        # even one that caught the cancellation; a body that ended by itself
        # (serve() returned, so it was never cut short) ends normally.
        interrupted = (
            self._interrupt is not None
            and self._host_cancelled
            and exc_type in (None, asyncio.CancelledError)
        )
        if failed or interrupted:
            if self._host_cancelled and self._host_task is not None:
                uncancel = getattr(self._host_task, "uncancel", None)  # Python >= 3.11
                if uncancel is not None:
                    uncancel()
            if self._failure is not None:
                raise self._failure
            raise KeyboardInterrupt from self._interrupt

    async def serve(self) -> None:
        """Run the services until :meth:`stop` is called, every service ended, or one failed.

        Starts and stops them itself when called on a new supervisor; inside
        ``async with sv:`` or after :meth:`start` it just waits. To know when
        the services are up, await :meth:`wait_ready` in another task.

        Raises:
            ServiceFailed: a service failed beyond its restart policy.
            StatusPortError: ``status_port`` cannot be bound (nothing started).
            RuntimeError: the supervisor has already run, or runs on another
                event loop than the caller's (started there).
        """
        if self._state is _SV.NEW:
            async with self:
                await self._serve_inside()
            return
        if not self._in_body and not (self._embed.started and self._state is _SV.RUNNING):
            raise RuntimeError(self._illegal_start("serve"))
        # It waits on the supervisor's loop: from another one it would be woken
        # from the wrong thread (or never). wait_ready() works from any loop.
        self._embed._check_loop("serve")
        await self._serve_inside()

    async def _serve_inside(self) -> None:
        assert self._shutdown_requested is not None
        self._serving += 1
        try:
            await asyncio.wait({self._shutdown_requested})
            assert self._shutdown_task is not None
            await self._finish_shutdown(self._shutdown_task)
        finally:
            self._serving -= 1
        if self._failure is not None:
            raise self._failure

    def run(self, *, log_format: LogFormat = "text") -> int:
        """Run the services on a new event loop until stopped; the blocking entry point for scripts.

        Unless the application has configured logging (the root logger has a
        handler), it logs to stderr at INFO as ``offloop run`` does:
        ``log_format="json"`` writes one JSON object per line, with an
        ``event`` field for service state changes, restarts, crashes, blocks
        and abandoned calls.

        Installs SIGINT and SIGTERM handlers (in the main thread): the first
        signal stops the services gracefully (within ``grace`` seconds) and
        ``run()`` returns 0; a second one exits the process at once with code
        ``128 + signal number``.

        Returns:
            0 once every service has stopped.

        Raises:
            ServiceFailed: a service failed beyond its restart policy.
            StatusPortError: ``status_port`` cannot be bound (nothing started).
            RuntimeError: called from a running event loop (use ``await
                sv.serve()`` there), or the supervisor has already run.
            ValueError: ``log_format`` is neither ``"text"`` nor ``"json"``.
        """
        from .logs import check_log_format, configure_logging
        from .signals import run_with_signals

        fmt = check_log_format(log_format, "Supervisor.run()")
        check_not_importing(f"{self!r}.run()")  # before the signal handlers and the loop
        if self._state is _SV.NEW and not _loop_running():  # else run_with_signals refuses
            configure_logging(fmt)
        return run_with_signals(self, self.serve)

    def stop(self) -> None:
        """Ask the supervisor to stop every service; returns at once. Thread-safe.

        Stopping an already stopping or stopped supervisor does nothing. A stop
        asked before the supervisor has started is kept: it stops as soon as
        it starts, before starting any service. So ``sv.stop()`` from another
        thread just after ``Thread(target=sv.run).start()`` is never lost,
        whichever thread gets there first.
        """
        self._request_stop_threadsafe("stop() was called")

    def _request_stop_threadsafe(self, reason: str, *, defer: bool = False) -> None:
        # defer: always go through the loop (a signal handler must not run
        # the shutdown in the middle of whatever the loop was doing).
        loop = self._loop
        if loop is None:  # not started yet: stop as soon as it does
            self._stop_early = True
            loop = self._loop
            if loop is None:
                return
            # The start got its loop meanwhile and may have checked the flag already.
        if not defer and threading.get_ident() == self._loop_thread:
            self._request_shutdown(reason)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: all stopped already
            loop.call_soon_threadsafe(self._request_shutdown, reason)

    def _illegal_start(self, action: str) -> str:
        if self._state in (_SV.STARTING, _SV.RUNNING):
            if action == "enter":
                return (
                    f"Cannot enter {self!r} again: it is already running. A supervisor is "
                    f"entered once; use a second Supervisor for a second set of services."
                )
            return (
                f"Cannot serve() {self!r} while another task starts it ('async with' or start() "
                f"has not returned yet): await sv.wait_ready(), then serve()."
            )
        if self._state is _SV.STOPPING:
            return f"Cannot {action} {self!r}: it is stopping."
        return (
            f"Cannot {action} {self!r}: {self._embed.stopped_how()}. A supervisor runs "
            f"once; create a new Supervisor to run the services again."
        )

    def _shutting_down(self) -> bool:
        """Whether the shutdown has begun (it is never undone)."""
        return self._shutdown_task is not None

    def _runner_done(self, runner: asyncio.Task[None]) -> None:
        # Service errors are handled inside the runner; anything escaping it is
        # a bug in offloop, reported instead of vanishing with the task.
        if not runner.cancelled() and runner.exception() is not None:
            logger.error(
                "%s: supervision task %s crashed",
                self.name,
                runner.get_name(),
                exc_info=runner.exception(),
            )

    # -- called by the Supervised records ---------------------------------------------------

    def _fail(self, e: Supervised, crash: BaseException | None, why: str) -> None:
        e.end(_ST.FAILED)
        if self._failure is not None:
            return  # the first failure is the one reported
        if crash is None:
            crash = e.last_error  # ended normally this time, but crashed before
        last = f"; last error: {crash!r}" if crash is not None else ""
        self._failed(e, f"Service {e.name!r} failed: {why}{last}.", crash)

    def _failed(self, e: Supervised, message: str, crash: BaseException | None) -> None:
        failure = ServiceFailed(message, service=e.name)
        failure.__cause__ = crash
        self._failure = failure
        logger.error("%s: %s Stopping the other services.", self.name, failure)
        self._embed.failed(failure)
        self._request_shutdown(f"service {e.name!r} failed")
        # Like a TaskGroup: interrupt the 'async with' body so the failure surfaces now.
        self._cut_body_short(f"service {e.name!r} failed")

    async def _restarting(self, e: Supervised) -> None:
        await self._cascade.stop_dependents(e)

    async def _before_start(self, e: Supervised) -> None:
        assert self._shutdown_requested is not None
        await self._cascade.before_start(e, self._shutdown_requested)

    def _check_start(self) -> None:
        # A start that waits for a service kept down by a parked one (an
        # infinite backoff) would wait until a stop: it fails now instead.
        # After the start nothing waits for them, and they stay down.
        awaited = self._awaited
        if awaited is None or awaited[1].done() or self._state is not _SV.STARTING:
            return
        path = self._cascade.parked_behind(awaited[0])
        if path is not None and not self._shutting_down():
            e = path[0]
            e.end(_ST.FAILED)
            self._failed(e, parked_message(path), path[-1].parked_after)

    def _ready_again(self, e: Supervised) -> None:
        self._cascade.ready_again(e)

    def _interrupted(self, e: Supervised) -> None:
        if self._failure is not None or self._interrupt is not None:
            return  # already stopping for a reason reported first
        self._interrupt = e.last_error
        self._request_shutdown(f"service {e.name!r} raised KeyboardInterrupt")
        # As Ctrl-C does: the 'async with' body stops now, not when it ends.
        self._cut_body_short(f"service {e.name!r} raised KeyboardInterrupt")

    def _cut_body_short(self, why: str) -> None:
        # Only a body that waits on its own: serve() ends with the shutdown anyway.
        host = self._host_task
        if self._in_body and not self._serving and host is not None and not host.done():
            self._host_cancelled = True
            host.cancel(f"offloop: {why}")

    def _check_all_ended(self) -> None:
        if self._state is _SV.RUNNING and all(
            e.state in (_ST.STOPPED, _ST.FAILED, _ST.DONE) for e in self._entries.values()
        ):
            self._request_shutdown("every service has ended")

    # -- shutdown ------------------------------------------------------------------------


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

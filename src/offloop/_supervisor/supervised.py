"""One service under supervision: its runner (start, wait, restart) and its bounded stop.

The :class:`~offloop.Supervisor` keeps one :class:`Supervised` record per
service and talks to it through the small :class:`RecordKeeper` protocol, so the
per-service policy lives here and the supervisor's own lifecycle there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import weakref
from typing import Final, Protocol

from .._core.errors import StartTimeout
from .._core.restart import RestartPolicy, RestartTracker
from .._services.base import Service, ServiceInterrupted
from .._services.schedule import ScheduledService
from .calls import call_service
from .order import DependencyRestart
from .status import ServiceState, ServiceStatus

__all__ = ["LAST_CHANCE", "SERVICE_OF", "SHUTDOWN_OVERRUN", "RecordKeeper", "Supervised"]

logger: Final = logging.getLogger("offloop.supervisor")

#: Every service gets at least this long to stop politely, even when an
#: earlier one used up the whole grace period: a well-behaved service that
#: stops in a millisecond should not be abandoned because a neighbour hung.
LAST_CHANCE: Final = 0.1

#: How far past ``grace`` a whole shutdown may run, however many services hang:
#: the one being stopped when the time ran out gets its last chance and a
#: moment to end once killed, then all the others together get the same.
SHUTDOWN_OVERRUN: Final = 4 * LAST_CHANCE

#: The service whose code runs in this context: set by each service's runner
#: task, so every task the service starts (and every call it sends to a worker
#: thread or a loop thread, which copy the context) inherits it. Neither the
#: shutdown nor a start may wait for itself in one of them (see
#: Shutdown._own_service, its one reader).
SERVICE_OF: Final[contextvars.ContextVar[Supervised | None]] = contextvars.ContextVar(
    "offloop_service_of", default=None
)

_ST = ServiceState


class RecordKeeper(Protocol):
    """The supervisor keeping a :class:`Supervised` record, as the record sees it.

    The record asks it whether a shutdown is under way and tells it when its
    service failed beyond its policy, was interrupted, or ended.
    """

    name: str
    grace: float

    def _fail(self, e: Supervised, crash: Exception | None, why: str) -> None: ...

    async def _restarting(self, e: Supervised) -> None: ...

    async def _before_start(self, e: Supervised) -> None: ...

    def _check_start(self) -> None: ...

    def _ready_again(self, e: Supervised) -> None: ...

    def _shutting_down(self) -> bool: ...

    def _check_all_ended(self) -> None: ...

    def _interrupted(self, e: Supervised) -> None: ...


class Supervised:
    """The supervisor's record of one service: its policy, live state and runner task."""

    def __init__(
        self,
        service: Service,
        policy: RestartPolicy,
        supervisor: RecordKeeper,
        *,
        depends_on: tuple[str, ...] = (),
        oneshot: bool = False,
        on_dependency_restart: DependencyRestart = "restart",
    ) -> None:
        self.service = service
        # The names of the services started (and ready) before this one.
        self.depends_on = depends_on
        # Whether a restart of a dependency stops it and starts it again (cascade.py).
        self.on_dependency_restart: DependencyRestart = on_dependency_restart
        # The dependencies whose restart holds it stopped (cascade.py); it
        # starts again once the last of them is ready.
        self.held: set[str] = set()
        # The dependency whose restart stopped it, until it is ready again.
        self.restarting_with: str | None = None
        # The dependencies it waits for to be ready (again) before it starts (cascade.py).
        self.waiting_for: tuple[str, ...] = ()
        # True while it sleeps out an infinite backoff: it never comes back by itself.
        self.parked = False
        # How the run before the last park ended: its error, or None when it returned.
        self.parked_after: BaseException | None = None
        # Restarts caused by a dependency's: not in 'restarts', nor its budget.
        self.dependency_restarts = 0
        # Set while a dependency's restart is stopping it: a shutdown waits for that stop.
        self.held_stop: asyncio.Future[None] | None = None
        # Meant to finish: ready (for its dependents) once it has, and then DONE.
        self.oneshot = oneshot
        self.name: str = service.name
        self.policy = policy
        self.supervisor = supervisor
        # Its own log lines name the supervisor too (base.supervisor_name).
        service._supervisor = weakref.ref(supervisor)
        self.tracker = RestartTracker(policy)
        self.state = _ST.STOPPED  # not started yet
        self.restarts = 0
        self.started_at: float | None = None
        self.last_error: BaseException | None = None
        self.runner: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[None] | None = None
        self.stopping = False
        # True while the runner stops a service whose start timed out.
        self.aborting = False
        # Whether the stop under way has killed the service: kill() is called once.
        self.killed = False
        # Kills in all: the shutdown names those it had to kill (see Shutdown).
        self.kills = 0
        # Whether start() has returned once: an error before that is a
        # start-up error, not a crash (see RestartPolicy.retry_startup).
        self.been_ready = False
        # Loop time until which a crash of the first run is a start-up error
        # too (RestartPolicy.startup_window); None outside that window.
        self.startup_until: float | None = None

    def status(self) -> ServiceStatus:
        """A snapshot for :meth:`Supervisor.status`."""
        svc = self.service
        schedule = svc.schedule if isinstance(svc, ScheduledService) else None
        url = None
        if self.state is _ST.RUNNING:
            found = getattr(svc, "url", None)  # the adapters that listen have one
            url = found if isinstance(found, str) else None
        return ServiceStatus(
            self.name,
            self.state,
            self.restarts,
            self.started_at,
            self.last_error,
            schedule,
            url,
            self.dependency_restarts,
            self.restarting_with,
            self.waiting_for,
            self.killed,
        )

    def end(self, state: ServiceState) -> None:
        """Enter a final state; whoever waits for readiness stops waiting."""
        self.state = state
        # Ended for good (a start after a dependency's restart may have failed):
        # no restart with that dependency is under way any more.
        self.restarting_with = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    def __repr__(self) -> str:
        return f"<Supervised {self.name!r} {self.state.value} restarts={self.restarts}>"

    # -- the runner ------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Run the service until it ends for good: start, wait, apply the restart policy."""
        loop = asyncio.get_running_loop()
        sv, svc = self.supervisor.name, self.service
        SERVICE_OF.set(self)  # this task's own context: see SERVICE_OF
        # Only the first run has a window. A run that ended with its task
        # cancelled (killed in a cascade) never reached the line below that
        # closes it: a new task is a new run, whose start() or crash must not be
        # judged as the first run's.
        self.startup_until = None
        # Its dependencies were ready when this task was made, but one may have
        # been restarted by its policy since: the cascade does not stop a service
        # that has not begun, so it waits here, and begins in the same step.
        await self.supervisor._before_start(self)
        if self.supervisor._shutting_down():
            return  # the shutdown stops the record (it never started)
        while True:
            self.state = _ST.STARTING
            logger.info("%s: starting service %r", sv, self.name)
            crash: Exception | None = None
            try:
                await self._start()
            except Exception as exc:
                crash = exc
            else:
                self.state, self.started_at = _ST.RUNNING, time.time()
                if not self.been_ready and self.policy.startup_window > 0:
                    # Ready (its dependents start now), but still on probation:
                    # a function service is ready before its code did anything.
                    self.startup_until = loop.time() + self.policy.startup_window
                self.been_ready = True
                self.restarting_with = None
                if self.oneshot:
                    # Ready for its dependents once it is done, not now.
                    logger.info("%s: one-shot service %r is running", sv, self.name)
                else:
                    logger.info("%s: service %r is ready", sv, self.name)
                    if self.ready is not None and not self.ready.done():
                        self.ready.set_result(None)
                    self.supervisor._ready_again(self)
                try:
                    await call_service(svc, "wait")
                except Exception as exc:
                    crash = exc
            # Only the first run has a window: once it ended, the service ran.
            early, self.startup_until = self._ran_for(loop.time()), None
            if early is not None and svc.has_worked():
                early = None  # it worked (a scheduled job's run returned): a crash, not a start
            if self.stopping:
                # The shutdown owns the state from here, but an error on the way
                # out (a cleanup that failed) is still worth knowing about.
                if crash is not None:
                    self._crashed_while_stopping(crash)
                return
            if self.supervisor._shutting_down():
                # Shutting down, not yet this service's turn: an end or crash now
                # is final, never a reason to start it again.
                if crash is not None:
                    self._crashed_while_stopping(crash)
                self.end(_ST.STOPPED)
                return
            if crash is None and self.oneshot:
                logger.info("%s: one-shot service %r is done", sv, self.name)
                self.end(_ST.DONE)
                self.supervisor._ready_again(self)
                self.supervisor._check_all_ended()
                return
            if crash is None:
                if not self.policy.restarts_after(crashed=False):
                    logger.info("%s: service %r returned; it is stopped", sv, self.name)
                    self.end(_ST.STOPPED)
                    self.supervisor._check_all_ended()
                    return
                logger.info("%s: service %r returned (restart='always')", sv, self.name)
            elif isinstance(crash, ServiceInterrupted):
                self.last_error = crash
                logger.warning("%s: %s", sv, crash)
                self.end(_ST.STOPPED)
                self.supervisor._interrupted(self)
                return
            elif (not self.been_ready or early is not None) and not self.policy.retry_startup:
                # Failed before it was ever ready (a port in use, a missing path)
                # or within its start-up window (a bad token on its first call).
                # No restart fixes a configuration, and retrying it through the
                # backoff would only surface the error tens of seconds later.
                self.last_error = crash
                logger.error(
                    "%s: service %r failed to start: %r",
                    sv,
                    self.name,
                    crash,
                    exc_info=_trace(crash),
                )
                self.supervisor._fail(self, crash, self._startup_failure(early, crash))
                return
            else:
                self.last_error = crash
                logger.error(
                    "%s: service %r crashed: %r", sv, self.name, crash, exc_info=_trace(crash)
                )
                if not self.policy.restarts_after(crashed=True):
                    self.supervisor._fail(self, crash, "it crashed and its policy is restart='no'")
                    return
            delay = self.tracker.next_delay(loop.time())
            if delay is None:
                p = self.policy
                why = (
                    f"it needed more than max_restarts={p.max_restarts} restarts within "
                    f"restart_window={p.restart_window:g}s"
                )
                self.supervisor._fail(self, crash, why)
                return
            self.state = _ST.RESTARTING
            # Its dependents stop first (reverse order) and start again once
            # it is ready; the backoff below begins once they have stopped.
            await self.supervisor._restarting(self)
            # Counted once it happens: a stop during the backoff cancels it.
            upcoming = self.restarts + 1
            if delay < math.inf:
                logger.warning(
                    "%s: restarting service %r in %.2fs (restart #%d)",
                    sv,
                    self.name,
                    delay,
                    upcoming,
                )
                await asyncio.sleep(delay)
            else:
                logger.warning(
                    "%s: service %r waits for the supervisor to stop: its backoff is "
                    "infinite, so restart #%d never comes",
                    sv,
                    self.name,
                    upcoming,
                )
                self.parked, self.parked_after = True, crash
                try:
                    # A start waiting for it would wait for ever: it fails instead.
                    self.supervisor._check_start()
                    if self.state is _ST.FAILED:
                        return  # it was the service the start waited for
                    await asyncio.sleep(delay)  # until a stop cancels it
                finally:
                    self.parked = False
            if self.supervisor._shutting_down():
                self.end(_ST.STOPPED)
                return
            self.restarts = upcoming

    async def _start(self) -> None:
        """Await the service's ``start()``, within its ``start_timeout`` if it has one.

        Raises:
            StartTimeout: ``start()`` did not return in time; it was cancelled
                and the service stopped (killed if it did not stop by ``grace``).
        """
        limit = self.policy.start_timeout
        if limit is None:
            await call_service(self.service, "start")
            return
        loop = asyncio.get_running_loop()
        # A task of its own, waited for with a bound: wait_for() would wait
        # for ever for a start() that swallows its cancellation.
        starter = loop.create_task(
            call_service(self.service, "start"), name=f"offloop-start-{self.name}"
        )
        try:
            await asyncio.wait({starter}, timeout=limit)
        except BaseException:
            # Stopped during its start (the runner is cancelled): the start is
            # cancelled too, and the runner ends with it, as without a limit.
            starter.cancel()
            starter.add_done_callback(self._late_start_done)
            try:
                await asyncio.wait({starter})
            except BaseException:  # killed: so is the start that ignored its cancellation
                starter.cancel()
                raise
            raise
        if starter.done():
            starter.result()  # its error, if it failed
            return
        await self._abort_start(loop, starter, limit)
        raise StartTimeout(
            f"The start() of service {self.name!r} did not return within start_timeout={limit:g}s."
        )

    async def _abort_start(
        self, loop: asyncio.AbstractEventLoop, starter: asyncio.Task[None], limit: float
    ) -> None:
        # As a shutdown stops a service during its start: start() is cancelled
        # and stop() cleans up what it began; by grace, else kill().
        logger.warning(
            "%s: service %r did not become ready within start_timeout=%gs; cancelling its "
            "start and stopping it",
            self.supervisor.name,
            self.name,
            limit,
        )
        starter.cancel()
        starter.add_done_callback(self._late_start_done)
        self.aborting = True
        try:
            cutoff = loop.time() + max(self.supervisor.grace, LAST_CHANCE)
            await self._stop_or_kill(loop, cutoff, starter)
        finally:
            self.aborting = False

    def _ran_for(self, now: float) -> float | None:
        """How long the first run ran, if it ended within its start-up window; else None."""
        until = self.startup_until
        if until is None or now >= until:
            return None
        return now - (until - self.policy.startup_window)

    def _startup_failure(self, early: float | None, crash: Exception) -> str:
        """Why the supervisor fails: the service failed to start."""
        how = "add the service with retry_startup=True to retry its start-up"
        if isinstance(crash, StartTimeout):
            return (
                f"it did not become ready within start_timeout={self.policy.start_timeout:g}s "
                f"(its start() was cancelled and the service stopped), and a failure to "
                f"start is not retried; raise start_timeout if it needs longer to start, or "
                f"{how} as its restart policy says"
            )
        if early is None:
            return (
                f"it failed to start (before it was ready), which is not retried; fix the "
                f"error, or {how} as its restart policy says"
            )
        window = self.policy.startup_window
        return (
            f"it crashed {early:.2f}s after it started, within its "
            f"startup_window={window:g}s, so it failed to start, which is not retried; fix "
            f"the error, or {how} as its restart policy says"
        )

    def _crashed_while_stopping(self, crash: BaseException) -> None:
        self.last_error = crash
        if isinstance(crash, StartTimeout):
            return  # logged when it happened; the stop under way is the shutdown's
        logger.error(
            "%s: service %r crashed while stopping: %r",
            self.supervisor.name,
            self.name,
            crash,
            exc_info=crash,
        )

    # -- the stop --------------------------------------------------------------------------

    def renew_ready(self) -> None:
        """Make ``ready`` pending again (a restart with a dependency): done means up now."""
        if self.ready is not None and self.ready.done():
            self.ready = asyncio.get_running_loop().create_future()

    def _stopped(self, hold: str | None) -> None:
        if hold is not None and not self.supervisor._shutting_down():
            # Held until its dependency is ready again; nothing of it runs.
            self.state = _ST.RESTARTING
            self.renew_ready()
        else:
            self.held.clear()
            self.restarting_with = None
            self.end(_ST.STOPPED)

    async def stop(self, deadline: float, *, hold: str | None = None) -> None:
        """Stop the service politely by ``deadline`` (loop time), else kill it; never raises.

        Returns by ``max(deadline, now + LAST_CHANCE) + LAST_CHANCE`` whatever the
        service's ``stop()`` does: one that ignores its cancellation is left behind.
        ``hold``: the dependency whose restart stops it; it is then left
        ``restarting`` (unless the supervisor is stopping), to be started again.
        """
        loop = asyncio.get_running_loop()
        pending = self.held_stop
        if pending is not None and not pending.done():
            # A dependency's restart is stopping it: that stop began earlier
            # with the same grace, so it ends before this one's deadline.
            await asyncio.wait({pending})
            if hold is None and self.state is _ST.RESTARTING:
                self._stopped(None)
            return
        if hold is None:
            await self._stop(loop, deadline, None)
            return
        self.held_stop = loop.create_future()
        try:
            await self._stop(loop, deadline, hold)
        finally:
            self.held_stop.set_result(None)

    async def _stop(
        self, loop: asyncio.AbstractEventLoop, deadline: float, hold: str | None
    ) -> None:
        sv, runner = self.supervisor.name, self.runner
        if self.state in (_ST.STOPPED, _ST.FAILED, _ST.DONE):
            if self.state is _ST.STOPPED and runner is not None and not runner.done():
                runner.cancel()  # waiting for its dependencies before its first start
                await asyncio.wait({runner}, timeout=LAST_CHANCE)
            return
        if runner is None:  # never started
            self._stopped(hold)
            return
        if self.aborting:
            # Its start timed out and the runner is stopping it already: a
            # second stop() beside that one would only race it. That stop has
            # its own cutoff, which may end after this one's (its start timed
            # out during a shutdown): the service is killed by this one's.
            self.stopping = True
            self.state = _ST.STOPPING
            cutoff = max(deadline, loop.time() + LAST_CHANCE)
            await asyncio.wait({runner}, timeout=cutoff - loop.time())
            if not runner.done():
                await self._kill_and_end(
                    "did not stop within the grace period after its start timed out", runner
                )
            self._stopped(hold)
            logger.info("%s: service %r stopped", sv, self.name)
            return
        # The runner may already be done with the service still up: asyncio.run()
        # on Python 3.10 cancels every task on Ctrl-C, runners included. So the
        # state decides what to stop, not the runner.
        self.stopping = True
        if self.state is _ST.RESTARTING:  # sleeping before a restart: nothing runs
            runner.cancel()
            await asyncio.wait({runner})
            self._stopped(hold)
            logger.info("%s: service %r stopped", sv, self.name)
            return
        was_starting = self.state is _ST.STARTING
        self.state = _ST.STOPPING
        logger.info("%s: stopping service %r", sv, self.name)
        if was_starting:
            runner.cancel()  # interrupt start(); stop() below cleans up what it began
        # One cutoff for the polite part, stop() and then the runner: each wait
        # starting its own last chance made one service overrun by several.
        await self._stop_or_kill(loop, max(deadline, loop.time() + LAST_CHANCE), runner)
        self._stopped(hold)
        logger.info("%s: service %r stopped", sv, self.name)

    async def _stop_or_kill(
        self, loop: asyncio.AbstractEventLoop, cutoff: float, task: asyncio.Task[None]
    ) -> None:
        """Call ``stop()`` and wait for ``task`` (the runner, a start) to end by ``cutoff``.

        Else kill the service and cancel ``task``; returns by ``cutoff + LAST_CHANCE``.
        """
        sv = self.supervisor.name
        polite, self.killed = False, False
        why = "did not stop within the grace period"
        # A task, not wait_for(): on timeout, wait_for() waits for the cancelled
        # stop() to end, which is forever if it swallows the cancellation.
        stopper = loop.create_task(
            call_service(self.service, "stop"), name=f"offloop-stop-{self.name}"
        )
        try:
            await asyncio.wait({stopper}, timeout=cutoff - loop.time())
        except BaseException:  # the shutdown itself is cancelled: take the stop along
            stopper.cancel()
            raise
        if not stopper.done():
            stopper.cancel()
            stopper.add_done_callback(self._late_stop_done)
        elif stopper.cancelled():
            pass  # stop() gave up by itself: no polite stop
        elif (error := stopper.exception()) is not None:
            self.last_error = error
            logger.error("%s: stopping service %r raised", sv, self.name, exc_info=error)
            why = "could not be stopped politely (its stop() raised)"
        else:
            await asyncio.wait({task}, timeout=max(cutoff - loop.time(), 0))
            polite = task.done()
        if not polite:
            await self._kill_and_end(why, task)

    async def _kill_and_end(self, why: str, task: asyncio.Task[None]) -> None:
        """Kill the service, cancel ``task`` (its runner or start) and give it LAST_CHANCE."""
        self._kill(why)
        task.cancel()
        await asyncio.wait({task}, timeout=LAST_CHANCE)

    def _late_stop_done(self, stopper: asyncio.Task[None]) -> None:
        # The stop() that outlived the grace period ended after all.
        self._log_late_error(stopper, "stopping service %r raised after it was killed")

    def _late_start_done(self, starter: asyncio.Task[None]) -> None:
        # A cancelled start() that raised something else on its way out.
        self._log_late_error(starter, "the cancelled start of service %r raised")

    def _log_late_error(self, task: asyncio.Task[None], what: str) -> None:
        # The error of a call nobody waits for any more still belongs in the
        # log (and must not be reported as never retrieved).
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("%s: " + what, self.supervisor.name, self.name, exc_info=error)

    def _kill(self, why: str) -> None:
        if self.killed:
            return  # by the timed-out start's own stop, which the shutdown cut short
        self.killed = True
        self.kills += 1
        sv = self.supervisor.name
        logger.warning("%s: service %r %s; killed it", sv, self.name, why)
        try:
            abandoned = self.service.kill()
        except Exception:
            logger.exception("%s: killing service %r raised", sv, self.name)
            return
        for what in abandoned:
            logger.warning("%s: service %r abandoned %s", sv, self.name, what)


def _trace(crash: Exception) -> Exception | None:
    # The traceback of a timed-out start would show the supervisor's code, not the service's.
    return None if isinstance(crash, StartTimeout) else crash

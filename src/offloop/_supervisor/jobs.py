"""``@sv.every`` and ``@sv.cron``: the Supervisor's decorators for scheduled jobs.

A mixin of :class:`~offloop.Supervisor`, kept apart so that the supervisor's
own module stays about running services; the services themselves are in
``_services/schedule.py``, ``periodic.py`` and ``cron.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .._core.restart import STARTUP_WINDOW, RestartMode, RestartPolicy
from .._services.base import Service
from .._services.schedule import Missed, Overlap
from .order import DependencyRestart, check_on_dependency_restart

__all__ = ["JobDecorators"]

F = TypeVar("F", bound=Callable[..., Any])


class JobDecorators:
    """The scheduling decorators of :class:`~offloop.Supervisor`."""

    def _add(  # pragma: no cover
        self,
        service: Service,
        policy: RestartPolicy,
        depends_on: object = (),
        oneshot: object = False,
        on_dependency_restart: object = "restart",
    ) -> None:
        raise NotImplementedError  # the Supervisor's

    def every(
        self,
        seconds: float,
        *,
        jitter: float = 0.0,
        overlap: Overlap = "skip",
        first: float = 0.0,
        missed: Missed = "skip",
        name: str | None = None,
        restart: RestartMode = "on-failure",
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_restarts: int | None = 5,
        restart_window: float = 60.0,
        depends_on: Iterable[str] = (),
        on_dependency_restart: DependencyRestart = "restart",
        retry_startup: bool = False,
        startup_window: float = STARTUP_WINDOW,
        start_timeout: float | None = None,
    ) -> Callable[[F], F]:
        """Decorator: run the function every ``seconds``, as a service; it is returned unchanged.

        The runs are due at ``start + first + k * seconds``: the schedule does
        not drift, however long a run takes or however late the loop wakes.
        An ``async def`` runs as a task on the supervisor's loop and is
        cancelled when the service stops; a plain ``def`` runs in a thread of
        its own (``offloop-service-<name>``) and receives the service's
        :class:`~offloop.StopToken` if it takes a parameter.

        A run that raises is a crash of the service: the restart policy
        (``restart``, ``backoff``, ... as for :meth:`service`) restarts it.
        If a run had worked before (the failure is most likely outside: an
        API that is down), the restarted schedule goes on with its grid: the
        next run comes at its next due time, so a short outage costs a run
        or two, not the restart budget. Otherwise the restart begins a fresh
        schedule whose first run comes ``first`` seconds later.
        A run that raises within ``startup_window`` seconds of the schedule's
        first start (with ``first=0``, the first run's bad token or missing
        folder) is a failure to start, as for :meth:`service`: not retried
        unless ``retry_startup=True``, the supervisor fails at once.
        :meth:`status` shows the schedule: ``ServiceStatus.schedule`` is a
        :class:`~offloop.ScheduleStatus` (next run, last run's duration and
        error, runs missed or overlapped).

        Args:
            seconds: the period, in seconds (> 0).
            jitter: each run starts up to this many seconds (chosen at random)
                after its due time, so that many processes do not hit a server
                at once; the schedule itself does not move. Less than ``seconds``.
            overlap: when a run is due while the last one still runs:
                ``"skip"`` (default) drops it, ``"queue"`` runs it once the last
                one ends (several due meanwhile make one run), ``"allow"``
                runs them side by side.
            first: seconds from the start to the first run (default 0: at once).
            missed: when runs were missed (reached more than ``min(seconds,
                60 s)`` late, because the loop was blocked or the machine
                slept): ``"skip"`` (default) waits for the next due time,
                ``"run_once"`` makes up for them with one run at once.
            name: the service's name; defaults to the function's name.
            depends_on: services that must be ready before the schedule
                starts (see :meth:`add`).
            on_dependency_restart: ``"restart"`` (default) or ``"keep"``, as
                for :meth:`service`.
            retry_startup: retry a failure to start as the restart policy
                says (as for :meth:`service`).
            startup_window: seconds after the schedule's start during which
                a run that raises is a failure to start (as for
                :meth:`service`; 0 turns it off).
            start_timeout: seconds the schedule's start may take (as for
                :meth:`add`); ``None`` (default): no limit.

        Raises:
            TypeError, ValueError: an argument is of the wrong type or out of
                range, the function takes arguments, or the name is taken;
                nothing is registered then.
            RuntimeError: the supervisor has already started.
        """
        from .._services.periodic import make_every

        check_on_dependency_restart(on_dependency_restart, name)
        policy = RestartPolicy(
            restart,
            backoff,
            max_backoff,
            max_restarts,
            restart_window,
            retry_startup,
            startup_window,
            start_timeout,
        )
        # The schedule is checked now, before the function is known: a bad
        # argument fails at the decorator's line, not at the def below it.
        make_every(
            _probe, seconds, jitter=jitter, overlap=overlap, first=first, missed=missed, name="x"
        )

        def register(fn: F) -> F:
            svc = make_every(
                fn, seconds, jitter=jitter, overlap=overlap, first=first, missed=missed, name=name
            )
            self._add(svc, policy, depends_on, False, on_dependency_restart)
            return fn

        return register

    def cron(
        self,
        expr: str,
        *,
        tz: Any = None,
        overlap: Overlap = "skip",
        missed: Missed = "skip",
        name: str | None = None,
        restart: RestartMode = "on-failure",
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_restarts: int | None = 5,
        restart_window: float = 60.0,
        depends_on: Iterable[str] = (),
        on_dependency_restart: DependencyRestart = "restart",
        retry_startup: bool = False,
        startup_window: float = STARTUP_WINDOW,
        start_timeout: float | None = None,
    ) -> Callable[[F], F]:
        """Decorator: run the function whenever the cron expression ``expr`` says, as a service.

        ``expr`` has the five fields of crontab(5): minute, hour, day of month,
        month, day of week (``"30 18 * * *"``: 18:30 every day;
        ``"*/5 * * * 1-5"``: every five minutes on weekdays). It is read by
        the ``cronsim`` package (``pip install 'offloop[cron]'``). A sixth
        field (seconds, or a year, depending on the library) is refused:
        use :meth:`every` for runs more often than once a minute. The
        schedule follows the wall clock in the time zone ``tz``, so a
        machine that slept, or a clock that was set, is noticed.

        The function runs, crashes and restarts as with :meth:`every`;
        ``overlap``, ``missed`` and the restart policy mean the same. A run is
        missed when it is reached more than a minute late (or after the next
        one is due, whichever is sooner).

        Args:
            expr: the cron expression.
            tz: an IANA time-zone name (``"Europe/Paris"``, ``"UTC"``), a
                ``datetime.tzinfo``, or ``None`` (default) for the machine's
                local time.
            depends_on: services that must be ready before the schedule
                starts (see :meth:`add`).
            on_dependency_restart: ``"restart"`` (default) or ``"keep"``, as
                for :meth:`service`.
            retry_startup: as for :meth:`every`.
            startup_window: as for :meth:`every` (the first run of a cron
                job rarely comes within it).
            start_timeout: as for :meth:`every`.

        Raises:
            TypeError, ValueError: the expression cannot be read, the time zone
                is unknown, another argument is wrong, or the name is taken.
            MissingExtraError: the ``[cron]`` extra is not installed.
            RuntimeError: the supervisor has already started.
        """
        from .._services.cron import make_cron

        check_on_dependency_restart(on_dependency_restart, name)
        policy = RestartPolicy(
            restart,
            backoff,
            max_backoff,
            max_restarts,
            restart_window,
            retry_startup,
            startup_window,
            start_timeout,
        )
        make_cron(_probe, expr, tz=tz, overlap=overlap, missed=missed, name="x")

        def register(fn: F) -> F:
            svc = make_cron(fn, expr, tz=tz, overlap=overlap, missed=missed, name=name)
            self._add(svc, policy, depends_on, False, on_dependency_restart)
            return fn

        return register


def _probe() -> None:
    """A function that passes every check, to check a decorator's arguments on their own."""

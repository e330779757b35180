"""``sv.service`` and ``sv.add``: how services are registered with a Supervisor.

A mixin of :class:`~offloop.Supervisor`, kept apart so that the supervisor's
own module stays about running services; ``_add`` (the checks that need the
supervisor's state) stays there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast, overload

from .._core.restart import STARTUP_WINDOW, RestartMode, RestartPolicy
from .._core.validate import describe
from .._services.base import Service
from .._services.make import Isolate, make_fn_service
from .jobs import JobDecorators
from .order import DependencyRestart, check_on_dependency_restart

__all__ = ["Registration"]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=Service)


class Registration(JobDecorators):
    """The registration methods of :class:`~offloop.Supervisor`.

    The scheduling decorators come from its base, :class:`JobDecorators`.
    """

    @overload
    def service(self, fn: F, /) -> F: ...

    @overload
    def service(
        self,
        /,
        *,
        restart: RestartMode = ...,
        backoff: float = ...,
        max_backoff: float = ...,
        max_restarts: int | None = ...,
        restart_window: float = ...,
        isolate: Isolate | None = ...,
        name: str | None = ...,
        depends_on: Iterable[str] = ...,
        on_dependency_restart: DependencyRestart = ...,
        oneshot: bool = ...,
        retry_startup: bool = ...,
        startup_window: float = ...,
        start_timeout: float | None = ...,
    ) -> Callable[[F], F]: ...

    def service(
        self,
        fn: Any = None,
        /,
        *,
        restart: RestartMode = "on-failure",
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_restarts: int | None = 5,
        restart_window: float = 60.0,
        isolate: Isolate | None = None,
        name: str | None = None,
        depends_on: Iterable[str] = (),
        on_dependency_restart: DependencyRestart = "restart",
        oneshot: bool = False,
        retry_startup: bool = False,
        startup_window: float = STARTUP_WINDOW,
        start_timeout: float | None = None,
    ) -> Any:
        """Decorator: supervise a function as a service; the function is returned unchanged.

        An ``async def`` runs as a task on the supervisor's loop and is stopped
        by cancellation; with ``isolate="loop"`` it runs on its own
        :class:`~offloop.LoopThread` (for coroutines that block their loop). A plain
        ``def`` runs in its own thread named ``offloop-service-<name>``; if it
        takes a parameter, it receives an :class:`~offloop.StopToken` that is
        set when it must stop (``isolate="thread"`` says so explicitly; it is
        refused for an ``async def``). ``isolate="process"`` runs either kind in a
        child process (the function must be defined at a module's top level).

        Args:
            restart: ``"on-failure"`` (default) restarts after a crash,
                ``"always"`` also after the function returned, ``"no"`` never
                (a crash then fails the supervisor).
            backoff: the first restart delay, in seconds; it doubles, with
                jitter, for each restart that follows.
            max_backoff: the longest restart delay, in seconds.
            max_restarts: more than this many restarts within
                ``restart_window`` seconds mark the service failed, and the
                supervisor stops with :class:`~offloop.ServiceFailed`.
            restart_window: the sliding window, in seconds, that
                ``max_restarts`` counts restarts in.
            isolate: where the function runs (see above).
            name: the service's name; defaults to the function's name.
            depends_on: services that must be ready before this one starts
                (see :meth:`add`).
            on_dependency_restart: ``"restart"`` (default): stopped while one
                of ``depends_on`` restarts, started again once it is ready;
                ``"keep"``: left running (see :meth:`add`).
            oneshot: the function is meant to finish (see :meth:`add`).
            retry_startup: retry a failure to start (see :meth:`add`) as the
                restart policy says.
            startup_window: a function service is ready once its task or
                thread runs (a process one once its child imported the
                function), before its code has done anything; a crash within
                this many seconds of that, on its first run, is a failure to
                start: not retried unless ``retry_startup``, the supervisor
                fails at once with :class:`~offloop.ServiceFailed` whose
                ``__cause__`` is the error (a bad token, a missing file). Its
                readiness is not delayed. ``0`` turns it off.
            start_timeout: seconds the service's start may take (see
                :meth:`add`); ``None`` (default): no limit.

        Raises:
            TypeError: ``fn`` is not a function, takes more than the token,
                or ``isolate`` does not fit the function's kind.
            ValueError: a policy value (``startup_window`` too) is out of
                range, or the name is taken.
            NotPicklableError: ``isolate="process"`` with a function a child
                process cannot import.
            RuntimeError: the supervisor has already started.
        """
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

        def register(f: F) -> F:
            self._add(
                make_fn_service(f, isolate, name),
                policy,
                depends_on,
                oneshot,
                on_dependency_restart,
            )
            return f

        if fn is None:
            return register
        return register(fn)

    def add(
        self,
        service: S,
        /,
        *,
        restart: RestartMode = "on-failure",
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_restarts: int | None = 5,
        restart_window: float = 60.0,
        retry_startup: bool = False,
        depends_on: Iterable[str] = (),
        on_dependency_restart: DependencyRestart = "restart",
        oneshot: bool = False,
        startup_window: float = 0.0,
        start_timeout: float | None = None,
    ) -> S:
        """Supervise ``service`` (an adapter or a :class:`~offloop.Service` subclass); return it.

        The restart options mean the same as for :meth:`service`. A service
        whose ``start()`` raises before it was ever ready (a port in use, a
        missing path) is not restarted: the supervisor fails at once with
        :class:`~offloop.ServiceFailed`, whose ``__cause__`` is that error.
        ``retry_startup=True`` retries such errors as the restart policy says
        (for a dependency that may come up later). Once the service has been
        ready, a failing ``start()`` on a restart follows the policy.
        ``startup_window`` (seconds, default 0: none) makes a crash within
        that long of the first ``start()`` returning a failure to start too,
        for a service whose ``start()`` returns before it can tell that it
        works (see :meth:`service`).

        ``start_timeout`` (seconds, default ``None``: no limit), as systemd's
        ``TimeoutStartSec``: a ``start()`` that has not returned by then is
        cancelled and the service stopped (killed if it does not stop within
        ``grace``), which counts as a failure to start (the supervisor fails
        with :class:`~offloop.ServiceFailed` unless ``retry_startup``), or on
        a restart as a crash. Its error is a :class:`TimeoutError`.

        ``depends_on`` names services (added before or after) that must be
        ready before this one starts; it stops before them. When the restart
        policy restarts one of them, this service is stopped first and
        started again once it is ready (``restart``);
        ``on_dependency_restart="keep"`` leaves it running instead, for a
        service that needs its dependencies only to start. ``oneshot=True``:
        a service meant to finish, ``done`` once it returned without an error
        (ready, for its dependents too). See docs/supervisor.md.

        Raises:
            TypeError: ``service`` is not a :class:`~offloop.Service`, or
                ``depends_on`` is not a list of names. (A ``start()``,
                ``wait()`` or ``stop()`` that returns no awaitable fails when
                the supervisor calls it, with a ``TypeError`` naming it.)
            ValueError: a policy value is out of range, the name is taken,
                ``oneshot=True`` with ``restart="always"``, or
                ``on_dependency_restart`` is neither ``"restart"`` nor ``"keep"``.
            RuntimeError: the supervisor has already started.
        """
        if not isinstance(cast(object, service), Service):  # untyped callers exist
            hint = (
                " To supervise a function, decorate it with @sv.service instead."
                if callable(service)
                else ""
            )
            raise TypeError(
                f"Supervisor.add() needs an offloop.Service (e.g. offloop.WSGIService(app)), "
                f"got {describe(service)}.{hint}"
            )
        check_on_dependency_restart(on_dependency_restart, getattr(service, "name", None))
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
        self._add(service, policy, depends_on, oneshot, on_dependency_restart)
        return service

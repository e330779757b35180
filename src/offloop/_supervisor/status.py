"""The states a supervisor and its services go through, and the status snapshot.

Both enums subclass ``str`` so a status compares equal to its plain name
(``status.state == "running"``) and serializes to JSON as that name.
"""

from __future__ import annotations

import enum
import time
import traceback
from dataclasses import dataclass
from typing import Any

from .._services.schedule import ScheduleStatus

__all__ = ["ServiceState", "ServiceStatus", "SupervisorState"]


class ServiceState(str, enum.Enum):
    """Where one supervised service is in its life.

    ``stopped`` (not started yet) -> ``starting`` -> ``running`` ->
    ``stopping`` -> ``stopped``; a crash goes through ``restarting`` back to
    ``starting``, or ends in ``failed`` when the restart policy is exhausted.
    A one-shot service (``oneshot=True``) that finished without an error ends
    in ``done``, which counts as healthy. A service that has not started yet
    is ``stopped`` with ``started_at`` ``None``.
    """

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DONE = "done"

    def __str__(self) -> str:
        return self.value


class SupervisorState(str, enum.Enum):
    """Where a :class:`~offloop.Supervisor` is in its (single) life."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot of one service, as returned by :meth:`Supervisor.status`.

    Attributes:
        name: the service's name.
        state: a :class:`ServiceState`; compares equal to its name, e.g. ``"running"``.
        restarts: how many times the supervisor restarted it (a restart still
            waiting out its backoff is not counted yet).
        started_at: the wall-clock time (``time.time()``) it last became ready,
            or ``None`` if it never did.
        last_error: the exception of its last crash, or ``None``.
        schedule: for a service added with ``@sv.every`` or ``@sv.cron``, its
            :class:`ScheduleStatus` (next run, last run's duration and error);
            else ``None``.
        url: where it listens (``http://host:port``, with the port that
            ``port=0`` bound) while it is running, for services that listen;
            else ``None``.
        dependency_restarts: how many times it was stopped and started again
            because a service it depends on was restarted (not counted in
            ``restarts``, nor against its restart policy).
        restarting_with: while such a restart is under way (from its stop to
            its being ready again), the name of the dependency that caused
            it; else ``None``.
        waiting_for: the names of its dependencies it is waiting for right
            now, to be ready (again) before it starts: before its first start
            (its state is then ``stopped``), or before it starts again after
            such a restart (``restarting``); else ``()``.
        killed: whether its last stop had to kill it: it did not stop within
            the grace period (or its ``stop()`` raised), so its task was
            cancelled again, its process got SIGKILL or its thread was
            abandoned (the log says which, with the thread's stack).
    """

    name: str
    state: ServiceState
    restarts: int
    started_at: float | None
    last_error: BaseException | None
    schedule: ScheduleStatus | None = None
    url: str | None = None
    dependency_restarts: int = 0
    restarting_with: str | None = None
    waiting_for: tuple[str, ...] = ()
    killed: bool = False

    @property
    def uptime(self) -> float | None:
        """Seconds since the service last became ready, while it is running."""
        if self.state is not ServiceState.RUNNING or self.started_at is None:
            return None
        return max(0.0, time.time() - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the error becomes its one-line description).

        A scheduled service's adds ``"schedule"``: :meth:`ScheduleStatus.to_dict`.
        """
        error = None
        if self.last_error is not None:
            error = "".join(
                traceback.format_exception_only(type(self.last_error), self.last_error)
            ).strip()
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "uptime": self.uptime,
            "last_error": error,
            "url": self.url,
            "dependency_restarts": self.dependency_restarts,
            "restarting_with": self.restarting_with,
            "waiting_for": list(self.waiting_for),
            "killed": self.killed,
        }
        if self.schedule is not None:  # only scheduled services have one
            out["schedule"] = self.schedule.to_dict()
        return out

    def __repr__(self) -> str:
        parts = [f"{self.name!r} {self.state.value}", f"restarts={self.restarts}"]
        if self.restarting_with is not None:
            parts.append(f"restarting_with={self.restarting_with!r}")
        if self.waiting_for:
            parts.append(f"waiting_for={self.waiting_for!r}")
        if self.killed:
            parts.append("killed")
        if self.last_error is not None:
            parts.append(f"last_error={self.last_error!r}")
        return f"<ServiceStatus {' '.join(parts)}>"

"""The contract between the Supervisor and the things it supervises.

A service is restartable: after it stopped or crashed, ``start()`` may be
called again and must build fresh runtime resources (a new server, a new
observer). All four coroutines are awaited on the supervisor's event loop.
offloop's own services share one lifecycle on top of this contract
(``lifecycle.py``).

How the Supervisor calls the methods, which services can rely on:

- ``start()``, then ``wait()`` once it returned. After ``wait()`` returns or
  raises, the next call (if any) is ``start()`` again: ``stop()`` is *not*
  called after a crash, so ``wait()`` must leave nothing running when it raises.
- ``stop()`` is called while ``wait()`` is pending, or after a ``start()``
  the shutdown (or its ``start_timeout``) cancelled midway (to clean up what
  it began). It is cancelled
  when the grace period runs out, and then ``kill()`` is called once.
- If ``start()`` raises on a restart, that counts as a crash, retried per the
  policy; the first ``start()`` raising is a failure to start, which is not
  (unless ``retry_startup``).
"""

from __future__ import annotations

import abc
import weakref
from typing import Any

from .._core.errors import OffloopError


class Service(abc.ABC):
    """Base class of everything a :class:`~offloop.Supervisor` can run.

    The supervisor drives one service through ``start()`` (returns once the
    service is ready: its socket listens, its observer runs), ``wait()``
    (returns when the service ends on its own, raises its error when it
    crashes), ``stop()`` (asks politely and returns once it has stopped) and,
    only when ``stop()`` did not finish within the grace period, ``kill()``.

    Subclass it to supervise something offloop has no adapter for.
    """

    #: The name used in logs, :meth:`Supervisor.status` and errors.
    name: str

    # The supervisor it was added to (set by that supervisor): the lines the
    # service logs by itself (a missed run, a task abandoned after kill())
    # start with its name, as the supervisor's own lines do. Weak: the
    # supervisor holds its services, not the other way round.
    _supervisor: weakref.ref[Any] | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the service and return once it is ready to do its job.

        Raises whatever made the start fail; the supervisor fails at once on
        the first start (unless ``retry_startup``), and treats it as a crash
        under the restart policy on a restart.
        """

    @abc.abstractmethod
    async def wait(self) -> None:
        """Return when the service has ended on its own; raise its error if it crashed."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Ask the service to stop and return once it has.

        The supervisor bounds this with its ``grace`` period and calls
        :meth:`kill` when it runs out.
        """

    def has_worked(self) -> bool:
        """Whether the service has shown since it was added that it works.

        The supervisor asks when the service crashes within its
        ``startup_window``: such a crash is a failure to start (a bad token, a
        missing folder), not retried unless ``retry_startup``, unless the
        service has worked, as a scheduled job whose earlier runs returned
        has. The default, for a service that cannot tell, is False.
        """
        return False

    def kill(self) -> list[str]:
        """Force the service down now, without waiting.

        Returns a description (name and current stack) of every thread or
        process that could not be stopped and was abandoned, for the log.
        The default abandons nothing.
        """
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def supervisor_name(service: Service) -> str:
    """The name of the supervisor ``service`` was added to, for its log lines."""
    sv = None if service._supervisor is None else service._supervisor()
    # Outside a supervisor (a service driven by hand) the lines still read alike.
    return "offloop" if sv is None else str(sv.name)


class ServiceInterrupted(OffloopError):
    """A service's own code raised ``KeyboardInterrupt``: its supervisor stops, as on Ctrl-C.

    Private: the supervisor records it as the service's ``last_error``.
    """

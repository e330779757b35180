"""Every exception offloop raises, under one base.

Each subclass also inherits the builtin exception that carries its meaning, so
code that already catches ``RuntimeError`` or ``ImportError`` keeps working::

    OffloopError(Exception)
    ├── PoolClosedError(RuntimeError)         run() on a pool that is closing or closed
    ├── WouldDeadlockError(RuntimeError)      a blocking crossing made on a running loop's thread
    ├── CallerGoneError(RuntimeError)         the side waiting for a crossing went away
    ├── WorkerCrashed(RuntimeError)           the process running a call died
    ├── NotPicklableError(TypeError)          a call's function, argument or result won't pickle
    ├── PoolConnectionError(ConnectionError)  a pool cannot reach, or lost, its cluster's scheduler
    ├── ServiceFailed(RuntimeError)           a supervised service failed beyond its restart policy
    ├── StatusPortError(OSError)              a supervisor cannot listen on its status_port
    ├── LoopBlockedError(AssertionError)      the pytest plugin saw the loop block
    └── MissingExtraError(ImportError)        an optional integration is not installed
"""

from __future__ import annotations

__all__ = [
    "CallerGoneError",
    "LoopBlockedError",
    "MissingExtraError",
    "NotPicklableError",
    "OffloopError",
    "PoolClosedError",
    "PoolConnectionError",
    "ServiceFailed",
    "StatusPortError",
    "WorkerCrashed",
    "WouldDeadlockError",
]


class OffloopError(Exception):
    """Base class of every exception raised by offloop itself."""


class PoolClosedError(OffloopError, RuntimeError):
    """Raised by ``run()`` on a pool that is closing or already closed."""


class WouldDeadlockError(OffloopError, RuntimeError):
    """Raised when a blocking call is made on the thread of a running event loop.

    Blocking there would stop the very loop that has to do the work, so the call
    could never finish. ``await`` the coroutine instead.
    """


class CallerGoneError(OffloopError, RuntimeError):
    """Raised in a sync caller whose crossing's other side went away.

    A worker whose awaiting task was cancelled or whose loop closed; and any
    sync caller (``from_thread``, ``LoopThread.call``) whose coroutine was
    cancelled on its own loop, not by the caller (the ``CancelledError`` is
    its ``__cause__``).
    """


class WorkerCrashed(OffloopError, RuntimeError):
    """Raised for the call whose worker process died while running it, or while starting to.

    The message says which: a worker that dies before it is ready (its
    initializer exits or crashes, a spawned child cannot import the main
    module) is reported as dying at start-up.

    Attributes:
        exitcode: the worker's exit code, negative for the signal that killed it.
        pid: the process id of the dead worker.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid


class NotPicklableError(OffloopError, TypeError):
    """Raised when a process call's function, argument or result cannot be pickled."""


class PoolConnectionError(OffloopError, ConnectionError):
    """Raised by a ``DaskPool`` call when the pool cannot reach its Dask scheduler.

    Either no scheduler answered at the pool's address within its
    ``connect_timeout`` (the message names the address), or the connection
    was lost while the call ran or waited there, so its outcome is lost. The
    pool stays open: a later call connects again. The error from the network
    or from the cluster's client is its ``__cause__``.
    """


class ServiceFailed(OffloopError, RuntimeError):
    """Raised when a supervised service failed beyond its restart policy.

    Attributes:
        service: the name of the service that failed.
    """

    def __init__(self, message: str, *, service: str):
        super().__init__(message)
        self.service = service


class StatusPortError(OffloopError, OSError):
    """Raised when a supervisor cannot listen on its ``status_port`` (in use, not allowed).

    Nothing has started when it is raised. ``errno`` is the bind's (for
    example ``errno.EADDRINUSE``); ``port`` and ``host`` say where it tried.
    """

    def __init__(self, message: str, *, errno: int | None, host: str, port: int):
        super().__init__(message)
        self.errno = errno
        self.host = host
        self.port = port


class LoopBlockedError(OffloopError, AssertionError):
    """Raised by the pytest plugin when the event loop blocked longer than allowed."""


class MissingExtraError(OffloopError, ImportError):
    """Raised when an integration's optional dependency is not installed.

    The message names the extra to install, e.g. ``pip install 'offloop[flask]'``.
    """

"""How a DaskPool call's failures reach its awaiter: Dask's errors in offloop's terms.

Dask reports a result that cannot be pickled, workers that kept dying, a
closed client and a lost scheduler with its own exceptions, whose messages
name neither the call nor what to do. These functions turn them into
:class:`NotPicklableError`, :class:`WorkerCrashed`, :class:`PoolClosedError`
and :class:`PoolConnectionError` with the original as ``__cause__``; any
other exception (the function's own) passes unchanged.
``named`` is how the pool names itself in messages (``DaskPool 'tcp://...'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._core.errors import (
    NotPicklableError,
    PoolClosedError,
    PoolConnectionError,
    WorkerCrashed,
)
from .._core.validate import describe
from .pickling import RemoteTraceback

__all__ = ["client_closed", "connection_lost", "last_line", "load_failed", "translate"]


def translate(
    named: str,
    distributed: Any,
    fn: Callable[..., Any],
    exc: BaseException,
    future: Any,
    client: Any,
    *,
    own_client: bool = False,
) -> BaseException:
    """The error the awaiter of ``fn``'s call gets for ``exc``, raised while it ran on Dask.

    ``own_client``: ``client`` is one the pool opened, which nobody else
    closes or cancels tasks of; its calls fail this way only when the
    scheduler went away.
    """
    original = exc  # isinstance() against distributed's classes (Any) would untype exc
    gone = (distributed.client.ClosedClientError, distributed.client.FutureCancelledError)
    if (
        own_client
        and client is not None
        and client.status != "running"
        # Before its task existed, the call waited for its big arguments to be
        # scattered: without a scheduler that fails with the comm's error (a
        # connect timeout, CommClosedError), both OSErrors.
        and (isinstance(exc, gone) or (future is None and isinstance(exc, OSError)))
    ):
        error: BaseException = connection_lost(
            f"{named}: the connection to the Dask scheduler was lost while {describe(fn)} "
            f"ran or waited there, so its outcome is lost."
        )
    elif isinstance(exc, TypeError) and future is not None and future.status == "finished":
        # A task that finished but whose result would not come back: it
        # cannot be pickled (Dask says so in a TypeError).
        error = NotPicklableError(
            f"{named}: {describe(fn)} ran on a Dask worker, but its result "
            f"cannot be pickled to send it back ({last_line(exc)}). Return plain data "
            f"instead (e.g. a path instead of an open file)."
        )
    elif isinstance(exc, distributed.KilledWorker):
        error = WorkerCrashed(
            f"{named}: the workers running {describe(fn)} died while running it, "
            f"as many times as the scheduler allows ({exc}). Only this call failed; look "
            f"at the workers' logs for what killed them (memory limit, segfault)."
        )
    elif isinstance(exc, distributed.client.FutureCancelledError) and (
        client is not None and client.status not in ("closing", "closed")
    ):
        return original  # cancelled on the cluster by someone else: Dask's own error says so
    elif isinstance(exc, gone):
        error = client_closed(named, fn)
    else:
        return original
    error.__cause__ = exc
    return error


def connection_lost(what: str) -> PoolConnectionError:
    """The error for a call or a scatter failed by the pool's client losing its scheduler."""
    return PoolConnectionError(
        f"{what} The pool's client tries to reconnect for connect_timeout seconds; a later "
        f"call uses it again, or connects anew (a PoolConnectionError names the address if "
        f"no scheduler answers)."
    )


def client_closed(named: str, fn: Callable[..., Any] | None) -> PoolClosedError:
    """The error for a call (or, with ``fn=None``, the pool) whose client was closed."""
    what = f"{describe(fn)} cannot run or finish" if fn is not None else "it takes no calls"
    return PoolClosedError(
        f"{named}: its distributed.Client was closed, so {what}. Close the pool "
        f"before its client, or create a new DaskPool with an open client."
    )


def load_failed(named: str, fn: Callable[..., Any], reply: tuple[Any, ...]) -> NotPicklableError:
    """The error for a call the worker could not unpickle (``reply`` is the runner's)."""
    error = NotPicklableError(
        f"{named}: the Dask worker could not unpickle the call of {describe(fn)} "
        f"({reply[1]}). Functions and classes are sent by reference: their module must be "
        f"importable on the workers (install it there, or send it with "
        f"client.upload_file())."
    )
    error.__cause__ = RemoteTraceback(reply[2], "the Dask worker")
    return error


def last_line(exc: BaseException) -> str:
    """The last line of ``exc``'s message: the pickler's own error, after Dask's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__

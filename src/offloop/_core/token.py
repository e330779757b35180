"""Cooperative stop tokens and the per-thread record of the call a worker runs.

A :class:`StopToken` is created for every offloaded call, so it must be cheap:
it is a flag, and the ``threading.Event`` behind :meth:`StopToken.wait` is only
built the first time somebody waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, final

logger: Final = logging.getLogger("offloop")

__all__ = ["StopToken", "current_token"]

# One lock for the lazy creation of every token's Event: creation is rare
# (only waiters need it), so contention is not a concern.
_EVENT_LOCK: Final = threading.Lock()


@final
class StopToken:
    """A flag that tells a blocking function it should stop.

    Every call sent to a worker gets its own token; inside the worker,
    :func:`current_token` returns it. offloop sets it when the awaiting task is
    cancelled, when the pool closes, or when a service must stop. Long-running
    functions poll it::

        def crunch(items):
            token = offloop.current_token()
            for item in items:
                if token:          # same as token.is_set()
                    return None    # stop early, cooperatively
                work(item)

    Tokens can also be created and set by hand, e.g. to stop a thread service.
    """

    __slots__ = ("__weakref__", "_callbacks", "_event", "_flag", "_reason")

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None
        self._reason: str | None = None
        self._callbacks: list[Callable[[StopToken], object]] | None = None

    def set(self, reason: str | None = None) -> None:
        """Ask the holder to stop. Thread-safe; setting twice keeps the first reason.

        Not from a ``signal.signal`` handler: it runs in the main thread, which
        may hold the lock this takes. Hand the request to another thread there
        (``queue.SimpleQueue.put`` is safe in a handler), or use
        ``loop.add_signal_handler``.
        """
        if not self._flag:
            self._reason = reason
        # The flag is written before the event is read, and wait() creates the
        # event before reading the flag, so one of the two always sees the other.
        self._flag = True
        event = self._event
        if event is not None:
            event.set()
        # Taken after the flag is written: add_callback() checks the flag under
        # this lock, so a callback is either swapped out here or run at once there.
        with _EVENT_LOCK:
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            self._run_callback(callback)

    def add_callback(self, callback: Callable[[StopToken], object]) -> None:
        """Call ``callback(token)`` once when the token is set (at once if it already is).

        The callback runs in the thread that sets the token, so it must be
        quick and thread-safe, e.g. ``loop.call_soon_threadsafe(...)``. An
        exception it raises is logged (``offloop`` logger) and ignored.
        """
        with _EVENT_LOCK:
            if not self._flag:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        self._run_callback(callback)

    def _run_callback(self, callback: Callable[[StopToken], object]) -> None:
        # Whoever sets the token (a cancellation, a pool closing) must not get
        # a callback's exception instead of finishing its own work, and the
        # other callbacks must still run: log it instead.
        try:
            callback(self)
        except Exception:
            logger.exception("offloop: a StopToken callback %r raised; it was ignored", callback)

    def remove_callback(self, callback: Callable[[StopToken], object]) -> None:
        """Forget a callback added with :meth:`add_callback`; unknown callbacks are ignored."""
        with _EVENT_LOCK:
            if self._callbacks is not None:
                with contextlib.suppress(ValueError):
                    self._callbacks.remove(callback)

    def is_set(self) -> bool:
        """Return ``True`` once the holder has been asked to stop."""
        return self._flag

    def __bool__(self) -> bool:
        return self._flag

    @property
    def reason(self) -> str | None:
        """Why the token was set (e.g. ``"cancelled"``), or ``None``."""
        return self._reason

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token is set or ``timeout`` seconds pass.

        Returns ``True`` if the token is set. Use it instead of ``time.sleep``
        in a loop so a stop request ends the sleep at once.
        """
        if self._flag:
            return True
        event = self._event
        if event is None:
            with _EVENT_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                    # set() may have run since the check above.
                    if self.is_set():
                        event.set()
        return event.wait(timeout)

    def __repr__(self) -> str:
        if self._flag:
            return f"<StopToken set reason={self._reason!r}>"
        return "<StopToken not set>"


class CallInfo(Protocol):
    """What a worker thread is running now, as ``from_thread`` and tokens see it."""

    @property
    def fn(self) -> Callable[..., Any]:
        """The function being run."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop that sent the work (``None`` when no loop did)."""

    @property
    def token(self) -> StopToken:
        """The call's stop token."""


class WorkerCall:
    """A plain :class:`CallInfo`: its token and the loop that sent it.

    Kept in a thread-local so :func:`current_token` and ``from_thread`` can
    find the caller's loop without the user passing it around.
    """

    __slots__ = ("fn", "loop", "token")

    def __init__(
        self, fn: Callable[..., Any], loop: asyncio.AbstractEventLoop | None, token: StopToken
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.token = token


class _ThreadState(threading.local):
    call: CallInfo | None = None


thread_state: Final = _ThreadState()


def _forget_call_after_fork() -> None:
    # In a child made by os.fork() from a worker thread, the forking thread
    # (the child's only one) still holds the worker's call: its token and the
    # loop that sent it are the parent's, and from_thread() would wait forever
    # on a copy of that loop nobody runs. The child is no worker.
    thread_state.call = None


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_call_after_fork)


def current_call() -> CallInfo | None:
    """The offloop call running on this thread, or ``None`` outside offloop workers."""
    return thread_state.call


def current_token() -> StopToken:
    """Return the :class:`StopToken` of the offloaded call running on this thread.

    Outside an offloop worker (e.g. in a plain thread or on the event loop) it
    returns a fresh token that is never set, so library code can poll it
    unconditionally.
    """
    call = thread_state.call
    if call is None:
        return StopToken()
    return call.token

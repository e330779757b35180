"""Cooperative stop tokens and the per-thread record of the call a worker runs.

A :class:`StopToken` is created for every offloaded call, so it must be cheap:
a flag and two lists, with no lock and no ``threading.Event``.

No lock, because ``set()`` must be safe in a ``signal.signal`` handler: the
handler runs in the main thread between two of its bytecodes, maybe inside
another method of this token (or of any token), and waiting there for a lock
the main thread holds would wait for good. Every method is instead built from
steps the interpreter does in one go (``list.append``, ``list.pop``,
``list.remove``, one attribute store), and stays right when ``set()`` runs
between any two of them, in this thread or in another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, final

logger: Final = logging.getLogger("offloop")

__all__ = ["StopToken", "current_token"]


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

    Tokens can also be created and set by hand, e.g. to stop a thread service,
    from any thread or from a ``signal.signal`` handler.
    """

    __slots__ = ("__weakref__", "_callbacks", "_flag", "_reasons")

    def __init__(self) -> None:
        self._flag = False
        # The reasons of the set() calls that found the flag down: the first
        # one is the token's. Appending is one step, so a set() that
        # interrupts another one between its check and its write (a signal
        # handler) or runs beside it agrees on which came first; a single
        # attribute would take the last write, after callbacks saw another.
        self._reasons: list[str | None] = []
        # Callbacks not run yet, in the order they were added; waiters of
        # wait() are here too, as the release of a lock they block on.
        # Whoever takes one out of the list (set() by pop, add_callback() or
        # remove_callback() by remove) owns it: it runs once, or never.
        self._callbacks: list[Callable[[StopToken], object]] = []

    def set(self, reason: str | None = None) -> None:
        """Ask the holder to stop. Thread-safe; setting twice keeps the first reason.

        Safe in a ``signal.signal`` handler too: it takes no lock, so it never
        waits for the thread it interrupted. It runs the token's callbacks
        there, though (see :meth:`add_callback`): offloop's own are safe in a
        handler, except one of a ``TaskHandle`` (a task a worker started with
        ``Portal.start_task()``), which cancels its ``concurrent.futures``
        future and so runs that future's done callbacks and wakes its
        ``concurrent.futures.wait()`` waiters, whose locks the main thread
        may hold.
        """
        if not self._flag:
            self._reasons.append(reason)
        # The flag is written before the list is emptied, and add_callback()
        # appends before it reads the flag, so a callback is either popped
        # here or taken back and run there.
        self._flag = True
        callbacks = self._callbacks
        while True:
            # One pop per callback: a set() that interrupts this one (a signal
            # handler) or runs beside it (another thread) takes the rest, and
            # no callback is run twice.
            try:
                callback = callbacks.pop(0)
            except IndexError:
                return
            self._run_callback(callback)

    def add_callback(self, callback: Callable[[StopToken], object]) -> None:
        """Call ``callback(token)`` once when the token is set (at once if it already is).

        The callback runs in the thread that sets the token, so it must be
        quick and thread-safe, e.g. ``loop.call_soon_threadsafe(...)``. An
        exception it raises is logged (``offloop`` logger) and ignored.

        If a ``signal.signal`` handler may set the token, the callback runs
        in that handler, on the main thread, between two bytecodes of
        whatever the main thread was doing: it must not take a lock the main
        thread may hold, as that waits forever (``threading.Lock``,
        ``Event.set()``, ``queue.Queue.put()``, ``Semaphore.release()``).
        ``call_soon_threadsafe()`` (asyncio's and uvloop's) and releasing a
        lock nobody else releases are safe. Nor should it raise: the log
        record goes through the logging handlers' locks in the handler.
        """
        if self._flag:
            self._run_callback(callback)
            return
        self._callbacks.append(callback)
        if self.is_set() and self._take_back(callback):
            # set() ran after the check above and may have emptied the list
            # before the append: nobody else will run it.
            self._run_callback(callback)

    def _take_back(self, callback: Callable[[StopToken], object]) -> bool:
        """Remove one entry of ``callback``; ``False`` if set() took it first."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            return False
        return True

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
        self._take_back(callback)

    def is_set(self) -> bool:
        """Return ``True`` once the holder has been asked to stop."""
        return self._flag

    def __bool__(self) -> bool:
        return self._flag

    @property
    def reason(self) -> str | None:
        """Why the token was set (e.g. ``"cancelled"``), or ``None``."""
        reasons = self._reasons
        return reasons[0] if reasons else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token is set or ``timeout`` seconds pass.

        Returns ``True`` if the token is set. Use it instead of ``time.sleep``
        in a loop so a stop request ends the sleep at once.
        """
        if self._flag:
            return True
        # Not a threading.Event: setting one takes its lock, which the main
        # thread holds inside Event.wait(), so set() could not be called from
        # a signal handler. A lock of our own, taken here and released by
        # set(), only ever blocks its waiter.
        waiter = threading.Lock()
        waiter.acquire()
        wake = _Wake(waiter)
        self.add_callback(wake)
        woken = False
        try:
            if timeout is None:
                woken = waiter.acquire()
            elif timeout > 0:
                woken = waiter.acquire(timeout=timeout)
            else:
                woken = waiter.acquire(blocking=False)
        finally:
            # Also on KeyboardInterrupt: the list keeps live waiters only, so
            # a token waited on in a loop does not grow it without bound.
            if not woken:
                self._take_back(wake)
        return self._flag

    def __repr__(self) -> str:
        if self._flag:
            return f"<StopToken set reason={self.reason!r}>"
        return "<StopToken not set>"


@final
class _Wake:
    """The callback of one ``wait()``: releases the lock its waiter blocks on.

    Compared by identity, so ``remove`` takes back this waiter's entry only.
    """

    __slots__ = ("_waiter",)

    def __init__(self, waiter: threading.Lock) -> None:
        self._waiter = waiter

    def __call__(self, token: StopToken) -> None:
        self._waiter.release()


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

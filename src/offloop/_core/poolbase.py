"""What every pool shares: its lifecycle states and ``async with`` behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypedDict, TypeVar

from .errors import PoolClosedError, WouldDeadlockError


class PoolState(enum.Enum):
    """Lifecycle of a pool: OPEN -> CLOSING -> CLOSED."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CallCounters(TypedDict):
    """The counters every worker pool's ``statistics()`` reports."""

    state: str
    max_workers: int
    idle: int
    running: int
    abandoned: int
    queued: int
    completed: int
    failed: int
    cancelled: int


_PoolT = TypeVar("_PoolT", bound="PoolContext")


class PoolContext:
    """``async with pool:`` for every pool: refuses a pool that is not open, closes it on exit."""

    _state: PoolState

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle (OPEN, CLOSING, CLOSED)."""
        return self._state

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _PoolT) -> _PoolT:
        if self._state is not PoolState.OPEN:
            raise PoolClosedError(
                f"{self!r} cannot be entered because it is {self._state.value}; "
                f"create a new {type(self).__name__} instead."
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def complete_waiter(waiter: asyncio.Future[None] | threading.Event) -> None:
    """Wake whoever waits for a pool to close: ``close()`` (an Event) or ``aclose()`` (a future)."""
    if isinstance(waiter, threading.Event):
        waiter.set()
        return

    def complete() -> None:
        if not waiter.done():
            waiter.set_result(None)

    # A closed loop means nobody waits any more.
    with contextlib.suppress(RuntimeError):
        waiter.get_loop().call_soon_threadsafe(complete)


class DefaultPool(Generic[_PoolT]):
    """The process-wide pool behind a shortcut (``to_thread``, ``to_process``).

    Created on first use, and created anew after someone closed it, so a
    shortcut never fails because a test or a shutdown closed the last one.
    """

    def __init__(self, make: Callable[[], _PoolT], *, new_after_fork: bool = False) -> None:
        self._make = make
        self._lock = threading.Lock()
        #: The current pool; read directly by hot paths, which call get() when it is not open.
        self.pool: _PoolT | None = None
        if hasattr(os, "register_at_fork"):  # POSIX
            os.register_at_fork(after_in_child=lambda: self._after_fork(new_after_fork))

    def _after_fork(self, new_pool: bool) -> None:
        # The lock may have been held by another thread at the fork.
        self._lock = threading.Lock()
        if new_pool:
            self.pool = None  # the child makes its own on first use

    def get(self) -> _PoolT:
        """The open default pool, created if there is none."""
        pool = self.pool
        if pool is None or pool._state is not PoolState.OPEN:
            with self._lock:
                pool = self.pool
                if pool is None or pool._state is not PoolState.OPEN:
                    pool = self.pool = self._make()
        return pool


def refuse_blocking_close(pool: object) -> None:
    """Refuse a blocking ``close()`` on a thread whose event loop is running.

    Raises:
        WouldDeadlockError: saying to ``await pool.aclose()`` there instead.
    """
    loop = asyncio._get_running_loop()
    if loop is not None:
        raise WouldDeadlockError(
            f"{pool!r}.close() blocks until the pool's calls finish, and was called on the "
            f"thread of a running event loop ({loop!r}): the loop would stall, or deadlock if "
            f"a call needs it. Use 'await pool.aclose()' there instead."
        )

"""``BoundContext``: an async context manager held open on a loop, used from sync code.

One task on the target loop holds it (``_hold``): it makes the context
manager, enters it, says it is ready with the entered value, and waits for
the exit request. The exit request carries the sync side's exception, so
``__aexit__`` sees what the ``with`` block raised and may suppress it. A
task cancelled (its loop thread closing, interpreter exit for the shared
loop, the worker that entered it stopping) exits the context manager with
the ``CancelledError``: the exit is guaranteed at close.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, final

from .._core.validate import describe
from .crossing import refuse_on_running_loop
from .tasks import TaskHandle, task_ready

__all__ = ["BoundContext", "BoundContextState"]

T = TypeVar("T")

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


class BoundContextState(enum.Enum):
    """Lifecycle of a :class:`BoundContext`: CREATED -> ENTERED -> EXITED."""

    CREATED = "created"
    ENTERED = "entered"
    EXITED = "exited"


_CREATED: Final = BoundContextState.CREATED
_ENTERED: Final = BoundContextState.ENTERED
_EXITED: Final = BoundContextState.EXITED

_INSTEAD: Final = (
    "In async code use 'async with' on the context manager itself, or enter it from a "
    "worker thread (offloop.to_thread)."
)


@final
class BoundContext(Generic[T]):
    """An async context manager entered and exited on a loop, from sync code (``Portal.context``).

    ``with`` it, or call :meth:`enter` and :meth:`exit` yourself; it is
    entered once. Not exited by then, it exits when its loop closes.
    """

    __slots__ = (
        "_args",
        "_factory",
        "_handle",
        "_kwargs",
        "_request",
        "_start_task",
        "_state",
        "_timeout",
    )

    def __init__(
        self,
        start_task: Callable[..., TaskHandle[Any]],
        timeout: float | None,
        factory: Callable[..., AbstractAsyncContextManager[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # The portal's start_task and timeout (the portal imports this module).
        self._start_task = start_task
        self._timeout = timeout
        self._factory = factory
        self._args = args
        self._kwargs = kwargs
        self._state = _CREATED
        self._handle: TaskHandle[bool | None] | None = None
        # Made on the loop by _hold, before it says it is ready.
        self._request: asyncio.Future[ExcInfo] | None = None

    @property
    def state(self) -> BoundContextState:
        """Where the context is in its lifecycle."""
        return self._state

    def enter(self) -> T:
        """Make and enter the context manager on the loop; return what ``__aenter__`` returned.

        Raises:
            RuntimeError: entered before.
            WouldDeadlockError: called on a thread whose event loop is running
                (checked before anything is entered).
            TimeoutError: ``__aenter__`` took longer than the portal's timeout.
            Exception: what the factory or ``__aenter__`` raised.
        """
        # Before the task starts: refused once entered, the context would stay
        # open until its loop closes, with nobody left to exit it.
        refuse_on_running_loop(
            "BoundContext.enter()",
            _INSTEAD,
            why="It blocks until __aenter__ has run on the target loop, which would stall "
            "this loop.",
        )
        if self._state is not _CREATED:
            raise RuntimeError(
                f"{self!r} was entered already; a BoundContext is entered once. Call "
                f"portal.context(...) again for another one."
            )
        self._state = _ENTERED
        self._handle = handle = self._start_task(
            _hold, self, self._factory, self._args, self._kwargs
        )
        try:
            return handle.ready(timeout=self._timeout)  # type: ignore[no-any-return]
        except BaseException:
            self._state = _EXITED
            # Ctrl-C (or any error of the wait itself) leaves the task running:
            # entered later, the context would stay open with nobody to exit it.
            handle.cancel()
            raise

    def exit(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> bool:
        """Exit the context manager on the loop; return ``True`` if it suppressed ``exc``.

        Raises:
            RuntimeError: not entered, or exited before.
            WouldDeadlockError: called on a thread whose event loop is running
                (checked before the exit is asked for).
            TimeoutError: ``__aexit__`` took longer than the portal's timeout
                (it was cancelled).
            Exception: what ``__aexit__`` raised.
        """
        refuse_on_running_loop(
            "BoundContext.exit()",
            _INSTEAD,
            why="It blocks until __aexit__ has run on the target loop, which would stall "
            "this loop.",
        )
        if self._state is not _ENTERED:
            raise RuntimeError(
                f"{self!r} cannot exit: it is {self._state.value}. Exit a context once, after "
                f"entering it."
            )
        self._state = _EXITED
        handle, request = self._handle, self._request
        assert handle is not None
        assert request is not None
        if handle.future.cancelled():
            return False  # cancelled (its loop closing, its worker stopped): exited already
        loop = request.get_loop()
        try:
            loop.call_soon_threadsafe(_request_exit, request, (exc_type, exc, tb))
        except RuntimeError:  # the loop closed, and exited the context with it
            return False
        return bool(handle.result(timeout=self._timeout))

    def __enter__(self) -> T:
        return self.enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.exit(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<BoundContext {describe(self._factory)} {self._state.value}>"


def _request_exit(request: asyncio.Future[ExcInfo], exc_info: ExcInfo) -> None:
    if not request.done():
        request.set_result(exc_info)


async def _hold(
    bound: BoundContext[Any],
    factory: Callable[..., AbstractAsyncContextManager[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool | None:
    cm = factory(*args, **kwargs)
    kind = type(cm)
    if not hasattr(kind, "__aenter__") or not hasattr(kind, "__aexit__"):
        raise TypeError(
            f"Portal.context() needs a factory returning an async context manager, but "
            f"{describe(factory)} returned {describe(cm)}."
        )
    value = await kind.__aenter__(cm)
    bound._request = request = asyncio.get_running_loop().create_future()
    task_ready(value)
    try:
        exc_info = await request
    except BaseException as exc:  # cancelled: the loop closing, or the caller stopping
        if not await kind.__aexit__(cm, type(exc), exc, exc.__traceback__):
            raise
        return True
    return await kind.__aexit__(cm, *exc_info)

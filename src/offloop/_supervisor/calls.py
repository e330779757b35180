"""How the supervisor calls a service's ``start()``, ``wait()`` and ``stop()``.

The supervisor needs only that each call returns something to await: an
``async def`` method, or a plain ``def`` that delegates (``return
self.inner.stop()``), a sync decorator around an ``async def``, a callable
object with an ``async __call__``. What returns anything else is found where
it is called, as a ``TypeError`` naming the service and the method, which
the supervisor handles as that method's error: a ``stop()`` that fails so
is killed, and the other services still stop.
"""

from __future__ import annotations

import inspect
from typing import Literal

from .._core.validate import describe
from .._services.base import Service

__all__ = ["call_service"]


async def call_service(service: Service, method: Literal["start", "wait", "stop"]) -> None:
    """Call ``service.<method>()`` and await what it returns.

    A coroutine (not the bare awaitable), so that it can also be made a task.

    Raises:
        TypeError: the method returned something that cannot be awaited.
        Exception: whatever the method raised.
    """
    result = getattr(service, method)()
    if not inspect.isawaitable(result):
        got = "None" if result is None else describe(result)
        raise TypeError(
            f"The {method}() of service {getattr(service, 'name', '?')!r} ({service!r}) "
            f"returned {got}, not an awaitable. The supervisor awaits start(), wait() and "
            f"stop() on its loop: make {method}() an 'async def' method, or have it return a "
            f"coroutine or future."
        )
    await result

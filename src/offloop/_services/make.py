"""``@Supervisor.service``: pick the service that runs a function where ``isolate`` says."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

from .._core.validate import describe
from .base import Service
from .functions import (
    LoopService,
    TaskService,
    ThreadService,
    check_service_function,
    is_async_function,
    takes_token,
)

__all__ = ["Isolate", "make_fn_service"]

Isolate = Literal["thread", "loop", "process"]


def make_fn_service(fn: Any, isolate: Isolate | None, name: str | None) -> Service:
    """Wrap a function in the service that runs it where ``isolate`` says.

    Raises:
        TypeError, ValueError, NotPicklableError: as documented on ``Supervisor.service``.
    """
    where = "@Supervisor.service"
    check_service_function(fn, where)
    if isolate not in (None, "thread", "loop", "process"):
        raise ValueError(f"isolate must be None, 'thread', 'loop' or 'process', got {isolate!r}.")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty str, got {describe(name)}.")
    # functools.partial has no __name__: name it after the function it wraps.
    named = fn.func if isinstance(fn, functools.partial) else fn
    svc_name = name or str(getattr(named, "__name__", None) or type(named).__name__)
    is_async = is_async_function(fn)
    pass_token = False
    if is_async:
        if isolate == "thread":
            raise TypeError(
                f"{where} got {describe(fn)}, a coroutine function, with "
                f"isolate='thread'. A coroutine runs on an event loop: use isolate='loop' "
                f"to give it its own loop in its own thread."
            )
        if inspect.signature(fn).parameters and any(
            p.default is p.empty for p in inspect.signature(fn).parameters.values()
        ):
            raise TypeError(
                f"{where} got {describe(fn)}, which needs arguments. An 'async def' "
                f"service takes none: it is stopped by cancellation. Bind arguments "
                f"first, e.g. with functools.partial."
            )
    else:
        if isolate == "loop":
            raise TypeError(
                f"{where} got {describe(fn)}, a plain function, with isolate='loop', "
                f"which is for coroutine functions. A plain 'def' already runs in its "
                f"own thread; use isolate=None (or 'thread')."
            )
        pass_token = takes_token(fn, where)
    if isolate == "process":
        # Imported here: multiprocessing is only paid for by those who use it.
        from .process import ProcessService

        return ProcessService(fn, svc_name, is_async=is_async, pass_token=pass_token)
    if is_async:
        return LoopService(fn, svc_name) if isolate == "loop" else TaskService(fn, svc_name)
    return ThreadService(fn, svc_name, pass_token=pass_token)

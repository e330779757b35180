"""Checks of ProcessPool's options that take more than a type test."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from .._core.validate import describe

__all__ = ["check_initializer"]


def check_initializer(initializer: object, initargs: object) -> tuple[Any, ...]:
    """Validate ``initializer`` and ``initargs``; return the arguments as a tuple."""
    where = "ProcessPool(initializer=...)"
    if initializer is not None:
        if not callable(initializer):
            raise TypeError(
                f"{where} must be a function, called as initializer(*initargs) once in each new "
                f"worker, got {describe(initializer)}."
            )
        kind = (
            "a coroutine function"
            if inspect.iscoroutinefunction(initializer)
            else "an async generator function"
            if inspect.isasyncgenfunction(initializer)
            else None
        )
        if kind is not None:
            raise TypeError(
                f"{where} got {describe(initializer)}, {kind}, which would only create an "
                f"object in each worker and never run it. Pass a plain function; it may call "
                f"asyncio.run() on a coroutine."
            )
    if isinstance(initargs, (str, bytes, dict, set, frozenset)) or not isinstance(
        initargs, Iterable
    ):
        raise TypeError(
            f"ProcessPool(initargs=...) must be a tuple of the initializer's arguments, got "
            f"{describe(initargs)}; for a single argument write initargs=(value,)."
        )
    return tuple(initargs)

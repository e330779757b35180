"""Argument checks shared by every entry point: callables, counts, names, seconds.

They run on the hot path, so the common case (a plain function) is decided by
one flag test before anything slower is tried.
"""

from __future__ import annotations

import inspect
import math
from types import BuiltinFunctionType, BuiltinMethodType, FunctionType, MethodWrapperType
from typing import Any, Final

#: Code flags of functions that return a coroutine or an async generator.
ASYNC_CODE_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# Callables implemented in C: never coroutine functions, no need to inspect.
_PLAIN_CALLABLES: Final = frozenset({BuiltinFunctionType, BuiltinMethodType, MethodWrapperType})


def describe(obj: object) -> str:
    """A short description of ``obj`` for error messages."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name:
        return f"{type(obj).__name__} {name!r}"
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(obj).__name__} {text}"


def check_sync_callable(fn: Any, where: str, async_alternative: str) -> None:
    """Reject what cannot run as a sync function in a worker.

    ``where`` names the call (``"offloop.to_thread()"``) and
    ``async_alternative`` the call to use for coroutines.
    """
    kind = type(fn)
    if kind is FunctionType:
        if not fn.__code__.co_flags & ASYNC_CODE_FLAGS:
            return
    elif kind in _PLAIN_CALLABLES or _is_sync_callable(fn):
        return
    if inspect.iscoroutine(fn):
        fn.close()  # no "coroutine was never awaited" warning on top of our error
        raise TypeError(
            f"{where} got a coroutine object ({describe(fn)}), not a function. "
            f"A coroutine does not block a thread: 'await' it directly, or pass the "
            f"coroutine function itself to {async_alternative} to run it on another loop."
        )
    if callable(fn):
        raise TypeError(
            f"{where} got {describe(fn)}, a coroutine function, which would only create a "
            f"coroutine in the worker and never run it. 'await {_name(fn)}(...)' directly, "
            f"or use {async_alternative} to run it on an isolated loop."
        )
    raise TypeError(
        f"{where} needs a callable as its first argument (fn), but got {describe(fn)}. "
        f"Pass the function itself and its arguments separately: {where.rstrip('()')}(fn, *args)."
    )


def check_async_callable(fn: Any, where: str) -> None:
    """Reject what is not a coroutine function for entry points that take one."""
    if inspect.iscoroutine(fn):
        fn.close()
        raise TypeError(
            f"{where} needs the coroutine function and its arguments, but got a coroutine "
            f"object ({describe(fn)}). Write {where.rstrip('()')}(fn, *args) instead of "
            f"{where.rstrip('()')}(fn(*args))."
        )
    if not callable(fn):
        raise TypeError(
            f"{where} needs a coroutine function as its first argument, but got {describe(fn)}."
        )


def check_positive_int(value: object, name: str, *, allow_none: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is an int >= 1."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {describe(value)}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")


def show_number(value: object) -> str:
    """``repr(value)``, or its digit count when too long to quote in a message."""
    text = repr(value)
    return text if len(text) <= 24 else f"a {len(text.lstrip('-'))}-digit number"


def check_seconds(
    value: object,
    name: str,
    *,
    where: str | None = None,
    positive: bool,
    finite: bool = False,
    low: float | None = None,
    high: float | None = None,
    why_low: str = "",
) -> float:
    """Return ``value`` (an int or float, not a bool) as float seconds, or raise naming ``name``.

    NaN and negative values are always refused; ``positive=True`` refuses 0
    too. ``finite=True`` refuses infinity, for durations something waits out
    (a grace period); a restart window or backoff may well be infinite.
    ``low``/``high`` bound the range, ``why_low`` says why less than ``low``
    is refused.

    The messages say ``"{name} must be ..."``, or, given ``where`` (the call,
    such as ``"LoopWatch()"``), ``"{where} needs {name} to be ..."``.

    Raises:
        TypeError: ``value`` is not a number.
        ValueError: ``value`` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if where is None:
            raise TypeError(f"{name} must be a number of seconds, got {describe(value)}.")
        raise TypeError(
            f"{where} needs {name} as a number of seconds (e.g. {name}=0.1), got {describe(value)}."
        )
    must = f"{name} must be" if where is None else f"{where} needs {name} to be"
    shown = show_number(value)
    if not (value > 0 if positive else value >= 0):  # NaN too
        if not positive:
            bound = "at least 0"
        else:  # each wording reads on from its voice's verb
            bound = "greater than 0" if where is None else "a positive number of"
        raise ValueError(f"{must} {bound} seconds, got {shown}.")
    if low is not None and value < low:
        why = f": {why_low}" if why_low else ""
        raise ValueError(
            f"{must} at least {low:g} seconds, got {shown}{why}. Pass {name}={low:g} or more."
        )
    if high is not None and value > high:
        raise ValueError(
            f"{must} at most {high:g} seconds, got {shown}. Pass a number of seconds up to "
            f"{high:g}."
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int with more than about 308 digits
        instead = "a large number (for example 86400 for a day)" if finite else "float('inf')"
        raise ValueError(
            f"{must} a number of seconds a float can hold, got {shown}. Pass {instead} instead."
        ) from None
    if finite and math.isinf(seconds):
        raise ValueError(
            f"{must} a finite number of seconds, got {shown}. For a very long wait, pass a "
            f"large number instead (for example 86400 for a day)."
        )
    return seconds


def _is_sync_callable(fn: Any) -> bool:
    return callable(fn) and not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


def _name(fn: Any) -> str:
    return str(getattr(fn, "__name__", "fn"))


def check_thread_name(name: object, where: str) -> str | None:
    """Validate the optional ``name`` of a pool or loop thread; ``where`` names the class.

    Raises:
        TypeError: ``name`` is neither None nor a str.
        ValueError: ``name`` is empty.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{where}(name=...) must be a str, got {describe(name)}.")
    if name == "":
        raise ValueError(
            f"{where}(name=...) must not be empty: it names the threads. Pass a name, or "
            f"None for a numbered one."
        )
    return name

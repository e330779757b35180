"""Argument checks shared by every entry point: callables, counts, names, seconds.

They run on the hot path, so the common case (a plain function) is decided by
one flag test before anything slower is tried.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import sys
import threading
from collections.abc import Callable
from types import (
    BuiltinFunctionType,
    BuiltinMethodType,
    FunctionType,
    MethodType,
    MethodWrapperType,
)
from typing import Any, Final, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Code flags of functions that return a coroutine or an async generator.
ASYNC_CODE_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
#: Code flags of functions a worker must not be given: async ones, and
#: generator functions, of which a worker would run only the creation (their
#: body runs later, wherever the generator is iterated: on the event loop).
#: One flag test on the hot path; :func:`check_sync_callable` says which it is.
REFUSED_CODE_FLAGS: Final = ASYNC_CODE_FLAGS | inspect.CO_GENERATOR
# Callables implemented in C: never coroutine functions, no need to inspect.
_PLAIN_CALLABLES: Final = frozenset({BuiltinFunctionType, BuiltinMethodType, MethodWrapperType})


if sys.version_info >= (3, 12):

    def mark_coroutine_function(fn: F) -> F:
        """Make ``inspect.iscoroutinefunction(fn)`` (and asyncio's) true for ``fn``.

        For a sync function that returns an awaitable: frameworks that ask
        (Starlette, FastAPI, bot libraries) then await it instead of running it
        in a thread pool of their own, where no event loop runs.
        """
        return inspect.markcoroutinefunction(fn)

    def is_coroutine_function(fn: object) -> bool:
        """``inspect.iscoroutinefunction``, which sees the marker above."""
        return inspect.iscoroutinefunction(fn)

else:
    # Before 3.12 inspect.iscoroutinefunction looks only at the code flags, so
    # nothing can make it true for a sync function; asyncio.iscoroutinefunction,
    # which Starlette uses on these versions, accepts this private marker, the
    # same one asgiref's markcoroutinefunction sets. The one use of the name,
    # checked by tests/test_iterate.py.
    _IS_COROUTINE: Final[object] = getattr(asyncio.coroutines, "_is_coroutine")  # noqa: B009

    def mark_coroutine_function(fn: F) -> F:
        """Make ``asyncio.iscoroutinefunction(fn)`` true for ``fn`` (see the 3.12+ version)."""
        fn._is_coroutine = _IS_COROUTINE  # type: ignore[attr-defined]
        return fn

    def is_coroutine_function(fn: object) -> bool:
        """``inspect.iscoroutinefunction``, or marked as one (what asyncio's accepts)."""
        marker = getattr(fn, "_is_coroutine", None)
        return inspect.iscoroutinefunction(fn) or marker is _IS_COROUTINE


def describe(obj: object) -> str:
    """A short description of ``obj`` for error messages."""
    try:
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        if name:
            return f"{type(obj).__name__} {name!r}"
        text = repr(obj)
    except Exception:
        # Messages describe what failed, often an odd object: its own broken
        # __repr__ (or __getattr__) must not replace the error being reported.
        return f"{type(obj).__name__} <whose repr() raised>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(obj).__name__} {text}"


def check_sync_callable(fn: Any, where: str, async_alternative: str) -> None:
    """Reject what cannot run as a sync function in a worker.

    Refused: non-callables, coroutine and async generator functions (and
    coroutine objects), generator functions (and generator objects).

    ``where`` names the call (``"offloop.to_thread()"``) and
    ``async_alternative`` the call to use for coroutines.
    """
    kind = type(fn)
    if kind is FunctionType:
        if not fn.__code__.co_flags & REFUSED_CODE_FLAGS:
            return
        target = fn
    elif kind in _PLAIN_CALLABLES:
        return
    elif (
        kind is MethodType
        and type(fn.__func__) is FunctionType
        and not fn.__func__.__code__.co_flags & REFUSED_CODE_FLAGS
    ):
        return  # a bound method, as common as a function: no predicate needed
    else:
        target = _call_of(fn)
        if _is_sync_callable(fn, target):
            return
    # How the message names what is refused: the function, or an object's __call__.
    is_a = ", a" if target is fn else ", whose __call__ is a"
    if inspect.isgeneratorfunction(target):
        raise TypeError(
            f"{where} got {describe(fn)}{is_a} generator function: the worker would only create "
            f"the generator, and its body would then run on the event loop as it is iterated, "
            f"blocking it. Iterate it from async code with 'async for item in "
            f"offloop.iterate({_name(fn)}(...))', or offload a function that returns "
            f"list({_name(fn)}(...))."
        )
    if inspect.isgenerator(fn):
        raise TypeError(
            f"{where} got a generator object ({describe(fn)}), not a function. Iterate it "
            f"from async code with 'async for item in offloop.iterate(generator)'."
        )
    if inspect.iscoroutine(fn):
        fn.close()  # no "coroutine was never awaited" warning on top of our error
        raise TypeError(
            f"{where} got a coroutine object ({describe(fn)}), not a function. "
            f"A coroutine does not block a thread: 'await' it directly, or pass the "
            f"coroutine function itself to {async_alternative} to run it on another loop."
        )
    if callable(fn):
        raise TypeError(
            f"{where} got {describe(fn)}{is_a} coroutine function, which would only create a "
            f"coroutine in the worker and never run it. 'await {_name(fn)}(...)' directly, "
            f"or use {async_alternative} to run it on an isolated loop."
        )
    raise TypeError(
        f"{where} needs a callable as its first argument (fn), but got {describe(fn)}. "
        f"Pass the function itself and its arguments separately: {where.rstrip('()')}(fn, *args)."
    )


def check_async_callable(fn: Any, where: str) -> None:
    """Reject what is not a coroutine function for entry points that take one.

    Checked before anything is sent to the target loop: a sync function must
    not run there first and be refused after.
    """
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
    if type(fn) is FunctionType and fn.__code__.co_flags & inspect.CO_COROUTINE:
        return  # the common case, decided by one flag test
    target = _innermost(fn)
    if inspect.isasyncgenfunction(target):
        raise TypeError(
            f"{where} needs a coroutine function, but {describe(fn)} is an async generator "
            f"function: it returns an async iterator to 'async for' over, not a coroutine to "
            f"run. Wrap the iteration in a coroutine (e.g. 'async def collect(): return "
            f"[x async for x in gen()]') and pass that."
        )
    if _is_sync_function(fn, target):
        raise TypeError(
            f"{where} needs a coroutine function as its first argument, but got {describe(fn)}, "
            f"which is sync code: it would run on the event loop's thread, not return a "
            f"coroutine. Call it directly, or use offloop.to_thread() if it blocks."
        )


#: How deep _innermost follows wrappers: a cycle of ``__wrapped__`` must end.
_MAX_WRAPPERS: Final = 100


def _innermost(fn: Any) -> Any:
    # What a partial, a bound method or a functools.wraps decorator wraps.
    for _ in range(_MAX_WRAPPERS):
        if is_coroutine_function(fn):
            return fn
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            return fn
    return fn


def _is_sync_function(fn: Any, target: Any) -> bool:
    """Whether ``fn`` is certainly sync code (a plain function, a C function).

    What cannot be told without calling it (a class, an object whose
    ``__call__`` is not Python code, a Cython coroutine function) is let
    through: the crossing checks what the call returned.
    """
    if is_coroutine_function(target) or is_coroutine_function(fn):
        return False
    kind = type(target)
    if kind is FunctionType or kind in _PLAIN_CALLABLES:
        return True
    if isinstance(target, type):
        return False
    call = getattr(kind, "__call__", None)  # noqa: B004 - the class's, not the instance's
    return type(call) is FunctionType and not is_coroutine_function(call)


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


def _call_of(fn: Any) -> Any:
    # What runs when an object is called: its class's __call__, which the
    # inspect predicates do not look at for an instance.
    if isinstance(fn, type | functools.partial) or inspect.isroutine(fn):
        return fn
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return call if type(call) is FunctionType else fn


def _is_sync_callable(fn: Any, target: Any) -> bool:
    return callable(fn) and not any(
        is_coroutine_function(x) or inspect.isasyncgenfunction(x) or inspect.isgeneratorfunction(x)
        for x in ((fn,) if target is fn else (fn, target))
    )


def _name(fn: Any) -> str:
    return str(getattr(fn, "__name__", "fn"))


def check_thread_name(name: object, where: str, *, names: str = "the threads") -> str | None:
    """Validate the optional ``name`` of a pool, loop thread or supervisor.

    ``where`` names the class, ``names`` what the name is used for.

    Raises:
        TypeError: ``name`` is neither None nor a str.
        ValueError: ``name`` is empty.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"{where}(name=...) must be a str, got {describe(name)}. Pass a name "
            f"such as 'db', or None for a numbered one."
        )
    if name == "":
        raise ValueError(
            f"{where}(name=...) must not be empty: it names {names}. Pass a name, or "
            f"None for a numbered one."
        )
    return name


def check_bool(value: object, name: str, meaning: str) -> bool:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is True or False.

    A truthy string such as ``"no"`` must not silently mean True; ``meaning``
    says what True does, for the message.
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"{name} must be True or False, got {describe(value)}. Pass True to {meaning}, "
            f"or False (the default) not to."
        )
    return value


def check_close_timeout(timeout: object, where: str) -> float | None:
    """Validate the ``timeout`` of a ``close()``/``aclose()``; ``where`` is the method.

    Checked before the close changes anything: a bad timeout must not leave
    the pool half closed. A timeout beyond what a wait can take
    (``threading.TIMEOUT_MAX``, about 49 days, or infinity) means none.

    Raises:
        TypeError: ``timeout`` is neither None nor a number.
        ValueError: ``timeout`` is negative or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"{where}(timeout=...) must be a number of seconds or None, got "
            f"{describe(timeout)}. Pass how long to wait for the running calls, or None to "
            f"wait as long as they take."
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(
            f"{where}(timeout=...) must be at least 0 seconds, got {timeout!r}. Pass 0 not "
            f"to wait, or None to wait as long as the running calls take."
        )
    return None if timeout > threading.TIMEOUT_MAX else float(timeout)

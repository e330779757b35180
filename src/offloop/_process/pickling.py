"""How calls and their outcomes cross the process boundary.

The parent pickles ``(fn, args, kwargs)`` once, in ``run()``, so a call that
cannot be sent fails at once with an error naming the culprit and never
reaches a worker. The fast C pickler is tried first; cloudpickle (the
``offloop[process]`` extra) is the fallback for lambdas, closures and functions
defined in ``__main__``, which the stdlib pickler can only send by reference.

A worker answers each call with one message, a pickled tuple whose first item
says what it holds (the constants below).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from .._core.errors import NotPicklableError
from .._core.validate import describe

__all__ = [
    "OK",
    "RAISED",
    "RAISED_TEXT",
    "InitFailure",
    "RemoteTraceback",
    "decode_reply",
    "dumps",
    "encode_call",
]

PROTOCOL: Final = pickle.HIGHEST_PROTOCOL

# Reply kinds, first item of every worker message.
OK: Final = 0  # (OK, value)
RAISED: Final = 1  # (RAISED, exception, traceback text)
# (RAISED_TEXT, type name, message, traceback text, why, error text): the exception won't
# pickle (why = "pickle") or won't be rebuilt from its pickle (why = "unpickle").
RAISED_TEXT: Final = 2
RESULT_UNPICKLABLE: Final = 3  # (RESULT_UNPICKLABLE, result description, error text)
LOAD_FAILED: Final = 4  # (LOAD_FAILED, error text, traceback text): call won't unpickle there
# (INIT_FAILED, pickled exception or None, summary, traceback text)
INIT_FAILED: Final = 5

_MISSING: Final = object()
_cloudpickle: ModuleType | object | None = _MISSING

_HINT_NO_CLOUDPICKLE: Final = (
    "The standard pickler sends functions by reference, so lambdas, closures and functions "
    "defined inside other functions cannot be sent; install 'offloop[process]' (cloudpickle) "
    "to send them by value, or define the function at the top level of an importable module."
)


def cloudpickle() -> ModuleType | None:
    """The cloudpickle module, or ``None`` when the extra is not installed."""
    global _cloudpickle
    if _cloudpickle is _MISSING:
        try:
            import cloudpickle as module
        except ImportError:
            module = None
        _cloudpickle = module
    return _cloudpickle  # type: ignore[return-value]


def dumps(obj: object) -> bytes:
    """Pickle ``obj`` with the C pickler, falling back to cloudpickle if installed."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        cp = cloudpickle()
        if cp is None:
            raise
        return cp.dumps(obj, PROTOCOL)  # type: ignore[no-any-return]


def main_reaches_children(start_method: str) -> bool:
    """Whether a child started this way can import what ``__main__`` defines.

    A forked child has it. A spawned (or forkserver) child re-imports the
    main script or module, except when there is none to import (an
    interactive session, ``python -c``) or it is a package's ``__main__``,
    which multiprocessing deliberately skips.
    """
    if start_method == "fork":
        return True
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return not (spec.name == "__main__" or spec.name.endswith(".__main__"))
    return getattr(main, "__file__", None) is not None


def encode_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    where: str,
    *,
    main_by_value: bool = True,
) -> bytes:
    """The message that asks a worker to run ``fn(*args, **kwargs)``.

    ``main_by_value``: send functions of ``__main__`` by value (with
    cloudpickle), for children that cannot import ``__main__``.

    Raises:
        NotPicklableError: naming the function or the argument that would not pickle.
    """
    try:
        # A __main__ function goes by value without a first try by reference.
        main_fn = main_by_value and getattr(fn, "__module__", None) == "__main__"
        data = None if main_fn else dumps((fn, args, kwargs))
        # What else __main__ defines (an argument's class) is pickled by
        # reference too: distributed makes the same check before it falls back.
        if main_by_value and (data is None or b"__main__" in data):
            cp = cloudpickle()
            if cp is not None:
                return cp.dumps((fn, args, kwargs), PROTOCOL)  # type: ignore[no-any-return]
        return data if data is not None else dumps((fn, args, kwargs))
    except Exception as exc:
        raise _diagnose(fn, args, kwargs, where, exc) from exc


def _diagnose(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    where: str,
    exc: Exception,
) -> NotPicklableError:
    hint = "" if cloudpickle() is not None else " " + _HINT_NO_CLOUDPICKLE
    culprits: list[tuple[str, object]] = [(f"its function ({describe(fn)})", fn)]
    culprits += [(f"argument {i} ({describe(arg)})", arg) for i, arg in enumerate(args)]
    culprits += [(f"keyword argument {k!r} ({describe(v)})", v) for k, v in kwargs.items()]
    for label, obj in culprits:
        try:
            dumps(obj)
        except Exception as part_exc:
            extra = hint if obj is fn else ""
            return NotPicklableError(
                f"{where} cannot send the call to a worker process: {label} cannot be "
                f"pickled ({type(part_exc).__name__}: {part_exc}). Arguments and results "
                f"of process calls must be picklable; pass plain data (e.g. a path instead "
                f"of an open file) and rebuild the object in the worker.{extra}"
            )
    return NotPicklableError(
        f"{where} cannot send the call of {describe(fn)} to a worker process: it cannot be "
        f"pickled ({type(exc).__name__}: {exc}).{hint}"
    )


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process.

    Attached as ``__cause__`` of the re-raised exception, so the report shows
    where it happened over there as well as where it was awaited here.
    ``where`` names that process (``"the worker process"``, ``"the service
    process"``) in the report, which otherwise reads as if it were this one's.
    """

    def __init__(self, tb: str, where: str) -> None:
        super().__init__(tb, where)
        self.tb = tb
        self.where = where

    def __str__(self) -> str:
        return f'\n(in {self.where})\n"""\n{self.tb}"""'


def encode_error(exc: BaseException, tb: str) -> bytes:
    """A worker's reply for an exception raised by the user's function."""
    why = "pickle"
    try:
        data = dumps((RAISED, exc, tb))
        # Exceptions whose __init__ needs other arguments than .args pickle
        # fine but fail to unpickle; find out here, where the text is at hand.
        why = "unpickle"
        pickle.loads(data)
        return data
    except BaseException as failure:  # a __reduce__ may raise anything; the worker must answer
        error = f"{type(failure).__name__}: {_safe_str(failure)}"
        return pickle.dumps(
            (RAISED_TEXT, _qualname(type(exc)), _safe_str(exc), tb, why, error), PROTOCOL
        )


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # an exception whose __str__ raises: still report its type
        return f"<{type(exc).__name__} whose str() raised>"


def encode_load_failure(exc: BaseException, tb: str) -> bytes:
    """A worker's reply for a call that would not unpickle there (``exc``, raised doing so)."""
    return pickle.dumps((LOAD_FAILED, f"{type(exc).__name__}: {_safe_str(exc)}", tb), PROTOCOL)


def encode_init_failure(exc: BaseException, initializer: str, tb: str) -> bytes:
    """A worker's first message when its initializer raised ``exc``, instead of "ready".

    The exception is pickled apart from the rest: one that will not pickle, or
    will not unpickle in the pool's process (an ``__init__`` that needs other
    arguments than its ``.args``, a module the pool cannot import), must not
    make the whole message unreadable. The pool then still knows that the
    worker failed to start, and why, from the summary and the traceback text.
    """
    summary = f"{initializer} raised {type(exc).__name__}: {_safe_str(exc)}"
    try:
        pickled: bytes | None = dumps(exc)
    except BaseException:  # a __reduce__ may raise anything; the worker must answer
        pickled = None
    return pickle.dumps((INIT_FAILED, pickled, summary, tb), PROTOCOL)


def encode_result(value: object, fn: Callable[..., Any]) -> bytes:
    """A worker's reply carrying the function's return value."""
    try:
        return dumps((OK, value))
    except BaseException as exc:  # a __reduce__ may raise anything; the worker must answer
        return pickle.dumps(
            (RESULT_UNPICKLABLE, describe(value), f"{type(exc).__name__}: {_safe_str(exc)}"),
            PROTOCOL,
        )


def decode_reply(data: bytes, fn: Callable[..., Any], where: str) -> tuple[bool, Any]:
    """Turn a worker's reply into ``(True, value)`` or ``(False, exception)``."""
    try:
        reply = pickle.loads(data)
    except BaseException as exc:  # a __reduce__ may raise anything; it is this call's outcome
        error = NotPicklableError(
            f"{where}: the outcome of {describe(fn)} came back from the worker process but "
            f"could not be unpickled here ({type(exc).__name__}: {exc})."
        )
        error.__cause__ = exc
        return False, error
    kind = reply[0]
    if kind == OK:
        return True, reply[1]
    if kind == RAISED:
        raised: BaseException = reply[1]
        raised.__cause__ = RemoteTraceback(reply[2], "the worker process")
        return False, raised
    if kind == RAISED_TEXT:
        if reply[4] == "pickle":
            what = "could not be pickled"
            advice = (
                "Keep the exception's attributes to plain data (or give its class a "
                "__reduce__) to keep its type."
            )
        else:
            what = "pickles, but could not be rebuilt from its pickle"
            advice = (
                "Give the exception class an __init__ that accepts its .args (or a "
                "__reduce__) to keep its type."
            )
        error = NotPicklableError(
            f"{where}: {describe(fn)} raised {reply[1]}: {reply[2]} in the worker process; "
            f"that exception {what} ({reply[5]}), so it is reported as this error instead. "
            f"{advice}"
        )
        error.__cause__ = RemoteTraceback(reply[3], "the worker process")
        return False, error
    if kind == RESULT_UNPICKLABLE:
        return False, NotPicklableError(
            f"{where}: {describe(fn)} ran in the worker process, but its result "
            f"({reply[1]}) cannot be pickled to send it back ({reply[2]}). Return plain data "
            f"instead (e.g. a path instead of an open file)."
        )
    if kind == LOAD_FAILED:
        error = NotPicklableError(
            f"{where}: the worker process could not unpickle the call of {describe(fn)} "
            f"({reply[1]}). Functions sent by reference must be importable in the worker: "
            f"define them at the top level of a module, not in an interactive session."
        )
        error.__cause__ = RemoteTraceback(reply[2], "the worker process")
        return False, error
    if kind == INIT_FAILED:
        return False, InitFailure(_load_exception(reply[1]), reply[2], reply[3])
    raise AssertionError(f"unknown worker reply kind {kind!r}")


def _load_exception(data: bytes | None) -> BaseException | None:
    # An initializer's exception, or None if it cannot be rebuilt here: the
    # failure's summary and traceback text say what it was.
    if data is None:
        return None
    try:
        exc = pickle.loads(data)
    except BaseException:  # a __reduce__ may raise anything
        return None
    return exc if isinstance(exc, BaseException) else None


class InitFailure:
    """What a worker whose initializer raised sends instead of its first result."""

    __slots__ = ("exc", "summary", "tb")

    def __init__(self, exc: BaseException | None, summary: str, tb: str) -> None:
        self.exc = exc
        self.summary = summary
        self.tb = tb


def _qualname(cls: type) -> str:
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module == "__mp_main__":  # the main script, as a spawned worker names it
        module = "__main__"
    return f"{module}.{cls.__qualname__}"

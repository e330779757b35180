"""Raise KeyboardInterrupt at each point of a function where a signal handler may run.

A signal handler's exception (Ctrl-C's KeyboardInterrupt) comes in the main
thread, which is often the event loop's, between two bytecodes, and only at
some of them: at a Python function's start, after a C function returns, at a
backward jump (a loop), and on Python 3.10 also as a Python function returns
to its caller and at any taken conditional jump (an ``if`` that skips its
block; checked with a SIGINT storm on 3.10.13: 3.11 and later no longer stop
there). :func:`interrupted_at` raises at the ``n``-th of those points (at
every conditional jump, taken or not: the pool's state is the same),
counting them in the function given and, for the functions it calls, at
their start and return, and inside those of the thread pool's own modules
(code elsewhere, such as ``threading``'s, changes nothing of the pool midway:
a point in it is like the one at its start or return). It uses the points
of every version at once, so that the code under test is safe on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import CodeType, FrameType
from typing import Any

from offloop import ThreadPool
from offloop._threads import gil as _gil
from offloop._threads import pool as _pool
from offloop._threads import workers as _workers
from tests.helpers import WAIT, await_until

#: The code of these files is entered: each of its points counts.
OWN_DIR = os.path.dirname(_pool.__file__)

#: Jumps at which a signal handler may run when taken (the union over versions).
_CONDITIONAL = ("POP_JUMP_",)
_BACKWARD = ("JUMP_ABSOLUTE", "JUMP_BACKWARD")


def _jumps(code: CodeType, cache: dict[CodeType, frozenset[int]]) -> frozenset[int]:
    # The offsets where the code's jumps are interrupt points when taken: the
    # jump's own, but for a backward jump outside the exception table (3.12
    # leaves them out), that of the instruction before it. CPython 3.11 and
    # 3.12 take the signal after the jump has moved on, and look the handler
    # up for the instruction before the jump (CPython #108214): an exception
    # raised at the jump itself would skip the handler, and leave a ``with``
    # block's lock held, which no real signal does.
    found = cache.get(code)
    if found is None:
        bytecode = dis.Bytecode(code)
        covered = [(e.start, e.end) for e in getattr(bytecode, "exception_entries", ())]
        offsets = set()
        previous = -1
        for ins in bytecode:
            backward = (
                ins.opname in _BACKWARD and isinstance(ins.argval, int) and ins.argval < ins.offset
            )
            if "NO_INTERRUPT" not in ins.opname and (
                ins.opname.startswith(_CONDITIONAL) or backward
            ):
                outside = covered and not any(a <= ins.offset < b for a, b in covered)
                offsets.add(previous if backward and outside and previous >= 0 else ins.offset)
            previous = ins.offset
        found = frozenset(offsets)
        cache[code] = found
    return found


def _within(frame: FrameType | None, code: CodeType) -> bool:
    # Whether the frame runs for ``code`` and, but for ``code`` itself, in
    # none of the measuring functions.
    while frame is not None:
        if frame.f_code is code:
            return True
        if frame.f_code in _MEASURING or frame.f_code.co_name == "__del__":
            # A finalizer the garbage collector runs meanwhile (an iterator
            # of an earlier test) is not the code under test.
            return False
        frame = frame.f_back
    return False


#: The pool's functions that only measure its threads: a point inside one is
#: like the one at its start, and how many there are depends on timing.
_MEASURING = frozenset(
    (_workers.Worker.is_waiting.__code__, _gil.judge_gil.__code__, _gil.GilClocks.since.__code__)
)


def _own(frame: FrameType | None) -> bool:
    return frame is not None and os.path.dirname(frame.f_code.co_filename) == OWN_DIR


@contextlib.contextmanager
def interrupted_at(
    n: int, code: CodeType, *, stop_at: CodeType | None = None
) -> Iterator[list[str]]:
    """Raise KeyboardInterrupt at the ``n``-th point in a run of ``code`` where a handler may run.

    Counted while ``code`` runs in this thread, up to the start of
    ``stop_at`` if given (that start is the last point). Yields a list that
    names the point once it is reached ("" once past the last one).
    """
    seen = 0
    where: list[str] = []
    cache: dict[CodeType, frozenset[int]] = {}

    def point(label: str) -> None:
        nonlocal seen
        if seen == n:
            where.append(label)
            raise KeyboardInterrupt(f"injected at {label}")
        seen += 1

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if where:
            return
        if event == "call":
            caller = frame.f_back
            if frame.f_code is not code and not (_own(caller) and _within(caller, code)):
                return
            point(f"call {frame.f_code.co_name}")
            if frame.f_code is stop_at:
                where.append("")  # past the last point: stop counting
        elif event == "c_return":
            if _own(frame) and _within(frame, code):
                point(f"c_return {getattr(arg, '__qualname__', '?')} in {frame.f_code.co_name}")
        elif (
            event == "return"
            and frame.f_code is not code
            and _own(frame.f_back)
            and _within(frame.f_back, code)
        ):
            # Raised from the hook, the exception replaces the return value:
            # the caller sees it right after the call, as on 3.10. Not for
            # the function's own return: its caller is outside the test.
            point(f"return {frame.f_code.co_name}")

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        # Only for the jumps: the profile hook sees calls and returns.
        if where or not (_own(frame) and _within(frame, code)):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return local

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        # Raised before the jump runs, whether it is taken or not: the pool's
        # state is the same either way, and the exception must meet the
        # handler in force at the jump (its target may lie past the end of
        # a try block).
        if event == "opcode" and not where and frame.f_lasti in _jumps(frame.f_code, cache):
            point(f"jump at {frame.f_lasti} in {frame.f_code.co_name}")
        return local

    # Put back afterwards: coverage measures this thread with a trace
    # function, which would otherwise stay off for the rest of the run.
    saved_trace, saved_profile = sys.gettrace(), sys.getprofile()
    sys.setprofile(profile)
    sys.settrace(trace)
    try:
        yield where
    finally:
        sys.settrace(saved_trace)
        sys.setprofile(saved_profile)


async def closed_with_no_thread_left(pool: ThreadPool, where: list[str]) -> None:
    """Close ``pool`` and wait (bounded) until none of its threads runs any more."""
    await asyncio.wait_for(pool.aclose(), WAIT)
    assert pool.statistics()["threads"] == 0, where
    await await_until(
        lambda: not [t for t in threading.enumerate() if t.is_alive() and pool.name in t.name],
        WAIT,
        f"the pool's threads to end ({where})",
    )


async def count_points(
    interrupt: Callable[[int], Awaitable[bool]], *, limit: int, what: str = "it"
) -> int:
    """Run ``interrupt(n)`` for n = 0, 1, ... until it says n was past the last point.

    ``interrupt(n)`` interrupts its code at point ``n`` and checks the pool
    afterwards; it returns whether point ``n`` was reached. Returns how many
    points there were; fails past ``limit``.
    """
    points = 0
    while await interrupt(points):
        points += 1
        assert points < limit, f"{what} never got through"
    return points

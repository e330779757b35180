"""StopToken.set() from a signal handler, which may interrupt the main thread anywhere.

A ``signal.signal`` handler runs in the main thread between two of its
bytecodes, maybe in the middle of a method of the very token it sets. The
deterministic tests play that: they run a token method with a trace on every
bytecode of offloop's token module, and call ``set()`` at the k-th one, for
every k. The last test sends real signals to a real child.
"""

from __future__ import annotations

import dis
import functools
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._core import token as token_module
from tests.helpers import SPAWN_WAIT, WAIT, in_plain_thread

TOKEN_FILE = token_module.__file__


def interrupted(
    k: int, action: Callable[[], object], handler: Callable[[], object], stop_line: int = -1
) -> bool:
    """Run ``action()``, calling ``handler()`` before the k-th bytecode of the token module.

    Returns whether the handler ran (``False`` once k is past the last
    bytecode). Counting ends at the call on ``stop_line``, a call that blocks
    until someone sets the token. Runs in a thread of its own, so a deadlock
    fails the test instead of hanging it.
    """
    seen = 0
    fired = False
    counting = True
    lines = 0

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        nonlocal seen, fired, counting, lines
        frame.f_trace_opcodes = True
        lines += event == "line"
        if event != "opcode" or not counting:
            return local
        if seen == k:
            fired = True
            # Tracing is off inside a trace function, as it is not inside a
            # real handler; the handler's own bytecodes are not counted either.
            handler()
        seen += 1
        opname = dis.opname[frame.f_code.co_code[frame.f_lasti]]
        if frame.f_lineno == stop_line and opname.startswith("CALL"):
            counting = False
            if not fired:
                handler()  # the call would block for good: a signal now ends it
        return local

    def calls(frame: types.FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == TOKEN_FILE else None

    def traced() -> None:
        sys.settrace(calls)
        try:
            action()
        finally:
            sys.settrace(None)

    in_plain_thread(traced)
    if lines and not seen:
        # CPython 3.12.1 sends no opcode events for a code object that ran
        # untraced before (its line events still come): nothing to interrupt.
        pytest.skip(f"Python {sys.version.split()[0]} sends no opcode trace events here")
    return fired


def every_interruption(
    setup: Callable[[], tuple[offloop.StopToken, Callable[[], object], Counter[str]]],
    check: Callable[[Counter[str]], None],
    stop_line: int = -1,
) -> int:
    """Run ``setup``'s action with ``token.set()`` at each bytecode in turn; ``check`` each run."""
    k = 0
    while True:
        token, action, ran = setup()
        try:
            fired = interrupted(k, action, functools.partial(token.set, "signal"), stop_line)
        except AssertionError as exc:
            raise AssertionError(f"set() at bytecode {k}: {exc}") from None
        if not fired:
            return k
        assert token.is_set()
        try:
            check(ran)
        except AssertionError as exc:
            raise AssertionError(f"set() at bytecode {k}: {exc}") from None
        k += 1


def counting(ran: Counter[str], name: str) -> Callable[[offloop.StopToken], None]:
    def callback(token: offloop.StopToken) -> None:
        ran[name] += 1

    return callback


def test_set_in_the_middle_of_add_callback_runs_every_callback_once() -> None:
    def setup() -> tuple[offloop.StopToken, Callable[[], object], Counter[str]]:
        token = offloop.StopToken()
        ran: Counter[str] = Counter()
        token.add_callback(counting(ran, "earlier"))
        return token, lambda: token.add_callback(counting(ran, "added")), ran

    def check(ran: Counter[str]) -> None:
        assert ran == {"earlier": 1, "added": 1}, ran

    assert every_interruption(setup, check) > 5


def test_set_in_the_middle_of_remove_callback_runs_each_other_callback_once() -> None:
    def setup() -> tuple[offloop.StopToken, Callable[[], object], Counter[str]]:
        token = offloop.StopToken()
        ran: Counter[str] = Counter()
        removed = counting(ran, "removed")
        token.add_callback(counting(ran, "kept"))
        token.add_callback(removed)
        return token, lambda: token.remove_callback(removed), ran

    def check(ran: Counter[str]) -> None:
        assert ran["kept"] == 1, ran
        assert ran["removed"] in (0, 1), ran  # set() may come before the removal

    assert every_interruption(setup, check) > 1


def test_set_in_the_middle_of_set_runs_every_callback_once() -> None:
    def setup() -> tuple[offloop.StopToken, Callable[[], object], Counter[str]]:
        token = offloop.StopToken()
        ran: Counter[str] = Counter()
        for name in ("a", "b", "c"):
            token.add_callback(counting(ran, name))
        return token, lambda: token.set("first"), ran

    def check(ran: Counter[str]) -> None:
        assert ran == {"a": 1, "b": 1, "c": 1}, ran

    assert every_interruption(setup, check) > 5


def test_set_in_the_middle_of_set_keeps_the_reason_its_callbacks_saw() -> None:
    # Whichever set() comes first names the reason, and it never changes
    # after: a callback, run by either, sees the reason the token keeps.
    tokens: list[offloop.StopToken] = []

    def setup() -> tuple[offloop.StopToken, Callable[[], object], Counter[str]]:
        token = offloop.StopToken()
        tokens.append(token)
        ran: Counter[str] = Counter()

        def seen(token: offloop.StopToken) -> None:
            ran[f"reason {token.reason}"] += 1

        token.add_callback(seen)
        return token, lambda: token.set("first"), ran

    def check(ran: Counter[str]) -> None:
        assert ran == {f"reason {tokens[-1].reason}": 1}, (ran, tokens[-1].reason)

    assert every_interruption(setup, check) > 3


def test_set_in_the_middle_of_wait_wakes_it() -> None:
    source, first = inspect.getsourcelines(offloop.StopToken.wait)
    blocking = [i for i, text in enumerate(source) if "waiter.acquire()" in text and "=" in text]
    assert len(blocking) == 1, "wait() blocks on `woken = waiter.acquire()`; update this test"
    results: list[bool] = []

    def setup() -> tuple[offloop.StopToken, Callable[[], object], Counter[str]]:
        token = offloop.StopToken()
        ran: Counter[str] = Counter()
        results.clear()

        def action() -> None:
            results.append(token.wait())
            ran["left over"] = len(token._callbacks)

        return token, action, ran

    def check(ran: Counter[str]) -> None:
        assert results == [True]
        assert ran["left over"] == 0, "a waiter was left among the callbacks"

    assert every_interruption(setup, check, stop_line=first + blocking[0]) > 5


CHILD = """
import os, random, signal, sys
from offloop import StopToken
from offloop._core import token as token_module

SIGNALS = int(sys.argv[1])
TOKEN_FILE = token_module.__file__
current = [StopToken()]
handled = [0]
inside = [0]

def on_signal(signum, frame):
    current[0].set("signal")
    handled[0] += 1
    inside[0] += frame.f_code.co_filename == TOKEN_FILE
    if handled[0] < SIGNALS:
        # The next one a moment later, wherever the main thread is then: a
        # timer, not the parent, which would answer this handler's own write.
        signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-5, 2e-4))

signal.signal(signal.SIGALRM, on_signal)
ran = {}  # per token: an earlier token left unset may be set by a late signal

def callback(token):
    ran[token] = ran.get(token, 0) + 1

signal.setitimer(signal.ITIMER_REAL, 1e-4)
tokens = 0
while handled[0] < SIGNALS:
    # The main thread is nearly always inside a token method when a signal comes.
    token = current[0] = StopToken()
    token.add_callback(callback)
    token.add_callback(str)
    token.remove_callback(str)
    token.wait(0.0001)
    tokens += 1
    if token:
        assert token.reason == "signal", token.reason
        token.add_callback(callback)
        assert ran[token] == 2, ran[token]
    ran.clear()
print(" ok", tokens, inside[0])
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX interval timers")
def test_a_signal_handler_setting_tokens_never_deadlocks_the_main_thread(tmp_path: Path) -> None:
    signals = 200
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    done = subprocess.run(
        [sys.executable, str(script), str(signals)],
        capture_output=True,
        timeout=SPAWN_WAIT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr.decode()
    ok, _tokens, inside = done.stdout.split()
    assert ok == b"ok", done.stdout
    # Most signals must interrupt a token method, or this tests nothing.
    assert int(inside) >= signals // 2, done.stdout


def test_a_waiter_interrupted_by_a_thread_setting_the_token_wakes() -> None:
    token = offloop.StopToken()
    woke = threading.Event()

    def wait() -> None:
        assert token.wait()
        woke.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    token.set("other thread")
    waiter.join(WAIT)
    assert woke.is_set()
    assert not token._callbacks


ITERATING_CHILD = """
import asyncio, os, random, signal, sys, threading
import offloop

BUFFER, ROUNDS = int(sys.argv[1]), int(sys.argv[2])
current = [offloop.StopToken()]
inside = [0]

def on_alarm(signum, frame):
    # Counts the signals that came inside a function the consumer's
    # __anext__ called: giving room back to the producer, most of the time.
    caller = frame.f_back
    while caller is not None and caller.f_code.co_name != "__anext__":
        caller = caller.f_back
    inside[0] += caller is not None
    current[0].set("signal")

signal.signal(signal.SIGALRM, on_alarm)

def source(full):
    current[0] = offloop.current_token()
    n = 0
    while True:
        n += 1
        if n == BUFFER + 1:  # the buffer is full, and the producer waits for room
            full.set()
        yield n

async def main():
    for _ in range(ROUNDS):
        full = threading.Event()
        items = offloop.iterate(source(full), buffer=BUFFER)
        await items.__anext__()
        assert full.wait(10)
        await asyncio.sleep(0)  # the loop takes in the buffered items
        # The signal comes while the consumer takes them (about 1 us each),
        # giving room back for each one, as fast as it can.
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00001, 0.0002))
        try:
            async for _ in items:
                pass
        except offloop.PoolClosedError as exc:
            assert "'signal'" in str(exc), exc
        else:
            raise AssertionError("the endless source ended")
    print("ok", inside[0])

asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX interval timers")
def test_a_signal_handler_stopping_an_iterate_producer_never_deadlocks_its_consumer(
    tmp_path: Path,
) -> None:
    # The consumer of offloop.iterate() runs on the main thread and gives the
    # producer room for every item it takes; the handler sets the producer's
    # token there, whose callback gives room too, to wake the producer. A
    # timer's signal, so that it comes at any bytecode: a signal sent when the
    # child says it is ready would be handled as soon as that write returns.
    rounds = 150
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(ITERATING_CHILD))
    child = subprocess.Popen(
        [sys.executable, str(script), "256", str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        out, err = child.communicate(timeout=SPAWN_WAIT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate(timeout=WAIT)
        pytest.fail("the child hung: a handler stopping the producer deadlocked its consumer")
    assert child.returncode == 0, err.decode()
    word, inside = out.split()
    assert word == b"ok", out
    # About one in ten comes there; none would mean this test tests nothing.
    assert int(inside) > 0, f"none of {rounds} signals came inside the consumer's __anext__"

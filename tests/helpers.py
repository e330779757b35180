"""Helpers for tests: bounded waits that fail loudly instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest


def bounded(timeout: float = 10.0) -> Callable[..., Any]:
    """Decorator: fail an async test body that does not finish within ``timeout``."""

    def deco(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.wait_for(fn(*args, **kwargs), timeout)

        return wrapper

    return deco


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for a block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` from a sync test until true; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


async def await_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` from async code until true; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def wait_for_file(gate: str, started: str | None = None, timeout: float = 10.0) -> int:
    """Worker-side gate: touch ``started``, wait until ``gate`` exists; return this pid.

    A file is the one signal a test, a worker process and a Dask worker all
    see. Polls briefly (the workers cannot share an Event) and fails loudly
    after ``timeout``.
    """
    if started is not None:
        with open(started, "a"):
            pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} never appeared")
        time.sleep(0.002)
    return os.getpid()


def run_script(
    folder: Path, name: str, text: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Write ``text`` to ``folder/name`` and run it with this Python, in ``folder``.

    Output is captured as text; a script that hangs fails the test after
    ``timeout`` seconds (``subprocess.TimeoutExpired``).
    """
    script = folder / name
    script.write_text(text)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=folder
    )


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return psutil.Process().num_fds()


@contextlib.contextmanager
def resource_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record ResourceWarnings from any thread (a finalizer's thread varies)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        found: list[warnings.WarningMessage] = []
        yield found
        found += [w for w in caught if issubclass(w.category, ResourceWarning)]


def the_warning(found: list[warnings.WarningMessage], pattern: str) -> str:
    """The one warning recorded, whose message matches ``pattern``; its message."""
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert re.match(pattern, message), message
    return message

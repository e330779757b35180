"""Helpers shared by the test files: bounded waits that fail loudly instead of hanging,
real servers and child processes to talk to, and what a leak check looks at."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil
import pytest

import offloop

# Bounds on waits that end at once when things work: a hang fails the test with a
# message instead of stalling the suite, and a passing test never waits one out.
# Each is a name of its own because what bounds it differs:
#
# WAIT: a thread, a loop, a pool's worker or a server in this process.
WAIT = 10.0
# QUICK_WAIT: the service and supervisor tests run their bodies under @bounded(10)
# or @bounded(20); a wait there must run out, with its own message, before that.
QUICK_WAIT = 5.0
# SPAWN_WAIT: a child Python program (a subprocess, a Dask cluster) starts an
# interpreter and imports offloop afresh before it answers, sometimes twice (it
# spawns workers); still well inside pytest's per-test timeout (60 s).
SPAWN_WAIT = 30.0

T = TypeVar("T")


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


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``predicate`` from a sync test until true; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


async def await_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``predicate`` from async code until true; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def wait_for_file(gate: str, started: str | None = None, timeout: float = WAIT) -> int:
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
    """Record ResourceWarnings from any thread (a finalizer's thread varies).

    The list fills as they come, so a test can wait inside the block for a
    finalizer that runs on another thread: the weak reference to its object
    is dead before the finalizer runs, and a warning issued after the block
    meets the suite's "error" filter instead. Other warnings meet that filter
    here too, so the list holds ResourceWarnings only.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield caught


def warned(found: list[warnings.WarningMessage], pattern: str) -> bool:
    """Whether a recorded warning's message matches ``pattern`` (to wait for it)."""
    return any(re.match(pattern, str(w.message)) for w in found)


def the_warning(found: list[warnings.WarningMessage], pattern: str) -> str:
    """The one warning recorded, whose message matches ``pattern``; its message."""
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert re.match(pattern, message), message
    return message


def line_of(marker: str, path: Path) -> int:
    """The line of ``path`` that ends with the comment ``# <marker>``; there must be one."""
    lines = path.read_text().splitlines()
    hits = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times in {path}"
    return hits[0]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def collected(ref: weakref.ref[Any]) -> bool:
    """Whether the object behind ``ref`` is gone after a full garbage collection."""
    gc.collect()
    return ref() is None


def wsgi_threads() -> list[str]:
    """The names of the live threads of WSGI services (serve threads and workers)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("offloop-wsgi-")]


def refuses(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=QUICK_WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


async def stop_during_start(svc: Any, entered: asyncio.Event, release: asyncio.Event) -> None:
    """Call ``svc.stop()`` while its ``start()`` waits in a hook; both must end, the port closed.

    ``entered`` is set by the hook as it begins, which then waits for ``release``.
    """
    start = asyncio.create_task(svc.start())
    await asyncio.wait_for(entered.wait(), QUICK_WAIT)
    stop = asyncio.create_task(svc.stop())
    await asyncio.sleep(0)  # stop() has run up to its first wait
    assert not stop.done(), "stop() returned while start() was still starting the service"
    release.set()
    await asyncio.wait_for(start, QUICK_WAIT)
    await asyncio.wait_for(stop, QUICK_WAIT)
    assert svc.state.value == "stopped"
    assert refuses(svc.port)


async def http_get(url: str) -> tuple[int, str]:
    """GET ``url`` with aiohttp on the running loop: the status and the text."""
    import aiohttp  # here, not at the top: every test file imports this module

    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


class Proc:
    """A real child process whose merged output is read line by line as it comes."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        ignore_sigint: bool = False,
        new_session: bool = False,
    ) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            # A process group of its own, which os.killpg(popen.pid, ...) signals whole.
            start_new_session=new_session,
            # As nohup or a non-interactive shell's background job would start it.
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            if ignore_sigint
            else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._new_session = new_session
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="test-proc-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = SPAWN_WAIT) -> re.Match[str]:
        """Wait for an output line matching ``pattern``; fail with the output so far."""
        regex = re.compile(pattern)
        with self._changed:
            ok = self._changed.wait_for(
                lambda: (
                    any(regex.search(line) for line in self.lines) or self.popen.poll() is not None
                ),
                timeout,
            )
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
        state = "timed out" if not ok else f"exited with {self.popen.returncode}"
        pytest.fail(f"{state} waiting for {pattern!r}; output:\n{self.output}")

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def exit_code(self, timeout: float = SPAWN_WAIT) -> int:
        """Wait for the exit (bounded) and for the last output line."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the process did not exit within {timeout}s; output:\n{self.output}")
        self._reader.join(timeout)
        return code

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.popen.poll() is None:
            if self._new_session:
                # The whole group: a failed test leaves none of its processes behind.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.kill()
        self.popen.wait(SPAWN_WAIT)
        self._reader.join(SPAWN_WAIT)
        assert self.popen.stdout is not None
        self.popen.stdout.close()


def in_plain_thread(fn: Callable[[], T], timeout: float = WAIT) -> T:
    """Run ``fn`` in a new plain thread (no loop, not an offloop worker); fail if it hangs."""
    results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def target() -> None:
        try:
            results.put((True, fn()))
        except BaseException as exc:
            results.put((False, exc))

    # A daemon: if the code under test hangs, the test fails instead of the run hanging.
    thread = threading.Thread(target=target, name="plain-caller", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} did not finish within {timeout}s (deadlock?)"
    ok, value = results.get_nowait()
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


async def where_am_i() -> tuple[str, asyncio.AbstractEventLoop]:
    """The thread name and the loop a coroutine runs on."""
    await asyncio.sleep(0)
    return threading.current_thread().name, asyncio.get_running_loop()


def state(lt: offloop.LoopThread) -> str:
    """A loop thread's state, read through a call so that mypy does not narrow it."""
    lt_state: offloop.LoopThreadState = lt.state
    return lt_state.value

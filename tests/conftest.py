"""Shared test machinery.

- Every ``async def`` test runs on each loop kind: plain asyncio, asyncio in
  debug mode, and uvloop. ``@pytest.mark.loops("asyncio")`` narrows that.
- Every test checks that it leaked no thread and no child process.
- Tests that spawn processes request ``resource_tracker`` (see its docstring).
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing.resource_tracker
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import psutil
import pytest

LOOP_KINDS = ("asyncio", "debug", "uvloop")

# Threads that live for the whole process by design: the default pools and the
# shared background loop are reused across tests (they are daemon threads).
LONG_LIVED_THREAD_PREFIXES = (
    "offloop-default-",
    "offloop-services-",
    "offloop-process-default",
    "offloop-shared-loop",
    "asyncio_",  # asyncio's own default executor, used by peers in some tests
)

LEAK_WAIT = 10.0


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop of the given kind ("asyncio", "debug" or "uvloop"), not set or run."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    loop = asyncio.new_event_loop()
    loop.set_debug(kind == "debug")
    return loop


def run_on(kind: str, coro: Coroutine[Any, Any, Any], leftovers: list[str] | None = None) -> Any:
    """Run ``coro`` to completion on a fresh loop of the given kind.

    Does what ``asyncio.run`` does (cancel leftovers, shut down async
    generators and the default executor, close the loop), with a choice of
    loop. The names of tasks still pending when ``coro`` returned are
    appended to ``leftovers``.
    """
    loop = new_loop(kind)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            if leftovers is not None:
                leftovers += sorted(repr(task) for task in pending)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function) and "loop_kind" not in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("loops")
        kinds = marker.args if marker else LOOP_KINDS
        metafunc.fixturenames.append("loop_kind")
        metafunc.parametrize("loop_kind", kinds)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    callspec = getattr(pyfuncitem, "callspec", None)
    kind = callspec.params.get("loop_kind", "asyncio") if callspec else "asyncio"
    sig = inspect.signature(fn)
    kwargs = {name: pyfuncitem.funcargs[name] for name in sig.parameters}
    leftovers: list[str] = []
    run_on(str(kind), fn(**kwargs), leftovers)
    # No task may outlive the test (a supervisor, pool or service that forgot one).
    if leftovers and pyfuncitem.get_closest_marker("allow_leaks") is None:
        pytest.fail(f"test left tasks pending on its loop: {leftovers}")
    return True


@pytest.fixture
def loop_kind(request: pytest.FixtureRequest) -> str:
    """The loop kind an async test runs on (parametrized by the hook above)."""
    return str(getattr(request, "param", "asyncio"))


def _leftover_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith(LONG_LIVED_THREAD_PREFIXES)
    ]


def _children() -> set[int]:
    # multiprocessing starts one resource-tracker process per interpreter on
    # first use of "spawn"/"forkserver"; it lives as long as the interpreter.
    pids = set()
    try:
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() == "zombie" or "resource_tracker" in " ".join(p.cmdline()):
                    continue
            except psutil.Error:
                continue
            pids.add(p.pid)
    except psutil.Error:
        pass
    return pids


@pytest.fixture(scope="module")
def resource_tracker() -> None:
    """Start multiprocessing's resource tracker before the module's first leak snapshot.

    multiprocessing starts this helper process with the first spawned child and
    keeps it for the life of the interpreter; started early, it is not taken for
    a worker that a test leaked. A module that spawns processes asks for it with
    ``pytestmark = pytest.mark.usefixtures("resource_tracker")``.
    """
    multiprocessing.resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread or child process running after it ends."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + LEAK_WAIT
    while True:
        threads = _leftover_threads(threads_before)
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    names = [t.name for t in threads]
    pytest.fail(f"test leaked threads {names} and child processes {sorted(children)}")

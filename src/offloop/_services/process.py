"""A function service in a child process (``isolate="process"``).

The child is started with the ``spawn`` method, so the function must be
importable by reference (defined at a module's top level). The child ignores
SIGINT (Ctrl-C in a terminal reaches the whole process group; the parent
decides what happens) and treats SIGTERM as the polite stop: an ``async def``
is cancelled, a ``def`` taking a parameter gets its StopToken set, a ``def``
without one is simply terminated.

No child outlives its parent: a forced exit (a second Ctrl-C, the signal
watchdog) SIGKILLs the live children before ``os._exit`` (:func:`kill_children`),
and a child also dies with a parent killed outright, like a ProcessPool worker
(``PR_SET_PDEATHSIG`` on Linux, else polling its parent's pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .._core.errors import NotPicklableError, OffloopError, WorkerCrashed
from .._core.forcedexit import on_forced_exit
from .._core.token import StopToken
from .._core.validate import describe
from .._process.pickling import RemoteTraceback, main_reaches_children
from .functions import FunctionService
from .lifecycle import LifecycleState

__all__ = ["ProcessService", "kill_children"]

_KILL_JOIN = 2.0  # SIGKILL cannot be ignored; this only covers the kernel reaping it
# Without a pidfd, how long and how often the loop looks for the exit code of a
# child whose files have closed: first soon (it is exiting, so the code is
# there almost at once), then less often. A child still running by then closed
# them itself, and nothing would tell when it ends: it is killed.
_EXITING_WAIT = 2.0
_FIRST_POLL = 0.0005
_LAST_POLL = 0.05

#: The service children not yet joined. The process objects, not their pids:
#: multiprocessing may reap a child elsewhere (active_children(), any new
#: start()), and its pid may then name another process.
_live_children: set[multiprocessing.process.BaseProcess] = set()


def kill_children() -> None:
    """SIGKILL every live service child now; for a forced exit, which skips all cleanup.

    Safe from a signal handler and from any thread: it only copies a set and
    sends signals.
    """
    for process in list(_live_children):
        # exitcode polls the child: one already reaped is not signalled, so its
        # recycled pid is never hit. kill() sends nothing once it is known gone.
        with contextlib.suppress(OSError, ValueError, AssertionError):
            if process.exitcode is None:
                process.kill()


def _kill_children_on_forced_exit(code: int) -> None:
    kill_children()


on_forced_exit(_kill_children_on_forced_exit)


class ProcessService(FunctionService):
    """Runs ``fn`` in a fresh child process; ready once the child has imported it.

    Raises:
        NotPicklableError: (from the constructor) ``fn`` cannot be sent to a
            child process.
    """

    def __init__(
        self, fn: Callable[..., object], name: str, *, is_async: bool, pass_token: bool
    ) -> None:
        super().__init__(fn, name)
        _check_picklable(fn, name, defining=True)
        self.is_async = is_async
        self.pass_token = pass_token
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.pid: int | None = None
        # What the child sent as it ended ("ok", "error", or "exit" for EOF).
        self._ending: tuple[str, BaseException | None] | None = None
        # The descriptor that becomes readable when the child exits, and the
        # pidfd among them, which this service closes.
        self._death: int | None = None
        self._pidfd: int | None = None

    async def start(self) -> None:
        _check_picklable(self.fn, self.name, defining=False)
        done = self._begin()
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_child_main,
            args=(self.fn, self.is_async, self.pass_token, writer, os.getpid()),
            name=f"offloop-service-{self.name}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            writer.close()  # only the child writes; EOF then means it is gone
        assert process.pid is not None
        _live_children.add(process)
        self._process, self._conn, self.pid = process, reader, process.pid
        self._ending = None
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(reader.fileno(), self._on_message, ready, done)
        self._death, self._pidfd = _death_watch(process)
        loop.add_reader(self._death, self._on_death, ready, done)
        try:
            await ready
            self._ready()
        except asyncio.CancelledError:
            self._reap(kill=True)
            # Cancelled while the child was starting (a stop): this run is
            # over, whatever the repr said.
            self._finish(done, None)
            raise
        except BaseException:
            # The child ended before it was ready: start() raises its error, so
            # no run is left to wait() for (and its future's copy of the error
            # is not reported as never retrieved).
            self._reap(kill=True)
            self._finish(done, None)
            if not done.cancelled():
                done.exception()
            self._start_failed()
            raise

    def _on_message(self, ready: asyncio.Future[None], done: asyncio.Future[None]) -> None:
        conn = self._conn
        assert conn is not None
        message: tuple[str, Any]
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = ("exit", None)
        except Exception as e:  # the child's exception does not unpickle here
            bad = OffloopError(f"the process of service {self.name!r} sent an unreadable error")
            bad.__cause__ = e
            message = ("error", (bad, ""))
        kind: str = message[0]
        payload: Any = message[1]
        if kind == "ready":
            if not ready.done():
                ready.set_result(None)
            return
        # "ok", "error" or EOF: the child is ending. Its exit is awaited by
        # _on_death, without blocking the loop in join().
        asyncio.get_running_loop().remove_reader(conn.fileno())
        exc: BaseException | None = None
        if kind == "error":
            exc, remote_tb = payload
            assert exc is not None
            if remote_tb:
                exc.__cause__ = RemoteTraceback(remote_tb, "the service process")
            if not isinstance(exc, Exception):
                # SystemExit & co. must not escape into the supervisor's loop:
                # in the child they ended the service, which is a crash here.
                wrapped = OffloopError(f"the process of service {self.name!r} raised {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
        self._ending = (kind, exc)

    def _on_death(self, ready: asyncio.Future[None], done: asyncio.Future[None]) -> None:
        """The child has exited: end the run with what it sent before it went, if anything."""
        if self._death is not None:
            asyncio.get_running_loop().remove_reader(self._death)
        conn = self._conn
        # A message the loop has not read yet (poll() is also true at EOF).
        while self._ending is None and conn is not None and not conn.closed and conn.poll():
            self._on_message(ready, done)
        kind, exc = self._ending or ("exit", None)
        process = self._process
        if self._pidfd is None and process is not None and process.exitcode is None:
            # The sentinel (and EOF) fire as the child's files close, a step
            # before the kernel has its exit code: wait for it, off the loop's
            # back. A pidfd fires once the exit code is there.
            if conn is not None and not conn.closed:
                asyncio.get_running_loop().remove_reader(conn.fileno())
            deadline = time.monotonic() + _EXITING_WAIT
            self._await_exit(process, ready, done, kind, exc, deadline, _FIRST_POLL)
            return
        self._on_exit(ready, done, kind, exc)

    def _await_exit(
        self,
        process: multiprocessing.process.BaseProcess,
        ready: asyncio.Future[None],
        done: asyncio.Future[None],
        kind: str,
        exc: BaseException | None,
        deadline: float,
        delay: float,
    ) -> None:
        """Poll ``process``'s exit code from the loop until it is there, then end the run."""
        if done.done() or self._process is not process:
            return  # kill() or a cancelled start() has reaped it meanwhile
        if process.exitcode is None:
            if time.monotonic() < deadline:
                asyncio.get_running_loop().call_later(
                    delay,
                    self._await_exit,
                    *(process, ready, done, kind, exc, deadline, min(2 * delay, _LAST_POLL)),
                )
                return
            # Its files are closed but it runs on (it closed them itself): with
            # nothing left to hear it by, it is ended rather than left behind.
            self._on_exit(ready, done, kind, exc, kill=True)
            return
        self._on_exit(ready, done, kind, exc)

    def _on_exit(
        self,
        ready: asyncio.Future[None],
        done: asyncio.Future[None],
        kind: str,
        exc: BaseException | None,
        *,
        kill: bool = False,
    ) -> None:
        exitcode = self._reap(kill=kill)
        if kind not in ("ok", "error") and self._state is not LifecycleState.STOPPING:
            how = (
                f"closed its pipes to the parent but did not exit within {_EXITING_WAIT:g}s, "
                f"so it was killed (exit code {exitcode})"
                if kill
                else f"died with exit code {exitcode}"
            )
            if not ready.done() and not kill and exitcode is not None and exitcode > 0:
                how += self._start_hint()
            exc = WorkerCrashed(
                f"The process of service {self.name!r} (pid {self.pid}) {how}.",
                exitcode=exitcode,
                pid=self.pid,
            )
        if not ready.done():
            ready.set_exception(exc or OffloopError(f"service {self.name!r} ended while starting"))
            ready.exception()  # start() may be gone (cancelled); nothing else retrieves it
        self._finish(done, exc)

    def _start_hint(self) -> str:
        """Why a child that exited with an error code before it was ready died, and what to do.

        Such a child said nothing: it failed before ``_child_main`` ran, while
        the spawn method imported the program anew (the main module, then the
        function's). A script that starts its supervisor at its top level
        runs it again there, and the child's supervisor then dies of
        multiprocessing's "bootstrapping phase" error, printed on the child's
        stderr only.
        """
        guard = (
            "Guard the script's entry point with 'if __name__ == \"__main__\":' so that the "
            "new process does not run the program again, and check that these modules "
            "import without errors"
            if main_reaches_children("spawn")
            else "Check that the function's module imports without errors in a new process"
        )
        return (
            f" while starting, before it ran {describe(self.fn)}: it failed to import the "
            f"program again (isolate='process' starts the child with the 'spawn' method, which "
            f"imports the main module and the function's module anew). {guard}; the child's "
            f"traceback is on its standard error"
        )

    def _reap(self, *, kill: bool) -> int | None:
        process, conn = self._process, self._conn
        loop = asyncio.get_running_loop()
        if conn is not None:
            loop.remove_reader(conn.fileno())
            conn.close()
            self._conn = None
        if self._death is not None:
            loop.remove_reader(self._death)
            self._death = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if process is None:
            return None
        if kill and process.is_alive():
            process.kill()
        # Without kill, the child is known to be gone, so its exit code is there
        # at once (_on_death waited for it when no pidfd said so). Not join():
        # it waits on the sentinel, which a process the child forked may hold
        # open long after the child is gone.
        exitcode = _exit_code(process, _KILL_JOIN if kill else 0.0)
        if exitcode is not None:
            _live_children.discard(process)
            process.close()
            self._process = None
        return exitcode

    async def stop(self) -> None:
        process, done = self._process, self._mark_stopping()
        if process is None or done is None:
            return
        process.terminate()
        await asyncio.wait({done})

    def kill(self) -> list[str]:
        process = self._process
        if process is None:
            return []
        pid = process.pid
        exitcode = self._reap(kill=True)
        done = self._done
        if done is not None and not done.done():
            self._finish(done, None)
        if exitcode is None:
            return [f"process {process.name!r} (pid {pid}) survived SIGKILL"]
        return []

    def __repr__(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None and self._process is not None else ""
        return f"<ProcessService {self.name!r} {self._state.value}{pid} fn={describe(self.fn)}>"


def _exit_code(process: multiprocessing.process.BaseProcess, timeout: float) -> int | None:
    """The exit code of ``process``, polled (waitpid, no sentinel) for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (exitcode := process.exitcode) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    return exitcode


def _death_watch(process: multiprocessing.process.BaseProcess) -> tuple[int, int | None]:
    """A descriptor readable once ``process`` has exited, and the pidfd to close if it is one.

    multiprocessing's sentinel (and the message pipe's EOF) is the end of a
    pipe the child holds: a process the child forked (a fork-started pool's
    worker) inherits it and keeps it open after the child died. A pidfd
    (Linux >= 5.3) follows the child itself.
    """
    assert process.pid is not None
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        # OSError: no pidfd in this kernel or sandbox, or the child is already reaped.
        with contextlib.suppress(OSError):
            fd: int = pidfd_open(process.pid)
            return fd, fd
    return process.sentinel, None


def _check_picklable(fn: Callable[..., object], name: str, *, defining: bool) -> None:
    """Refuse a function the child could not get, before any child is started.

    ``defining``: called from the constructor, which ``@sv.service`` runs as a
    decorator, before the module binds the function's name: a top-level
    function whose name is not bound yet is accepted then, and checked again
    by ``start()``.

    Raises:
        NotPicklableError: naming the service and what to do.
    """
    target = fn.func if isinstance(fn, functools.partial) else fn
    if getattr(target, "__module__", None) == "__main__" and not main_reaches_children("spawn"):
        # The child would die unpickling it (exit code 1) before saying why.
        raise NotPicklableError(
            f"Service {name!r} uses isolate='process', but {describe(target)} is defined in "
            f"__main__, which a spawned child process cannot import when the program runs as "
            f"'python -m package', 'python -c' or interactively. Define it in a module of its "
            f"own and import it from there."
        )
    try:
        pickle.dumps(fn)
    except Exception as exc:
        if defining and _being_defined(fn):
            return
        raise NotPicklableError(
            f"Service {name!r} uses isolate='process', but {describe(fn)} cannot be sent to "
            f"a child process ({exc}). Define it at the top level of an importable module "
            f"(not inside a function, not a lambda), and do not rebind its name."
        ) from exc


def _being_defined(fn: object) -> bool:
    # A top-level function of a loaded module whose name is not bound yet:
    # the decorator over its 'def' is running.
    if not isinstance(fn, types.FunctionType) or fn.__qualname__ != fn.__name__:
        return False
    module = sys.modules.get(fn.__module__)
    return module is not None and fn.__name__ != "<lambda>" and not hasattr(module, fn.__name__)


def _child_main(
    fn: Callable[..., Any], is_async: bool, pass_token: bool, conn: Connection, parent_pid: int
) -> None:
    # Imported here: the parent has no use for the worker module.
    from .._process.child import _die_with_parent, outlive_group_signals

    _die_with_parent(parent_pid, pdeathsig=True)
    # Ctrl-C reaches the whole group: the parent's stop is this child's SIGTERM.
    outlive_group_signals(signal.SIGINT)
    token = StopToken()
    try:
        if is_async:
            asyncio.run(_child_async(fn, conn))
        else:
            if pass_token:
                _set_on_sigterm(token)
            conn.send(("ready", None))
            if pass_token:
                fn(token)
            else:
                fn()
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        conn.send(("error", (_portable(exc, text), text)))
        conn.close()
        sys.exit(1)
    conn.send(("ok", None))
    conn.close()


def _set_on_sigterm(token: StopToken) -> None:
    """In the child: SIGTERM sets ``token``.

    In the handler itself: ``StopToken.set()`` takes no lock, so it is safe
    there even when the signal interrupts the main thread inside a method of
    that token (``token.wait()``, most of the time).
    """
    signal.signal(signal.SIGTERM, lambda *_: token.set("terminated"))


async def _child_async(fn: Callable[[], Any], conn: Connection) -> None:
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    conn.send(("ready", None))
    try:
        await fn()
    except asyncio.CancelledError:
        if not terminated:
            raise


def _portable(exc: BaseException, text: str) -> BaseException:
    """The exception itself if it survives pickling, else a stand-in naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return OffloopError(f"the service process raised {exc!r}, which cannot be pickled")
    return exc

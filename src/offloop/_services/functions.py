"""Services made from plain functions by ``@Supervisor.service``.

- :class:`TaskService`: an ``async def`` run as a task on the supervisor's loop.
- :class:`ThreadService`: a plain ``def`` run in its own thread, stopped
  through a :class:`~offloop.StopToken`.
- :class:`LoopService`: an ``async def`` on its own event loop in its own
  thread (``isolate="loop"``), for coroutines that block their loop.
- :class:`~offloop._services.process.ProcessService` (in ``process.py``): either kind
  in a child process; :func:`~offloop._services.make.make_fn_service` picks one.

Each run gets fresh runtime state from ``start()``, so the supervisor can
restart them; :class:`FunctionService` gives them the shared lifecycle, a run
ending ENDED (returned or stopped) or CRASHED. Their threads are daemon threads named
``offloop-service-<name>``: a thread that ignores its token can then be
abandoned at shutdown instead of hanging the interpreter's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Final

from .._core.errors import OffloopError, WouldDeadlockError
from .._core.token import StopToken, WorkerCall, thread_state
from .._core.validate import describe
from .._loops.loopthread import LoopThread
from .base import ServiceInterrupted, supervisor_name
from .lifecycle import LifecycleService, LifecycleState, logger

__all__ = [
    "FunctionService",
    "LoopService",
    "TaskService",
    "ThreadService",
    "check_service_function",
    "describe_task",
    "describe_thread",
    "is_async_function",
    "takes_token",
]

AsyncFn = Callable[[], Coroutine[Any, Any, object]]


def check_service_function(fn: object, where: str) -> None:
    """Refuse what cannot be a function service: a coroutine object, a generator, a non-callable.

    Raises:
        TypeError: naming ``where`` (the decorator) and what ``fn`` is.
    """
    if inspect.iscoroutine(fn):
        fn.close()
        raise TypeError(
            f"{where} needs a function, but got a coroutine object ({describe(fn)}). "
            f"Decorate the 'async def' function itself, without calling it."
        )
    kind = (
        "an async generator function"
        if inspect.isasyncgenfunction(fn)
        else "a generator function"
        if inspect.isgeneratorfunction(fn)
        else None
    )
    if kind is not None:
        # The 'def' looks right to whoever wrote it: say that the 'yield' is the problem.
        raise TypeError(
            f"{where} needs an 'async def' or plain 'def' function, got {describe(fn)}, "
            f"{kind} (it contains 'yield'), which would only make a generator object: write it "
            f"without 'yield'."
        )
    if not callable(fn):
        raise TypeError(
            f"{where} needs an 'async def' or plain 'def' function, got {describe(fn)}."
        )


def is_async_function(fn: object) -> bool:
    """Whether a service function runs on an event loop: an ``async def``, or an object whose
    ``__call__`` is one.

    ``inspect.iscoroutinefunction()`` looks at the object, not at its ``__call__``: such an
    object would otherwise be run in a thread, where calling it only makes a coroutine.
    """
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn)
        and not isinstance(fn, (type, functools.partial))
        and inspect.iscoroutinefunction(type(fn).__call__)
    )


def takes_token(fn: Callable[..., object], where: str) -> bool:
    """Whether a service function wants the StopToken (one required parameter).

    Raises:
        TypeError: the function needs more than one argument.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call them bare
        return False
    required = [
        p
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) > 1 or any(p.kind is p.KEYWORD_ONLY for p in required):
        names = ", ".join(p.name for p in required)
        raise TypeError(
            f"{where} got {describe(fn)}, which needs the arguments ({names}). A service "
            f"function takes no argument, or exactly one: the offloop.StopToken that is set "
            f"when it must stop. Bind other arguments first, e.g. with functools.partial."
        )
    return len(required) == 1


_MACHINERY: Final = (
    threading.__file__,
    os.path.dirname(asyncio.__file__) + os.sep,
    # offloop itself: this module is in its _services subpackage.
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def describe_thread(thread: threading.Thread) -> str:
    """The thread's name and its current stack, for the 'abandoned' log line."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return f"thread {thread.name!r} (no stack: it is not running Python code)"
    return f"thread {thread.name!r}, currently at:\n{_user_stack(traceback.extract_stack(frame))}"


def describe_task(task: asyncio.Task[Any]) -> str:
    """The task's name and where it is suspended, for the 'abandoned' log line.

    ``Task.get_stack()`` gives the task's outer coroutine only; the frame that
    swallows the cancellation is down its chain of awaits.
    """
    frames = []
    coro: Any = task.get_coro()
    while coro is not None and (frame := getattr(coro, "cr_frame", None)) is not None:
        frames.append((frame, frame.f_lineno))
        coro = getattr(coro, "cr_await", None)
    stack = _user_stack(traceback.StackSummary.extract(frames))
    return f"task {task.get_name()!r}, which ignores its cancellation, currently at:\n{stack}"


def _user_stack(every: traceback.StackSummary) -> str:
    # threading's bootstrap, asyncio's loop and offloop's own frames say nothing
    # about why it hangs; the user's frames do (the innermost frame if none is).
    frames = [f for f in every if not f.filename.startswith(_MACHINERY)] or every[-1:]
    return "".join(traceback.format_list(frames)).rstrip()


class FunctionService(LifecycleService):
    """What the function services share: the function, and the lifecycle of its runs.

    A run ends ENDED when the function returned or was stopped, CRASHED when
    it raised.
    """

    _CLEAN_END = LifecycleState.ENDED
    # "Cannot wait <ThreadService ...>": the wording callers of these services match on.
    _WAIT_VERB = "wait"

    def __init__(self, fn: Callable[..., object], name: str) -> None:
        super().__init__(name)
        self.fn = fn
        # The token the runs in threads watch (None for a service with none).
        self._token: StopToken | None = None
        # The loop's end cancelled the run's tasks: stop() lets that
        # cancellation run its course instead of cancelling them again.
        self._cancelled_by_loop = False

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"<{kind} {self.name!r} {self._state.value} fn={describe(self.fn)}>"

    def signal_stop(self, reason: str) -> None:
        if self._token is not None:
            self._token.set(reason)

    def tasks_cancelled(self) -> None:
        self._cancelled_by_loop = True


class TaskService(FunctionService):
    """An ``async def`` run as a task on the supervisor's loop; stopped by cancellation."""

    def __init__(self, fn: AsyncFn, name: str) -> None:
        super().__init__(fn, name)
        self._async_fn = fn
        self._task: asyncio.Task[object] | None = None

    async def start(self) -> None:
        done = self._begin()
        self._cancelled_by_loop = False
        task = asyncio.get_running_loop().create_task(
            self._guarded(), name=f"offloop-service-{self.name}"
        )
        self._task = task

        def on_done(t: asyncio.Task[object]) -> None:
            # A cancelled task is a stopped service, not a crash.
            exc = None if t.cancelled() else t.exception()
            self._finish(done, exc, cancelled=t.cancelled())

        task.add_done_callback(on_done)
        self._ready()

    def _coroutine(self) -> Coroutine[Any, Any, object]:
        return self._async_fn()

    async def _guarded(self) -> object:
        try:
            return await self._coroutine()
        # A task lets these two escape through the event loop, which ends the
        # whole supervisor at once, with no grace for the other services.
        except KeyboardInterrupt as e:
            # Ctrl-C on Python 3.10 lands in whatever code runs: stop everything
            # gracefully, as the supervisor's own Ctrl-C handling does.
            raise ServiceInterrupted(
                f"Service {self.name!r} raised KeyboardInterrupt, so its supervisor stops "
                f"every service, as on Ctrl-C."
            ) from e
        except SystemExit as e:
            # Like in a ThreadService: a crash of this service only.
            raise OffloopError(
                f"Service {self.name!r} raised {e!r}, which would have ended the whole event "
                f"loop at once; it counts as a crash of this service. Return from the "
                f"coroutine to end the service, or call the supervisor's stop() to end them all."
            ) from e

    async def stop(self) -> None:
        task = self._task
        if task is None or task.done() or self._mark_stopping() is None:
            return
        if not self._cancelled_by_loop:
            task.cancel("offloop service stopping")
        await asyncio.wait({task})

    def kill(self) -> list[str]:
        task, done = self._task, self._done
        if task is None or task.done() or done is None:
            return []
        task.cancel("offloop service killed")
        # Whether it ignores this cancellation too shows in its next step: most
        # tasks end there, and one that does is stopped, not abandoned. Judged
        # after that step (it is queued first), before a cascade's start().
        task.get_loop().call_soon(self._abandon_if_deaf, task, done)
        return []

    def _abandon_if_deaf(self, task: asyncio.Task[object], done: asyncio.Future[None]) -> None:
        if task.done():
            return  # it honoured the kill: its end, on its way, ends the run
        self._abandon(done, f"task {task.get_name()!r}")
        logger.warning(
            "%s: service %r abandoned %s", supervisor_name(self), self.name, describe_task(task)
        )


class ThreadService(FunctionService):
    """A plain ``def`` run in its own thread; ``stop()`` sets its StopToken.

    The function receives the token when it takes a parameter; it can also
    reach it with :func:`offloop.current_token`.
    """

    def __init__(self, fn: Callable[..., object], name: str, *, pass_token: bool) -> None:
        super().__init__(fn, name)
        self.pass_token = pass_token
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        done = self._begin()
        loop = asyncio.get_running_loop()
        token = self._token = StopToken()
        # The context variables of the caller, as asyncio.to_thread and
        # offloop.to_thread give them, and as an async def service sees them in
        # its task: a copy, so the thread's changes stay in the thread.
        ctx = contextvars.copy_context()
        thread = threading.Thread(
            target=ctx.run,
            args=(self._main, loop, done, token),
            name=f"offloop-service-{self.name}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        self._ready()

    def _body(self, token: StopToken) -> None:
        result = self.fn(token) if self.pass_token else self.fn()
        if inspect.iscoroutine(result):
            result.close()  # no "never awaited" warning on top of this error
            raise TypeError(
                f"Service {self.name!r}: {describe(self.fn)} returned a coroutine, so it is "
                f"asynchronous, but it does not look like a coroutine function. Define it "
                f"with 'async def' so the supervisor runs it on an event loop."
            )

    def _main(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], token: StopToken
    ) -> None:
        thread_state.call = WorkerCall(self.fn, loop, token)
        exc: BaseException | None = None
        try:
            self._body(token)
        except Exception as e:
            exc = e
        except BaseException as e:  # SystemExit etc.: a crash of this service only
            exc = OffloopError(f"service {self.name!r} raised {e!r} in its thread")
            exc.__cause__ = e
        finally:
            thread_state.call = None
        # RuntimeError: the loop is closed, the supervisor abandoned this thread long ago.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, done, exc)
        del exc  # no reference cycle through the traceback's frames

    async def stop(self) -> None:
        token, done = self._token, self._mark_stopping()
        if token is None or done is None:
            return
        token.set("service stopping")
        await asyncio.wait({done})

    def live_threads(self) -> list[threading.Thread]:
        thread = self._thread
        return [thread] if thread is not None and thread.is_alive() else []

    def kill(self) -> list[str]:
        self.signal_stop("service killed")
        thread, done = self._thread, self._done
        # A finished run's thread may still be alive for a few instructions
        # after handing its outcome to the loop: that is not an abandoned thread.
        if thread is None or not thread.is_alive() or done is None or done.done():
            return []
        self._abandon(done, f"thread {thread.name!r}")
        return [describe_thread(thread)]


class LoopService(TaskService):
    """An ``async def`` on its own :class:`~offloop.LoopThread` (``isolate="loop"``).

    A coroutine that blocks its loop (a ``time.sleep``, a busy ``while True``)
    only stalls that private loop, in the thread ``offloop-loop-service-<name>``.
    ``stop()`` cancels the coroutine there and closes the loop thread; one
    that stays blocked in sync code is abandoned by ``kill()``.
    """

    def __init__(self, fn: AsyncFn, name: str) -> None:
        super().__init__(fn, name)
        self._loop_thread: LoopThread | None = None

    def _coroutine(self) -> Coroutine[Any, Any, object]:
        lt = self._loop_thread = LoopThread(name=f"service-{self.name}").start()
        return self._run_there(lt)

    async def _run_there(self, lt: LoopThread) -> object:
        try:
            result = await lt.run(self._async_fn)
        except GeneratorExit:
            # Garbage-collected while pending: the supervisor's loop was closed
            # under it, and nothing can be awaited any more. Close the loop
            # thread without waiting (loop_closed() has, if the loop's close()
            # was watched), and no "no running event loop" from aclose().
            self._close_loop_thread(lt)
            raise
        except BaseException:
            await self._join_loop_thread(lt)
            raise
        await self._join_loop_thread(lt)
        return result

    async def _join_loop_thread(self, lt: LoopThread) -> None:
        # Cancelled or not, the remote task is finished or cancelled: join
        # the thread. A coroutine blocked in sync code holds this up until
        # the supervisor's grace runs out and kill() abandons it.
        await lt.aclose()

    def _close_loop_thread(self, lt: LoopThread) -> None:
        # Without a join (live_threads() is joined within grace by whoever
        # can wait); it raises only when called from that loop thread itself,
        # which is closing then anyway.
        with contextlib.suppress(WouldDeadlockError):
            lt._begin_close()

    def loop_closed(self) -> None:
        # The task that would close the loop thread (see _run_there) is left
        # pending on the closed loop: close it from here, or its thread and
        # the coroutine run on for as long as the program does. Not in
        # signal_stop(): while the supervisor's loop still runs, its stop
        # cancels the coroutine once, and a close now would cancel it a
        # second time, in the middle of its cleanup.
        lt = self._loop_thread
        if lt is not None:
            self._close_loop_thread(lt)

    def live_threads(self) -> list[threading.Thread]:
        # This run's thread itself, not every thread of its name: a thread of the
        # program's, or a previous run's abandoned loop thread, may be named so too.
        lt = self._loop_thread
        thread = None if lt is None else lt._thread
        return [thread] if thread is not None and thread.is_alive() else []

    def kill(self) -> list[str]:
        task = self._task
        if task is not None:
            task.cancel("offloop service killed")
        return [describe_thread(thread) for thread in self.live_threads()]

"""Crossings: run a coroutine on another thread's loop and bring its outcome back.

Sync callers (``from_thread``, ``LoopThread.call``) block on a pre-acquired
``_thread`` lock that the loop side releases: one ``call_soon_threadsafe``
there, one lock release back, no ``concurrent.futures.Future`` in between, and
a short poll before sleeping so a quick coroutine's reply costs no futex
wake-up. Async callers (``LoopThread.run``, ``to_loop``) get the outcome
through one ``call_soon_threadsafe`` on their own loop. The coroutine is
created on the target loop, inside a copy of the caller's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from _thread import allocate_lock
from collections.abc import Awaitable, Callable, Coroutine
from time import monotonic
from types import CoroutineType
from typing import Any, Final, Protocol, TypeVar

from .._core.errors import CallerGoneError, WouldDeadlockError
from .._core.spin import SpinTuner, poll_lock
from .._core.token import StopToken
from .._core.validate import describe

__all__ = [
    "CallHost",
    "Reply",
    "refuse_on_running_loop",
    "refuse_own_idle_loop",
    "refuse_when_stopped",
    "start_sync",
    "wait_reply",
]

R = TypeVar("R")

_get_running_loop: Final = asyncio._get_running_loop
_current_task: Final = asyncio.current_task

#: Seconds between checks, while a sync caller waits, that the target loop
#: still exists. A loop closed under a waiting caller never answers; this
#: bounds how long the caller keeps waiting for it.
POLL_INTERVAL: Final = 0.25

#: Seconds a sync caller polls for the reply before it sleeps on its lock,
#: where that pays (:data:`REPLY_POLLING` measures it, see _core/spin.py). A
#: reply that lands while the caller still polls saves the caller's thread
#: wake-up, on some machines about half of a sequential round trip
#: (``benchmarks.bench_from_thread``).
SPIN_WINDOW: Final = 50e-6

#: Whether sync callers poll for their reply: one choice for the process,
#: measured on the replies of every caller (they share it without a lock).
REPLY_POLLING: Final = SpinTuner(SPIN_WINDOW)


# Why a sync caller stopped waiting before the coroutine's outcome arrived.
TOKEN_SET: Final = "token set"
LOOP_CLOSED: Final = "loop closed"
INTERRUPTED: Final = "interrupted"
TIMED_OUT: Final = "timed out"


class CallHost(Protocol):
    """The loop thread a crossing was submitted to, which counts and may refuse its calls.

    ``None`` stands for it when a crossing targets a bare loop (``to_loop``).
    """

    def _call_finished(self) -> None:
        """Count the call as done (runs on the host's loop)."""

    def _cancel_error(self, coro: Coroutine[Any, Any, Any]) -> BaseException | None:
        """The error to report instead of a cancellation caused by closing, if any."""

    def _start_refused(self, async_fn: Callable[..., Any]) -> BaseException | None:
        """The error to report instead of starting a call, if the host is closing."""

    def _exiting(self, task: asyncio.Task[Any] | None) -> None:
        """A call's coroutine raised SystemExit or KeyboardInterrupt in ``task``.

        It stops the host's loop, and its caller has it already: the host
        marks it retrieved so the task is not logged as "Task exception was
        never retrieved" when collected.
        """


_BLOCKS: Final = (
    "It blocks until the coroutine finishes, and blocking here would deadlock the loop that "
    "has to run it (or stall every other task on it)."
)


def refuse_on_running_loop(where: str, instead: str, *, why: str = _BLOCKS) -> None:
    """Raise :class:`WouldDeadlockError` when this thread runs an event loop."""
    loop = _get_running_loop()
    if loop is not None:
        raise WouldDeadlockError(
            f"{where} was called on the thread of a running event loop ({loop!r}). {why} {instead}"
        )


def refuse_own_idle_loop(loop: asyncio.AbstractEventLoop, where: str) -> None:
    """Raise :class:`WouldDeadlockError` if ``loop`` is this thread's loop and not running.

    Only this thread would run it, and a blocking crossing blocks this thread
    until it has. (Not ``asyncio.get_event_loop()``: it may create a loop or warn.)
    """
    if loop.is_running():
        return
    policy = getattr(asyncio.events, "_event_loop_policy", None)
    if getattr(getattr(policy, "_local", None), "_loop", None) is not loop:
        return
    raise WouldDeadlockError(
        f"{where} was called for {loop!r}, this thread's event loop, which is not running: "
        f"only this thread could run it, and it would block waiting for it forever. Run the "
        f"coroutine on it here ('loop.run_until_complete(...)'), or send it to a loop running "
        f"in another thread (a LoopThread, or offloop.set_from_thread_loop(None))."
    )


def _coroutine(
    async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Coroutine[Any, Any, Any]:
    # Called on the target loop, inside the caller's copied context.
    coro: object = async_fn(*args, **kwargs)  # whatever the annotation promised
    if type(coro) is CoroutineType:
        return coro
    if inspect.isawaitable(coro):
        return _await(coro)
    if inspect.isasyncgen(coro):
        raise TypeError(
            f"{describe(async_fn)} is an async generator function: it returns an async iterator to "
            f"'async for' over, not a coroutine to run. Wrap the iteration in a coroutine "
            f"(e.g. 'async def collect(): return [x async for x in gen()]') and pass that."
        )
    raise TypeError(
        f"{describe(async_fn)} returned {describe(coro)}, not a coroutine or awaitable, so it "
        f"is sync code: call it directly, or use offloop.to_thread() if it blocks."
    )


async def _await(awaitable: Awaitable[R]) -> R:
    return await awaitable


# -- sync callers ------------------------------------------------------------


class Reply:
    """One sync crossing: the lock its caller waits on and the outcome it wakes up to.

    The loop side (the result) and the stop paths (token set, loop closed,
    interrupted) may race to post. ``claim`` settles it: only the first
    poster takes it (``acquire(False)`` is atomic), stores its outcome and
    releases ``lock``, the caller's, so the caller reads the winner's outcome.
    A taken ``claim`` also tells a start still queued on the loop that the
    caller is gone.
    """

    __slots__ = ("claim", "host", "lock", "loop", "outcome", "started", "task", "worker")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, host: CallHost | None, *, worker: bool = False
    ) -> None:
        self.lock = allocate_lock()
        self.lock.acquire()
        self.claim = allocate_lock()
        #: What the first poster stored: ``(True, value)``, ``(False, exception)``
        #: or why the caller stopped waiting (``TOKEN_SET``, ...).
        self.outcome: object = None
        self.loop = loop
        self.host = host
        self.task: asyncio.Task[None] | None = None
        self.started = False
        #: The caller is an offloop worker, and ``loop`` the loop that sent it its work.
        self.worker = worker

    def post(self, outcome: object) -> None:
        if self.claim.acquire(False):  # else another poster won: its outcome stands
            self.outcome = outcome
            self.lock.release()

    def on_token(self, token: StopToken) -> None:
        # Runs in whichever thread sets the worker's token. Decided on the
        # loop, where the coroutine's outcome is posted: a coroutine that
        # completed before the stop got there gives its result, any other is
        # cancelled and the caller stopped.
        try:
            self.loop.call_soon_threadsafe(self.stop_on_loop)
        except RuntimeError:  # the loop is closed: nothing runs there any more
            self.post(TOKEN_SET)

    def stop_on_loop(self) -> None:
        # Wins only if nothing was posted yet, i.e. the coroutine has not
        # completed: a result already posted stands.
        self.post(TOKEN_SET)
        self.cancel_remote()  # a no-op on a task that completed

    def gone(self, why: str) -> None:
        self.post(why)
        # A closed loop runs nothing any more: there is nothing to cancel.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.cancel_remote)

    def cancel_remote(self) -> None:
        task = self.task
        if task is not None:
            task.cancel()


def start_sync(
    reply: Reply,
    async_fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Start a sync crossing's coroutine (runs on the target loop, in the caller's context)."""
    host = reply.host
    if reply.claim.locked():  # the caller stopped waiting before we got here
        if host is not None:
            host._call_finished()
        return
    try:
        # A start still queued when the loop began closing (a coroutine's
        # SystemExit stopped it) must not create a task the close never sees.
        refused = host._start_refused(async_fn) if host is not None else None
        if refused is not None:
            raise refused
        coro = _coroutine(async_fn, args, kwargs)
    except BaseException as exc:
        if host is not None:
            host._call_finished()
        reply.post((False, exc))
        return
    loop = reply.loop
    try:
        reply.task = task = _create_task(loop, _run_sync(reply, coro), coro)
    except BaseException as exc:
        # A task factory that raises: the caller gets its error, as from
        # run_coroutine_threadsafe, instead of waiting for a task never made.
        if host is not None:
            host._call_finished()
        reply.post((False, exc))
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return
    if not _step_now(loop, task):
        task.add_done_callback(lambda t: _sync_never_ran(t, reply, coro))


def _create_task(
    loop: asyncio.AbstractEventLoop,
    runner: Coroutine[Any, Any, None],
    coro: Coroutine[Any, Any, Any],
) -> asyncio.Task[None]:
    """``loop.create_task(runner)``; if that raises, both coroutines are closed first."""
    try:
        return loop.create_task(runner)
    except BaseException:
        runner.close()  # never awaited: no warnings about either
        coro.close()
        raise


def _step_now(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> bool:
    """Run ``task``'s first step now, as Python 3.12's eager tasks do; True if it ran.

    A new task's first step waits for the loop's next iteration: one more
    ``epoll_wait`` per crossing, and a done callback to catch a task
    cancelled before that step. Taking the step off the ready queue and
    running it here saves both, a sizeable share of a sync round trip
    (``benchmarks.bench_from_thread`` shows it). Only
    asyncio's own loops keep a ``_ready`` deque; on others (uvloop) or with
    a task factory that schedules differently, the step is left where it is.
    """
    ready = getattr(loop, "_ready", None)
    # Inside a running task the step could not enter its own: leave it queued.
    if ready and _current_task(loop) is None:
        handle = ready[-1]
        if getattr(getattr(handle, "_callback", None), "__self__", None) is task:
            ready.pop()
            handle._run()
            return True
    return False


def _sync_never_ran(task: asyncio.Task[None], reply: Reply, coro: Coroutine[Any, Any, Any]) -> None:
    # A task cancelled before its first step (its loop closing, its caller
    # gone) never runs _run_sync's body, the one place that reports the
    # outcome and settles the host's count: do both here instead.
    if reply.started or not task.cancelled():
        return
    coro.close()  # never awaited: no warning about it
    host = reply.host
    error: BaseException | None = None
    if host is not None:
        host._call_finished()
        error = host._cancel_error(coro)
    reply.post((False, error or _cancelled_on_loop(reply, coro, asyncio.CancelledError())))


async def _run_sync(reply: Reply, coro: Coroutine[Any, Any, Any]) -> None:
    reply.started = True
    host = reply.host
    try:
        value = await coro
    except BaseException as exc:
        reply.post((False, _sync_error(reply, coro, exc)))
        # Only these stop a loop (asyncio re-raises them from the task); any
        # other exception the caller now has, so the task ends quietly, not
        # with an exception logged as never retrieved.
        exiting = isinstance(exc, (SystemExit, KeyboardInterrupt))
        if exiting and host is not None:
            host._exiting(asyncio.current_task())
        # The error's traceback holds this frame. Holding the reply too would
        # make a cycle (error -> frame -> reply -> error), and holding the
        # host would keep a dropped LoopThread alive as long as the error.
        del reply, host, coro
        if exiting:
            # KeyboardInterrupt, SystemExit: let them stop the loop too, at
            # once, as in asyncio (the calls queued behind them never start).
            raise
    else:
        if host is not None:
            host._call_finished()
        reply.post((True, value))


def _sync_error(
    reply: Reply, coro: Coroutine[Any, Any, Any], exc: BaseException
) -> BaseException | None:
    # What the sync caller gets for the coroutine's exception; counts the call done.
    host = reply.host
    if host is not None:
        host._call_finished()
    if isinstance(exc, asyncio.CancelledError):
        closing = host._cancel_error(coro) if host is not None else None
        return closing or _cancelled_on_loop(reply, coro, exc)
    return exc


def _cancelled_on_loop(
    reply: Reply, coro: Coroutine[Any, Any, Any], exc: asyncio.CancelledError
) -> CallerGoneError:
    # The coroutine was cancelled on its loop, not by the sync caller (whose
    # own stop ends the wait first, with its own message). Every sync caller
    # gets this one type for it: a caller is no task, and a bare
    # CancelledError is a BaseException that `except Exception` would miss.
    if reply.worker:
        why = (
            f"the event loop that sent this work to the thread ({reply.loop!r}); it is "
            f"probably shutting down. Return from the worker function."
        )
    else:
        why = (
            f"the event loop it ran on ({reply.loop!r}), by something there (a task.cancel(), "
            f"a timeout, the loop shutting down), not by this caller, so it has no result."
        )
    error = CallerGoneError(f"{describe(coro)} was cancelled on {why}")
    error.__cause__ = exc
    return error


def wait_reply(
    reply: Reply,
    token: StopToken | None,
    where: str,
    async_fn: Callable[..., Any],
    timeout: float | None = None,
) -> Any:
    """Block until ``reply`` has its outcome; return the result or raise the error.

    With a ``token`` (the calling worker's), setting it ends the wait with
    :class:`CallerGoneError` and cancels the coroutine, unless the coroutine
    completed before the stop reached its loop: then its outcome is returned.
    With a ``timeout``, the wait ends after that many seconds with
    ``TimeoutError`` and the coroutine is cancelled (a call not started yet never starts).
    """
    lock = reply.lock
    loop = reply.loop
    deadline = None if timeout is None else monotonic() + timeout
    if token is not None:
        token.add_callback(reply.on_token)
    polling = REPLY_POLLING
    window = polling.window
    waited = monotonic()
    try:
        if not poll_lock(lock.acquire, waited + window):
            while not lock.acquire(True, _slice(deadline)):
                if deadline is not None and monotonic() >= deadline:
                    reply.gone(TIMED_OUT)
                elif loop.is_closed():
                    reply.gone(LOOP_CLOSED)
                elif token is not None and token.is_set() and not loop.is_running():
                    # A stopped loop cannot decide the stop (nor complete
                    # the coroutine): the caller is gone, the wait ends.
                    reply.gone(TOKEN_SET)
    except BaseException:  # e.g. KeyboardInterrupt in the main thread
        reply.gone(INTERRUPTED)
        raise
    finally:
        if token is not None:
            token.remove_callback(reply.on_token)
    polling.record(monotonic() - waited, window)
    outcome = reply.outcome
    # Dropped: an exception's traceback would keep frames alive. The claim
    # stays taken, so a start still queued on the loop sees the caller gone.
    reply.outcome = None
    if type(outcome) is tuple:
        ok, value = outcome
        if ok:
            return value
        try:
            raise value
        finally:
            del value, outcome
    if outcome == TIMED_OUT:
        raise TimeoutError(
            f"{where} of {describe(async_fn)} did not finish within {timeout} s, so it was "
            f"cancelled on its loop (a call not started yet never starts). Give it a longer "
            f"timeout, or none."
        )
    if outcome == TOKEN_SET:
        reason = token.reason if token is not None else None
        raise CallerGoneError(
            f"{where} of {describe(async_fn)} was stopped, and the coroutine cancelled, "
            f"because this worker's stop token was set ({reason!r}): {_why_stopped(reason)} "
            f"Return from the worker function; poll offloop.current_token() to stop early."
        )
    raise CallerGoneError(
        f"{where} of {describe(async_fn)} cannot finish: the event loop it runs on "
        f"({loop!r}) was closed while this thread waited. Return from the worker function."
    )


def _slice(deadline: float | None) -> float:
    # How long one blocking acquire may sleep: a poll interval, or less to the deadline.
    if deadline is None:
        return POLL_INTERVAL
    return max(0.0, min(POLL_INTERVAL, deadline - monotonic()))


def refuse_when_stopped(token: StopToken | None, where: str, async_fn: Callable[..., Any]) -> None:
    """Raise :class:`CallerGoneError`, before anything is sent, if the worker's token is set.

    Its awaiter is gone (or its pool closing): nobody would use the result,
    so the coroutine is not run at all, as trio's ``from_thread.run`` refuses
    after a cancellation.
    """
    if token is not None and token.is_set():
        reason = token.reason
        raise CallerGoneError(
            f"{where} of {describe(async_fn)} was refused, and the coroutine not run, because "
            f"this worker's stop token is set ({reason!r}): {_why_stopped(reason)} Return "
            f"from the worker function; poll offloop.current_token() to stop early."
        )


def _why_stopped(reason: str | None) -> str:
    if reason == "cancelled":
        return "the task awaiting this worker was cancelled, so nobody uses the result."
    if reason == "pool closing":
        return "its pool is closing and asks its running calls to stop."
    return "the worker was asked to stop (its awaiter cancelled, or its pool or service stopping)."


# -- async callers -----------------------------------------------------------

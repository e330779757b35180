"""The pieces every pool shares: the call record, the result channel, the future.

A call costs one ``SimpleQueue.put`` on the loop side, one ``get`` in the
worker, and at most one ``call_soon_threadsafe`` per *batch* of results:
workers append finished calls to a per-loop :class:`Channel` and only wake the
loop when the channel was empty, so a burst of 500 calls finishing together
costs a handful of wake-ups instead of 500.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import Any, Final, Protocol, TypeVar

from .token import StopToken
from .validate import describe

__all__ = [
    "CallPhase",
    "CancelHandler",
    "Channel",
    "DeferredCancel",
    "OffloadFuture",
    "channel_for",
    "deliverable",
    "loop_local",
    "mark_retrieved",
    "new_call",
    "release",
    "running_loop",
]

R = TypeVar("R")


class CallPhase(enum.IntEnum):
    """Where one offloaded call is; the pools' one record of it, kept in ``_phase``.

    Every change of phase happens under the owning pool's lock. The legal
    transitions, and who makes them::

        BATCHED --- its loop's batch goes to the pool ----> QUEUED    (ThreadPool)
        BATCHED --- cancelled, or the pool closed --------> SKIPPED   (never runs)
        QUEUED ---- a worker takes it --------------------> RUNNING
        QUEUED ---- cancelled, or the pool closes --------> SKIPPED   (never runs)
        QUEUED ---- its pool gives up on it --------------> DONE      (ProcessPool, with an error)
        RUNNING --- the function returns or raises -------> DONE
        RUNNING --- cancelled, on_cancel="abandon" -------> ABANDONED
        RUNNING --- cancelled, on_cancel="wait" ----------> CANCELLING
        RUNNING --- its process died before it ran -------> QUEUED    (ProcessPool, once)
        ABANDONED - the function returns or raises -------> DONE      (nobody awaits it)
        CANCELLING  the function returns or raises -------> DONE      (delivered as the cancel)

    BATCHED is a ThreadPool call its loop made while an earlier call of the
    same loop iteration waited in the pool: it waits in the loop's
    :class:`Channel` (``batch``) and is handed to the pool with the others at
    the next iteration (``_threads/dispatch.py``). Its phase changes on its
    loop's thread or under the pool's lock.

    SKIPPED and DONE are final. A SKIPPED call stays in the queue until a
    worker pops it and drops it: removing it from a ``SimpleQueue`` is not
    possible, and the worker that pops it frees the slot it had claimed.
    """

    QUEUED = 0
    RUNNING = 1
    ABANDONED = 2
    SKIPPED = 3
    DONE = 4
    CANCELLING = 5
    BATCHED = 6


# Module-level names, because the hot path compares phases with ``is`` and a
# global lookup is cheaper than an attribute lookup on the enum class.
QUEUED: Final = CallPhase.QUEUED
RUNNING: Final = CallPhase.RUNNING
ABANDONED: Final = CallPhase.ABANDONED
SKIPPED: Final = CallPhase.SKIPPED
DONE: Final = CallPhase.DONE
CANCELLING: Final = CallPhase.CANCELLING
BATCHED: Final = CallPhase.BATCHED


class DeferredCancel(asyncio.CancelledError):
    """The outcome of a call cancelled with ``on_cancel="wait"``, once its function returned.

    Its own type, so that a function which itself raises ``CancelledError``
    reaches the awaiter as that exception, message and traceback included, as
    with ``asyncio.to_thread``.
    """


class CancelHandler(Protocol):
    """What an :class:`OffloadFuture` asks when it is cancelled (the pool)."""

    def _cancel(self, call: OffloadFuture[Any]) -> bool:
        """Apply the pool's cancel policy; return whether the future cancels now."""
        ...


class Channel:
    """Delivers finished calls to one event loop, batching the wake-ups.

    It holds its loop only weakly: the per-thread cache in
    :func:`channel_for` keeps the last channel after ``asyncio.run()``
    returns, and must not keep the closed loop (and all it references) alive
    with it. The calls in flight hold the loop, so it is alive while they are.
    """

    __slots__ = ("batch", "batch_owner", "loop_ref", "pending", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)
        self.pending: deque[OffloadFuture[Any]] = deque()
        self.scheduled = False
        # The calls this loop made for batch_owner (a pool) in this iteration,
        # waiting to go to it in one go: see _threads/dispatch.py. Read and
        # written only on the loop's thread; None: no batch open.
        self.batch: list[OffloadFuture[Any]] | None = None
        self.batch_owner: object = None

    def post(self, call: OffloadFuture[Any]) -> None:
        """Hand a finished call to the loop (called from worker threads)."""
        sink = call._sink
        if sink is not None:
            # Its owner completes it here, in this thread, with no trip through
            # the loop; the future itself stays pending (see OffloadFuture._sink).
            sink(call)
            release(call)
            return
        self.pending.append(call)
        # drain() clears the flag before it pops, so a call appended while it
        # runs is either popped by it or triggers a new drain: never lost.
        if not self.scheduled:
            self.scheduled = True
            try:
                call.loop.call_soon_threadsafe(self.drain)
            except RuntimeError:
                # The loop is closed: nobody is left to receive the result.
                self.pending.clear()
        elif call.loop.is_closed():
            # It closed before the scheduled drain ran, so none will: these
            # results reach nobody, and kept here they would keep it alive.
            self.pending.clear()

    def drain(self) -> None:
        """Complete the futures of every posted call (runs on the loop)."""
        self.scheduled = False
        pop = self.pending.popleft
        while True:
            try:
                call = pop()
            except IndexError:
                return
            if not call.done():
                error = call._error
                if error is None:
                    call.set_result(call._value)
                elif type(error) is DeferredCancel:
                    # A cancellation deferred until the function returned.
                    asyncio.Future.cancel(call, getattr(call, "_cancel_msg", None))
                else:
                    call.set_exception(deliverable(call, error))
            # release(call), inlined: this runs once per call.
            call._error = call._value = call._ctx = None
            call._args = ()
            call._kwargs = _NO_KWARGS


def deliverable(call: OffloadFuture[Any], error: BaseException) -> BaseException:
    """The exception to deliver for a call that raised ``error`` (not a DeferredCancel)."""
    if isinstance(error, StopIteration):
        return _stop_iteration(call, error)
    return error


def release(call: OffloadFuture[Any]) -> None:
    """Let go of what only the worker needed, once the outcome is delivered."""
    # Break the cycle exception -> traceback -> frame -> call early, and
    # drop the arguments and context: a future kept after its call (in a
    # list, by gather) must not keep them alive. fn stays, for messages.
    call._error = call._value = call._ctx = None
    call._args = ()
    call._kwargs = _NO_KWARGS


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback for a future nobody will await: read its outcome.

    asyncio logs an exception left unread in a collected future as "never
    retrieved"; a future whose awaiter left (or never came) has nobody to
    read it, and is not worth that line.
    """
    if not future.cancelled():
        future.exception()


#: What a finished call's keyword arguments become (never mutated).
_NO_KWARGS: Final[dict[str, Any]] = {}


def _stop_iteration(call: OffloadFuture[Any], error: StopIteration) -> RuntimeError:
    # A future cannot carry StopIteration (it would end the awaiting
    # coroutine as if it returned); turn it into what PEP 479 turns it into.
    wrapped = RuntimeError(
        f"{describe(call.fn)} raised StopIteration, which cannot cross into a coroutine; "
        f"catch it in the function, or use next(iterator, default)."
    )
    wrapped.__cause__ = error
    return wrapped


class _LoopLocal(threading.local):
    channel: Channel | None = None
    # The _sink of the calls created in this thread meanwhile: set around a
    # pool's run() by an owner that completes its calls itself, so that the
    # sink is in place before a worker can end the call.
    sink: Callable[[OffloadFuture[Any]], None] | None = None


#: This thread's last channel; hot paths read it inline (see channel_for).
loop_local: Final = _LoopLocal()


def channel_for(loop: asyncio.AbstractEventLoop) -> Channel:
    # Kept per thread: a thread runs one loop at a time, and a thread-local
    # read is cheaper than a lookup keyed by the loop.
    channel = loop_local.channel
    if channel is None or channel.loop_ref() is not loop:
        channel = loop_local.channel = Channel(loop)
    return channel


_TOKEN_LOCK: Final = threading.Lock()


class OffloadFuture(asyncio.Future[R], Coroutine[Any, Any, R]):
    """The awaitable returned by :meth:`ThreadPool.run` and :func:`to_thread`.

    It is an ``asyncio.Future`` (so ``gather`` and ``wait_for`` use it without
    wrapping it in a Task, which is most of the cost of an offload) and also
    implements the coroutine protocol (so ``asyncio.create_task`` accepts it).
    The call is already queued when you get it. Cancelling it (directly, by
    cancelling the awaiting task, or by a ``wait_for`` timeout) sets the call's
    :class:`StopToken` and follows the pool's ``on_cancel`` policy.
    """

    # The future is also the call's record (one object per call instead of
    # three). Its fields are set by the pool that creates it, not by an
    # __init__, which would cost a Python-level call on the hot path. Names
    # avoid the C Future's own _state/_result/_exception attributes.
    __slots__ = (
        "_args",
        "_cancel_msg",
        "_channel",
        "_ctx",
        "_error",
        "_kwargs",
        "_owner",
        "_phase",
        "_sink",
        "_submitted",
        "_token",
        "_value",
        "fn",
        "loop",
    )

    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _ctx: contextvars.Context | None
    _phase: CallPhase
    _error: BaseException | None
    _value: Any
    _channel: Channel
    _owner: CancelHandler
    _token: StopToken | None
    # None, or a function that completes the call in the thread that ends
    # it, in place of the Channel's delivery to the loop: for an owner that
    # hands the outcome to a thread-safe future of its own (the Executor
    # view's concurrent.futures.Future), where a trip through the loop would
    # only be a second wake-up. The asyncio future then stays pending; it may
    # still be cancelled (which cancels the call). Taken from
    # ``loop_local.sink`` when the call is created.
    _sink: Callable[[OffloadFuture[Any]], None] | None
    # time.monotonic() when run() took the call: the pool's queue-wait
    # histogram measures from here to the moment a worker takes it.
    _submitted: float
    # Set only by a deferred cancel (on_cancel="wait"), so the hot path never
    # pays for it: read with getattr and a default.
    _cancel_msg: Any

    @property
    def token(self) -> StopToken:
        """The call's :class:`StopToken` (created on first use)."""
        token = self._token
        if token is None:
            with _TOKEN_LOCK:
                token = self._token
                if token is None:
                    token = self._token = StopToken()
        return token

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the call; see the pool's ``on_cancel`` for what happens to the thread.

        With ``on_cancel="wait"`` the cancellation is accepted (``True``) but
        delivered when the function returns: the future stays pending until
        then, and is cancelled instead of getting the function's result.
        """
        if self.done():
            return False
        if self._owner._cancel(self):
            if self._phase is SKIPPED:  # it will never run: nothing reads these
                self._ctx = None
                self._args = ()
                self._kwargs = _NO_KWARGS
            return super().cancel(msg)
        # Delivered with the cancellation once the function returns; both run
        # on the awaiter's loop, so it is stored before the delivery reads it.
        self._cancel_msg = msg
        return True

    # The coroutine protocol. A fresh future iterator per step is exactly the
    # generator a Task would drive: it yields the future while pending and
    # returns (or raises) its outcome once done, so no iterator is stored.
    def send(self, value: None) -> Any:
        """Part of the coroutine protocol (used by ``asyncio.Task``)."""
        return self.__await__().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Part of the coroutine protocol (used by ``asyncio.Task``)."""
        # A task cancelled before its first step throws CancelledError in
        # without ever calling cancel(): apply the pool's policy here too.
        exc = typ if val is None else val
        if not self.done() and (
            isinstance(exc, asyncio.CancelledError)
            or (isinstance(exc, type) and issubclass(exc, asyncio.CancelledError))
        ):
            self.cancel(exc.args[0] if isinstance(exc, BaseException) and exc.args else None)
            if not self.done():  # on_cancel="wait": wait until the function returns
                return self.__await__().send(None)
        if val is None and tb is None:
            return self.__await__().throw(typ)
        return self.__await__().throw(typ, val, tb)

    def close(self) -> None:
        """Part of the coroutine protocol; closing does not cancel the call."""


F = TypeVar("F", bound="OffloadFuture[Any]")


def new_call(
    owner: CancelHandler,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    kind: type[F] = OffloadFuture,  # type: ignore[assignment]
    carry_context: bool = True,
) -> F:
    """Build the future (an instance of ``kind``) that records one call, queued for ``owner``.

    With ``carry_context`` the call runs in a copy of the caller's context.
    """
    fut = kind(loop=loop)
    fut.fn = fn
    fut.loop = loop
    fut._args = args
    fut._kwargs = kwargs
    fut._ctx = contextvars.copy_context() if carry_context else None
    fut._phase = QUEUED
    fut._error = None
    fut._value = None
    fut._channel = channel_for(loop)
    fut._owner = owner
    fut._token = None
    fut._sink = loop_local.sink
    fut._submitted = monotonic()
    return fut


def running_loop(where: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        example = f"{where[:-1]}fn)" if where.startswith("offloop.") else "pool.run(fn)"
        raise RuntimeError(
            f"{where} was called with no event loop running in this thread. "
            f"Call it from a coroutine ('await {example}'); in plain sync code "
            f"call the function directly."
        ) from None

"""``Portal.iterate``'s machinery: one task steps an async iterator for a sync consumer.

The consumer's thread asks for each item with a sync crossing (a
:class:`~.crossing.Reply` and one ``call_soon_threadsafe``); the callback on
the loop hands the request to the stream's one task, ``_drive``, and runs that
task's step at once, as :func:`~.crossing.start_sync` runs a new task's
first step. The task answers the crossing's reply itself. So each item costs
one crossing and no task of its own, while the generator runs in one task for
its whole life, as under ``async for``: what it binds to its task or context
across a ``yield`` (an ``asyncio.timeout``, a context variable) holds for the
next item, and its cleanup runs there too.

Closing (``close``), decided in the consumer's thread:

- between items (``break``, an exception in the ``for`` body, ``close()``):
  the task closes the iterator and the consumer waits for it, under the
  portal's timeout; an error of the cleanup is raised by the close;
- after a stop while an item was fetched (the timeout, Ctrl-C): the task was
  cancelled where the generator waits, which runs its cleanup; the consumer
  waits for that cleanup up to the portal's timeout, then lets it go on
  without raising a second error. An error of the cleanup it waited for is
  raised, with the stop as its ``__context__``, as ``async for`` gives it;
- where waiting is refused (the worker's stop token is set, or the consumer
  runs on an event loop's thread, dropped there): the close is posted without
  waiting. It is cleanup, not the caller's work, so a set token does not
  refuse it.

A cleanup error nobody can receive (the close did not wait, or stopped
waiting) is logged on the ``offloop`` logger.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any, Final

from .._core.errors import CallerGoneError
from .._core.token import StopToken, thread_state
from .._core.validate import describe
from .crossing import (
    Reply,
    _cancelled_on_loop,
    _slice,
    _step_now,
    refuse_when_stopped,
    wait_reply,
)
from .loopthread import LoopThread
from .target import schedule

__all__ = ["END", "Stream", "close", "next_item"]

logger: Final = logging.getLogger("offloop")

#: The end of an async iterator, as a value: StopAsyncIteration must not cross as an exception.
END: Final = object()

WHERE: Final = "Portal.iterate()"

_EXITING: Final = (SystemExit, KeyboardInterrupt)


class Stream:
    """One ``Portal.iterate()``: its async iterator, the task that steps it, and their requests.

    Made in the consumer's thread; the iterator and the task are made on the
    loop by the first item's request (so a caller that stopped before the
    loop got to it leaves nothing behind). ``lock`` guards only the hand-over
    at the end, between the task (``finish``) and the closing consumer.
    """

    __slots__ = (
        "args",
        "closer",
        "closing",
        "context",
        "detached",
        "driver",
        "error",
        "finished",
        "fn",
        "host",
        "kwargs",
        "lock",
        "loop",
        "pending",
        "serving",
        "stopped",
        "waiter",
        "worker",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        host: LoopThread | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.host = host
        self.loop = loop
        call = thread_state.call
        #: The consumer is an offloop worker of ``loop`` (as ``Reply.worker``).
        self.worker = host is None and call is not None and call.loop is loop
        #: The callbacks' context after the first request: they need none of
        #: the caller's, and one made once spares a copy per item.
        self.context = contextvars.Context()
        self.driver: asyncio.Task[None] | None = None
        #: The item request the task has not taken yet.
        self.pending: _ItemReply | None = None
        #: The request whose item the task is fetching now.
        self.serving: _ItemReply | None = None
        #: What the task awaits between items; a request completes it.
        self.waiter: asyncio.Future[None] | None = None
        self.closing = False
        #: An item's caller stopped waiting (its post lost): its close is coming.
        self.stopped = False
        # Guarded by lock: the end's hand-over.
        self.lock = threading.Lock()
        self.finished = False
        self.closer: Reply | None = None
        self.detached = False
        #: The cleanup's error that no caller received yet.
        self.error: BaseException | None = None

    def finish(self) -> None:
        """On the loop, as the task ends (or never ran): hand its cleanup error over."""
        if self.finished:  # set on this thread only
            return
        pending, self.pending = self.pending, None
        if pending is not None:
            _answer(pending, (False, _ended(self)))
        with self.lock:
            self.finished = True
            closer = self.closer
            error = self.error
            if closer is None and not self.detached and self.stopped and error is not None:
                return  # the stopped caller's close is coming: it takes the error
            self.error = None
        if closer is not None and _claim(closer, (True, None) if error is None else (False, error)):
            return
        if error is not None:
            _log(self, error)

    def __repr__(self) -> str:
        return f"<Portal.iterate() stream of {describe(self.fn)}>"


class _ItemReply(Reply):
    """One item's crossing; a stop cancels the task only while it fetches this item."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream.loop, stream.host, worker=stream.worker)
        self.stream = stream

    def cancel_remote(self) -> None:
        # An item answered already, or a request not taken yet, leaves the
        # task alone: the close that follows every stop ends it.
        stream = self.stream
        if stream.serving is self and stream.driver is not None:
            stream.driver.cancel()


# -- the consumer's thread ----------------------------------------------------


def next_item(stream: Stream, token: StopToken | None, timeout: float | None) -> Any:
    """Block for the next item (``END`` after the last); raise what fetching it raised."""
    fn = stream.fn
    refuse_when_stopped(token, WHERE, fn)
    reply = _ItemReply(stream)
    # The first request makes the task, in (a copy of) the caller's context.
    ctx = contextvars.copy_context() if stream.driver is None else stream.context
    host = stream.host
    if host is not None:
        host._submit(_take_request, reply, ctx)
    else:
        schedule(stream.loop, _take_request, reply, ctx=ctx)
    return wait_reply(reply, token, WHERE, fn, timeout)


def close(stream: Stream, token: StopToken | None, timeout: float | None, *, stopped: bool) -> None:
    """Close the stream's iterator in its task; wait where allowed (see the module's docstring).

    ``stopped``: fetching the last item raised (a stop, the loop's close, the
    generator's own error), so the task ended or is ending by itself.
    """
    wait = (token is None or not token.is_set()) and asyncio._get_running_loop() is None
    closer = Reply(stream.loop, None) if wait else None
    with stream.lock:
        finished = stream.finished
        if finished:
            error, stream.error = stream.error, None
        else:
            error = None
            stream.closer = closer
            stream.detached = closer is None
    if not finished:
        try:
            stream.loop.call_soon_threadsafe(_take_close, stream, context=stream.context)
        except RuntimeError:
            # The loop is closed: its shutdown closed the iterator, and the
            # task's end has run. Take what it left, if anything.
            with stream.lock:
                stream.closer = None
                error, stream.error = stream.error, None
        else:
            if closer is None:
                return
            _wait_close(stream, closer, token, timeout, cancel=not stopped)
            return
    if error is not None:
        if closer is None:
            _log(stream, error)
            return
        try:
            raise error
        finally:
            del error


def _wait_close(
    stream: Stream, closer: Reply, token: StopToken | None, timeout: float | None, *, cancel: bool
) -> None:
    # Waits for the task to answer ``closer``. Giving up takes the claim, so the
    # task, finding it taken, logs an error it meets later instead.
    lock = closer.lock
    loop = stream.loop
    deadline = None if timeout is None else monotonic() + timeout
    timed_out = False
    try:
        while not lock.acquire(True, _slice(deadline)):
            timed_out = deadline is not None and monotonic() >= deadline
            if timed_out or loop.is_closed() or (token is not None and token.is_set()):
                if closer.claim.acquire(False):
                    break  # given up
                lock.acquire()  # the task's answer is being posted: take it
                timed_out = False
                break
    except BaseException:  # e.g. Ctrl-C
        if closer.claim.acquire(False) and cancel:
            _cancel_driver(stream)
        raise
    if closer.outcome is None:
        # Given up. After a stop (its error is on its way), with the token
        # set or the loop gone, the cleanup goes on (or went with the loop);
        # a close of its own that times out is cancelled, as any crossing.
        if timed_out and cancel:
            _cancel_driver(stream)
            raise TimeoutError(
                f"Closing {WHERE} of {describe(stream.fn)} did not finish within {timeout} s, "
                f"so its cleanup was cancelled on its loop. Give it a longer timeout, or none."
            )
        return
    outcome = closer.outcome
    closer.outcome = None
    if type(outcome) is tuple and not outcome[0]:
        try:
            raise outcome[1]
        finally:
            del outcome


def _cancel_driver(stream: Stream) -> None:
    driver = stream.driver
    if driver is not None:
        try:  # noqa: SIM105 - a closed loop has nothing left to cancel
            stream.loop.call_soon_threadsafe(driver.cancel)
        except RuntimeError:
            pass


# -- the loop -------------------------------------------------------------------


def _take_request(reply: _ItemReply) -> None:
    # On the loop: hand an item request to the task, and step it now.
    stream = reply.stream
    host = stream.host
    if reply.claim.locked():  # the caller stopped waiting before we got here
        stream.stopped = True
        _finished(host)
        return
    refused = host._start_refused(stream.fn) if host is not None else None
    if refused is not None:
        _answer(reply, (False, refused))
        return
    loop = stream.loop
    driver = stream.driver
    if driver is None:
        stream.pending = reply
        name = getattr(stream.fn, "__name__", None) or type(stream.fn).__name__
        try:
            driver = loop.create_task(_drive(stream), name=f"offloop-iterate-{name}")
        except BaseException as exc:  # a task factory that raises, as in start_sync
            stream.pending = None
            _answer(reply, (False, exc))
            if isinstance(exc, _EXITING):
                raise
            return
        stream.driver = driver
        driver.add_done_callback(lambda _: stream.finish())
        _step_now(loop, driver)
        return
    if driver.done():
        _answer(reply, (False, _ended(stream)))
        return
    stream.pending = reply
    _wake(stream, loop, driver)


def _take_close(stream: Stream) -> None:
    # On the loop: the consumer closes; the task ends, closing the iterator.
    stream.closing = True
    driver = stream.driver
    if driver is None:
        stream.finish()  # no iterator was made
    elif not driver.done():
        _wake(stream, stream.loop, driver)


def _wake(stream: Stream, loop: asyncio.AbstractEventLoop, driver: asyncio.Task[None]) -> None:
    waiter = stream.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
        _step_now(loop, driver)


async def _drive(stream: Stream) -> None:
    ait: Any = None
    loop = stream.loop
    try:
        while True:
            reply = stream.pending
            if reply is None:
                if stream.closing:
                    return
                stream.waiter = waiter = loop.create_future()
                await waiter
                continue
            stream.pending = None
            if reply.claim.locked():  # its caller stopped waiting before it was taken
                stream.stopped = True
                _finished(stream.host)
                continue
            stream.serving = reply
            try:
                if ait is None:
                    ait = _open(stream)
                item = await ait.__anext__()
            except StopAsyncIteration:
                _answer(reply, (True, END))
                return
            except asyncio.CancelledError as exc:
                # Its own caller's stop posted first; else something on the
                # loop cancelled it (the loop closing): the caller hears why.
                _answer(reply, (False, _cancelled(stream, exc)))
                raise
            except BaseException as exc:
                if not _answer(reply, (False, exc)) and stream.error is None:
                    # Its caller stopped waiting (typically the cancellation
                    # its stop threw into the cleanup became this error): the
                    # close hands it over, or logs it.
                    stream.error = exc
                if isinstance(exc, _EXITING):
                    # As from any crossing: it stops the loop too.
                    host = stream.host
                    if host is not None:
                        host._exiting(asyncio.current_task())
                    raise
                return
            finally:
                stream.serving = None
            _answer(reply, (True, item))  # lost if its caller stopped: dropped
            del item
    finally:
        # Every way out (the end, an error, a close, a cancellation, the loop
        # closing) closes the iterator here, in its own task.
        aclose = getattr(ait, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if stream.error is None:
                    stream.error = exc
                if isinstance(exc, _EXITING):
                    if stream.host is not None:
                        stream.host._exiting(asyncio.current_task())
                    raise
            finally:
                stream.finish()
        else:
            stream.finish()


def _open(stream: Stream) -> Any:
    made = stream.fn(*stream.args, **stream.kwargs)
    if hasattr(made, "__anext__"):
        return made
    if hasattr(made, "__aiter__"):
        return made.__aiter__()
    if hasattr(made, "close"):
        made.close()  # a coroutine: no "never awaited" warning
    raise TypeError(
        f"Portal.iterate() needs a function returning an async iterator (an async "
        f"generator function), but {describe(stream.fn)} returned {describe(made)}."
    )


def _claim(reply: Reply, outcome: tuple[bool, Any]) -> bool:
    # Reply.post, saying whether this outcome won (False: the caller gave up first).
    if reply.claim.acquire(False):
        reply.outcome = outcome
        reply.lock.release()
        return True
    return False


def _answer(reply: _ItemReply, outcome: tuple[bool, Any]) -> bool:
    # An item request is done: counted off its host, its outcome posted.
    _finished(reply.stream.host)
    if _claim(reply, outcome):
        return True
    reply.stream.stopped = True
    return False


def _finished(host: LoopThread | None) -> None:
    if host is not None:
        host._call_finished()


def _cancelled(stream: Stream, exc: asyncio.CancelledError) -> BaseException:
    host = stream.host
    fn: Any = stream.fn
    closing = host._cancel_error(fn) if host is not None else None
    if closing is not None:
        return closing
    reply = Reply(stream.loop, host, worker=stream.worker)
    return _cancelled_on_loop(reply, fn, exc)


def _ended(stream: Stream) -> CallerGoneError:
    return CallerGoneError(
        f"{WHERE} of {describe(stream.fn)} cannot go on: the task that steps its async "
        f"iterator on {stream.loop!r} ended (it was cancelled there, or the loop is shutting "
        f"down), and the iterator was closed with it. Return from the worker function, or "
        f"start a new iteration."
    )


def _log(stream: Stream, error: BaseException) -> None:
    logger.error(
        "offloop: %s of %s: the async iterator's cleanup raised %r after its consumer had "
        "stopped waiting for it (a timeout, Ctrl-C, the worker's stop token, or the iterator "
        "closed on an event loop's thread), so nobody else can receive it.",
        WHERE,
        describe(stream.fn),
        error,
        exc_info=error,
    )

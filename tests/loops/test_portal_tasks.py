"""Portal.start_task, .context and .iterate: long-lived work on a loop, from sync code."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import contextvars
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

import offloop
from offloop import CallerGoneError, Portal, task_ready
from tests.conftest import LOOP_KINDS
from tests.helpers import QUICK_WAIT, WAIT, await_until, wait_until
from tests.loops.test_portal import factory

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


@pytest.fixture(params=LOOP_KINDS)
def lt(request: pytest.FixtureRequest) -> Iterator[offloop.LoopThread]:
    kind = request.param
    with offloop.LoopThread(name=f"tasks-{kind}", loop_factory=factory(kind)) as lt:
        yield lt


# -- start_task ----------------------------------------------------------------


async def serve(port: int, stop: asyncio.Event | None = None) -> str:
    await asyncio.sleep(0)
    task_ready((port, request_id.get(), threading.current_thread().name))
    if stop is None:
        await asyncio.sleep(WAIT * 10)
    else:
        await stop.wait()
    return "served"


def test_start_task_signals_readiness_and_runs_until_cancelled(lt: offloop.LoopThread) -> None:
    request_id.set("boot")
    handle = Portal(lt).start_task(serve, 8080)
    assert handle.ready(timeout=WAIT) == (8080, "boot", f"offloop-loop-{lt.name}")
    assert not handle.done()
    assert "ready" in repr(handle)
    assert handle.cancel()
    with pytest.raises(cf.CancelledError):
        handle.result(timeout=WAIT)
    assert "cancelled" in repr(handle)
    assert not handle.cancel()  # ended already


def test_start_task_result_and_errors_before_readiness(lt: offloop.LoopThread) -> None:
    portal = Portal(lt)
    stop = portal.call_sync(asyncio.Event)  # made on the loop it belongs to
    handle = portal.start_task(serve, 1, stop)
    handle.ready(timeout=WAIT)
    portal.call_sync(stop.set)
    assert handle.result(timeout=WAIT) == "served"

    async def broken() -> None:
        await asyncio.sleep(0)
        raise OSError("address in use")

    with pytest.raises(OSError, match="address in use"):
        portal.start_task(broken).ready(timeout=WAIT)  # its error, not a hang

    async def quick() -> int:
        return 5

    quick_handle = portal.start_task(quick)
    assert quick_handle.ready(timeout=WAIT) is None  # ended without task_ready: None
    assert quick_handle.result() == 5


def test_ready_timeout_cancels_the_task(lt: offloop.LoopThread) -> None:
    cancelled = threading.Event()

    async def slow_start() -> None:
        try:
            await asyncio.sleep(WAIT * 10)
        finally:
            cancelled.set()

    handle = Portal(lt).start_task(slow_start)
    with pytest.raises(TimeoutError, match=r"gave up after 0\.02 s"):
        handle.ready(timeout=0.02)
    assert cancelled.wait(WAIT)
    assert handle.done()


def test_task_ready_outside_a_started_task_is_refused(lt: offloop.LoopThread) -> None:
    async def stray() -> None:
        task_ready()

    with pytest.raises(RuntimeError, match="outside a task started"):
        lt.call(stray)


async def test_a_worker_that_stops_cancels_the_task_it_started() -> None:
    cancelled = asyncio.Event()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(WAIT * 10)
        finally:
            cancelled.set()

    def worker() -> None:
        handle = Portal().start_task(forever)  # on this test's loop: the awaiting one
        handle.result()  # stopped by the cancellation below

    task = asyncio.ensure_future(offloop.to_thread(worker))
    await asyncio.to_thread(started.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), WAIT)


def test_a_worker_stopped_while_waiting_gets_caller_gone(lt: offloop.LoopThread) -> None:
    outcome: list[BaseException] = []
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(WAIT * 10)

    def worker() -> None:
        try:
            Portal(lt).start_task(forever).result()
        except BaseException as exc:
            outcome.append(exc)

    async def main() -> None:
        task = asyncio.ensure_future(offloop.to_thread(worker))
        await asyncio.to_thread(started.wait, WAIT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The awaiter was cancelled at once; the worker reports a moment later.
    wait_until(lambda: bool(outcome), what="the stopped worker's outcome")
    assert isinstance(outcome[0], CallerGoneError)


def test_closing_the_loop_thread_ends_its_tasks() -> None:
    lt = offloop.LoopThread(name="tasks-close").start()
    cleaned = threading.Event()

    async def forever() -> None:
        task_ready()
        try:
            await asyncio.sleep(WAIT * 10)
        finally:
            cleaned.set()

    handle = Portal(lt).start_task(forever)
    handle.ready(timeout=WAIT)
    lt.close()
    assert cleaned.is_set()  # close waited for the task's cleanup
    with pytest.raises(offloop.PoolClosedError, match="was closed while"):
        handle.result(timeout=WAIT)


# -- context -------------------------------------------------------------------


class Resource:
    """An async context manager that records what happened to it, and where."""

    log: list[tuple[str, str]]

    def __init__(self, name: str, *, suppress: bool = False) -> None:
        self.name = name
        self.suppress = suppress
        self.log = []

    async def __aenter__(self) -> Resource:
        self.log.append(("enter", threading.current_thread().name))
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        await asyncio.sleep(0)
        self.log.append((f"exit {getattr(exc_type, '__name__', None)}", request_id.get()))
        return self.suppress


def test_context_enters_and_exits_on_the_loop(lt: offloop.LoopThread) -> None:
    request_id.set("ctx")
    with Portal(lt).context(Resource, "db") as resource:
        assert isinstance(resource, Resource)
    assert resource.log == [("enter", f"offloop-loop-{lt.name}"), ("exit None", "ctx")]

    bound = Portal(lt).context(Resource, "quiet", suppress=True)
    with bound as quiet:
        raise KeyError("swallowed by __aexit__")
    assert quiet.log[-1] == ("exit KeyError", "ctx")  # the exception reached __aexit__
    assert bound.state is offloop.BoundContextState.EXITED

    with pytest.raises(KeyError), Portal(lt).context(Resource, "loud") as loud:
        raise KeyError("kept")
    assert loud.log[-1][0] == "exit KeyError"
    with pytest.raises(RuntimeError, match="entered already"):
        bound.enter()
    with pytest.raises(RuntimeError, match="cannot exit: it is exited"):
        bound.exit()


def test_context_left_open_exits_when_the_loop_thread_closes() -> None:
    lt = offloop.LoopThread(name="ctx-close").start()
    resource = Portal(lt).context(Resource, "kept open").enter()
    assert resource.log[-1][0] == "enter"
    lt.close()
    assert resource.log[-1][0] == "exit CancelledError"


def test_a_context_whose_handle_is_dropped_stays_open_until_close() -> None:
    # Only the entered value is kept: the task holding the context must not
    # be garbage collected mid-wait (a loop holds its tasks weakly).
    lt = offloop.LoopThread(name="ctx-dropped").start()
    resource = Portal(lt).context(Resource, "dropped").enter()
    gc.collect()
    assert lt.call(asyncio.sleep, 0, "alive") == "alive"
    assert resource.log[-1][0] == "enter"
    lt.close()
    assert resource.log[-1][0] == "exit CancelledError"


def test_context_errors_on_enter_reach_the_caller(lt: offloop.LoopThread) -> None:
    @contextlib.asynccontextmanager
    async def refuses() -> AsyncIterator[None]:
        raise ConnectionRefusedError("no database")
        yield  # type: ignore[unreachable]

    with pytest.raises(ConnectionRefusedError, match="no database"):
        Portal(lt).context(refuses).enter()
    with pytest.raises(TypeError, match="async context manager"):
        Portal(lt).context(list).enter()  # type: ignore[arg-type]


# -- iterate -------------------------------------------------------------------


def test_iterate_consumes_an_async_generator_and_closes_it_on_break(
    lt: offloop.LoopThread,
) -> None:
    closed: list[str] = []

    async def ticks(n: int) -> AsyncIterator[tuple[int, str]]:
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield i, request_id.get()
        finally:
            closed.append(threading.current_thread().name)

    request_id.set("stream")
    assert list(Portal(lt).iterate(ticks, 3)) == [(0, "stream"), (1, "stream"), (2, "stream")]
    assert closed == [f"offloop-loop-{lt.name}"]
    for i, _ in Portal(lt).iterate(ticks, 100):
        if i == 2:
            break
    assert closed == [f"offloop-loop-{lt.name}"] * 2  # closed on its loop by the break


def test_iterate_raises_the_generators_error(lt: offloop.LoopThread) -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ValueError("stream broke")

    iterator = Portal(lt).iterate(broken)
    assert next(iterator) == 1
    with pytest.raises(ValueError, match="stream broke"):
        next(iterator)
    with pytest.raises(TypeError, match="async iterator"):
        list(Portal(lt).iterate(len, "abc"))  # type: ignore[arg-type]


def test_an_abandoned_iteration_is_closed_when_the_loop_thread_closes() -> None:
    lt = offloop.LoopThread(name="iter-close").start()
    closed = threading.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0)
                yield 1
        finally:
            closed.set()

    iterator = Portal(lt).iterate(endless)
    assert next(iterator) == 1
    lt.close()
    assert closed.is_set()
    iterator.close()  # the loop is gone: closing it later is quiet


async def test_context_on_a_running_loop_is_refused_before_it_is_entered() -> None:
    # Refused after entering, the context would stay open until its loop
    # closes, with nobody left to exit it.
    entered: list[str] = []

    @contextlib.asynccontextmanager
    async def resource() -> AsyncIterator[str]:
        entered.append("enter")
        yield "r"

    target = offloop.LoopThread(name="ctx-refused")
    try:
        bound = Portal(target).context(resource)
        with pytest.raises(offloop.WouldDeadlockError, match=r"BoundContext\.enter\(\)"):
            bound.enter()
        assert bound.state is offloop.BoundContextState.CREATED
        with pytest.raises(offloop.WouldDeadlockError, match=r"BoundContext\.exit\(\)"):
            bound.exit()
        assert entered == []
        assert target.state.value == "created"
    finally:
        await target.aclose()


def test_iterate_timed_out_mid_item_raises_timeout_and_closes_the_generator(
    lt: offloop.LoopThread,
) -> None:
    # The item's step is still running the generator when the caller stops
    # waiting: closing the generator must wait for that step's cancellation,
    # not fail with "aclose(): asynchronous generator is already running".
    closed: list[str] = []

    async def stalls() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # the second item never comes
            yield 2
        finally:
            closed.append(threading.current_thread().name)

    iterator = Portal(lt, timeout=0.05).iterate(stalls)
    assert next(iterator) == 1
    with pytest.raises(TimeoutError, match=r"Portal\.iterate\(\) of function .*stalls"):
        next(iterator)
    assert closed == [f"offloop-loop-{lt.name}"]


async def test_iterate_in_a_worker_whose_awaiter_is_cancelled_closes_the_generator() -> None:
    closed = threading.Event()
    first = threading.Event()
    outcome: list[BaseException] = []

    async def stalls() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.set()

    def consume() -> None:
        try:
            for _ in Portal().iterate(stalls):  # on the awaiting loop
                first.set()
        except BaseException as exc:
            outcome.append(exc)
            raise

    task = asyncio.ensure_future(offloop.to_thread(consume))
    await offloop.to_thread(first.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(offloop.to_thread(closed.wait, WAIT), WAIT)
    assert closed.is_set()
    await asyncio.wait_for(offloop.to_thread(wait_until, lambda: bool(outcome)), WAIT)
    assert type(outcome[0]) is CallerGoneError


def test_iterate_steps_the_generator_in_one_task_as_async_for_does(
    lt: offloop.LoopThread,
) -> None:
    # What a generator binds to its task or context across a yield (an
    # asyncio.timeout around it, a context variable it sets) must hold for
    # the next item, and its cleanup must run in that task too.
    tasks: list[asyncio.Task[object] | None] = []

    async def bound() -> AsyncIterator[str]:
        request_id.set("set by the generator")
        try:
            for _ in range(3):
                tasks.append(asyncio.current_task())
                yield request_id.get()
        finally:
            tasks.append(asyncio.current_task())

    request_id.set("caller")
    assert list(Portal(lt).iterate(bound)) == ["set by the generator"] * 3
    assert len(tasks) == 4
    assert tasks[0] is not None
    assert all(t is tasks[0] for t in tasks)
    assert tasks[0].get_name() == "offloop-iterate-bound"  # whose task, in leak reports
    assert request_id.get() == "caller"  # the generator's context is a copy
    tasks.clear()
    for _ in Portal(lt).iterate(bound):
        break
    assert len(tasks) == 2
    assert tasks[0] is not None
    assert tasks[1] is tasks[0]


def _loop_tasks(lt: offloop.LoopThread) -> list[str]:
    # The tasks still on lt's loop, read there (call_sync runs between its steps).
    return Portal(lt).call_sync(lambda: sorted(t.get_name() for t in asyncio.all_tasks()))


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "offloop" and text in r.getMessage()]


@pytest.mark.parametrize("leaves", ["break", "next"])
async def test_iterate_in_a_worker_stopped_between_items_closes_the_generator(
    leaves: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The token is set while the worker's body runs: the worker breaks on it,
    # or its next item is refused. Either way the generator is closed on its
    # loop (its finally runs) and its task ends; the cleanup's error has
    # nobody to reach, so it is logged.
    closed = threading.Event()
    first = threading.Event()
    go_on = threading.Event()
    outcome: list[BaseException | None] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.set()
            raise ValueError("cleanup failed")

    def consume() -> None:
        try:
            for _ in Portal().iterate(numbers):  # on the awaiting loop
                first.set()
                go_on.wait(WAIT)
                if leaves == "break" and offloop.current_token().is_set():
                    break
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(None)

    task = asyncio.ensure_future(offloop.to_thread(consume))
    assert await offloop.to_thread(first.wait, WAIT)
    task.cancel()  # sets the worker's token
    with pytest.raises(asyncio.CancelledError):
        await task
    go_on.set()
    await await_until(closed.is_set, QUICK_WAIT, "the generator's finally")
    await await_until(lambda: bool(outcome), QUICK_WAIT, "the worker's end")
    if leaves == "break":
        assert outcome == [None]
    else:
        assert type(outcome[0]) is CallerGoneError
    await await_until(lambda: len(asyncio.all_tasks()) == 1, QUICK_WAIT, "the driver's end")
    await await_until(lambda: bool(_logged(caplog, "numbers")), QUICK_WAIT, "the log")
    (record,) = _logged(caplog, "numbers")
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "cleanup failed"


def test_iterate_stopped_mid_item_raises_its_own_error_while_a_slow_cleanup_goes_on(
    lt: offloop.LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The cleanup awaits (closing a connection) past the portal's timeout:
    # the caller gets the item's TimeoutError, naming iterate and the
    # generator, not a second timeout of the close. The cleanup finishes on
    # its loop afterwards; its error, with nobody left to take it, is logged.
    portal = Portal(lt)
    release = portal.call_sync(asyncio.Event)
    cleaned = threading.Event()

    async def slow_cleanup() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # the second item never comes
            yield 2
        finally:
            await release.wait()
            cleaned.set()
            raise ValueError("closing the connection failed")

    iterator = Portal(lt, timeout=0.05).iterate(slow_cleanup)
    assert next(iterator) == 1
    with pytest.raises(TimeoutError) as raised:
        next(iterator)
    message = str(raised.value)
    assert message.startswith("Portal.iterate() of function ")
    assert "slow_cleanup" in message
    assert raised.value.__context__ is None
    assert not cleaned.is_set()
    portal.call_sync(release.set)
    assert cleaned.wait(WAIT)
    wait_until(lambda: _loop_tasks(lt) == [], QUICK_WAIT, "the driver's end")
    wait_until(lambda: bool(_logged(caplog, "slow_cleanup")), QUICK_WAIT, "the log")
    (record,) = _logged(caplog, "slow_cleanup")
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "closing the connection failed"


def test_iterate_a_cleanup_error_reaches_the_caller_as_under_async_for(
    lt: offloop.LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    # A quick cleanup that raises: after a timeout mid-item the caller gets
    # it, the TimeoutError as its context (what 'async for' under a timeout
    # gives); after a break, close() raises it. Nothing is left in a future
    # for the garbage collector to report.
    async def fails_cleanup() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            raise ValueError("cleanup failed")

    iterator = Portal(lt, timeout=0.05).iterate(fails_cleanup)
    assert next(iterator) == 1
    with pytest.raises(ValueError, match="cleanup failed") as raised:
        next(iterator)
    context = raised.value.__context__
    assert type(context) is TimeoutError
    assert str(context).startswith("Portal.iterate() of function ")
    del raised, context

    iterator = Portal(lt).iterate(fails_cleanup)
    assert next(iterator) == 1
    with pytest.raises(ValueError, match="cleanup failed"):
        iterator.close()
    Portal(lt).call_sync(gc.collect)
    assert _loop_tasks(lt) == []
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not _logged(caplog, "fails_cleanup")


def test_iterate_a_close_slower_than_the_timeout_is_cancelled_and_named(
    lt: offloop.LoopThread,
) -> None:
    cancelled = threading.Event()

    async def slow_close() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            try:
                await asyncio.Event().wait()  # a cleanup that never ends by itself
            except asyncio.CancelledError:
                cancelled.set()
                raise

    iterator = Portal(lt, timeout=0.05).iterate(slow_close)
    assert next(iterator) == 1
    with pytest.raises(TimeoutError) as raised:
        iterator.close()
    message = str(raised.value)
    assert message.startswith("Closing Portal.iterate() of function ")
    assert "slow_close" in message
    assert cancelled.wait(WAIT)
    wait_until(lambda: _loop_tasks(lt) == [], QUICK_WAIT, "the driver's end")

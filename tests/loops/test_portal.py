"""offloop.Portal and from_thread_sync: sync functions, timeouts, futures and refusals.

Async tests run on asyncio, asyncio in debug mode and uvloop (conftest); the
sync ones target a LoopThread of each kind through the ``lt`` fixture.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import offloop
from offloop import CallerGoneError, Portal, WouldDeadlockError, from_thread_sync
from offloop._core.token import StopToken, WorkerCall, thread_state
from tests.conftest import LOOP_KINDS
from tests.helpers import QUICK_WAIT, WAIT, in_plain_thread, wait_until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop

    def make() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        loop.set_debug(kind == "debug")
        return loop

    return make


@pytest.fixture(params=LOOP_KINDS)
def lt(request: pytest.FixtureRequest) -> Iterator[offloop.LoopThread]:
    kind = request.param
    with offloop.LoopThread(name=f"portal-{kind}", loop_factory=factory(kind)) as lt:
        yield lt


def fail(message: str) -> None:
    raise ValueError(message)


class Blocker:
    """Blocks a loop thread's loop (a coroutine stuck in sync code) until released."""

    def __init__(self, lt: offloop.LoopThread) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.future = Portal(lt).submit(self._block)
        assert self.entered.wait(WAIT)

    async def _block(self) -> None:
        self.entered.set()
        self.release.wait(WAIT)  # blocks the loop on purpose

    def __enter__(self) -> Blocker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.future.result(WAIT)


# -- sync functions on the loop's thread ---------------------------------------


async def test_from_thread_sync_in_a_worker_runs_on_the_awaiting_loop() -> None:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()  # owned by this loop: only its thread may set it
    request_id.set("req-7")

    def touch() -> tuple[int, str]:
        return threading.get_ident(), request_id.get()

    def worker() -> tuple[int, str]:
        seen = from_thread_sync(touch)
        from_thread_sync(event.set)
        return seen

    ident, rid = await offloop.to_thread(worker)
    assert ident == threading.get_ident()  # the loop's own thread
    assert rid == "req-7"  # the caller's context crossed twice
    await asyncio.wait_for(event.wait(), WAIT)
    assert loop.is_running()


def test_call_sync_from_a_plain_thread_runs_on_the_target_with_context(
    lt: offloop.LoopThread,
) -> None:
    def body() -> tuple[str, str]:
        request_id.set("plain")
        return Portal(lt).call_sync(lambda: (threading.current_thread().name, request_id.get()))

    assert in_plain_thread(body) == (f"offloop-loop-{lt.name}", "plain")
    # Without a target: the shared from_thread loop.
    assert in_plain_thread(lambda: from_thread_sync(threading.current_thread)).name == (
        "offloop-shared-loop"
    )


def test_call_sync_raises_the_functions_error_with_its_traceback(lt: offloop.LoopThread) -> None:
    with pytest.raises(ValueError, match="bad input") as info:
        Portal(lt).call_sync(fail, "bad input")
    assert "fail" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert Portal(lt).call_sync(len, "abc") == 3  # an error never breaks the next call


async def test_blocking_crossings_refuse_on_a_running_loop() -> None:
    async def coro() -> None:
        pass

    with pytest.raises(WouldDeadlockError, match="from_thread_sync"):
        from_thread_sync(len, "x")
    portal = Portal(asyncio.get_running_loop())
    with pytest.raises(WouldDeadlockError, match=r"Portal\.call_sync"):
        portal.call_sync(len, "x")
    with pytest.raises(WouldDeadlockError, match=r"Portal\.call\(\)"):
        portal.call(coro)
    # The non-blocking form is fine on the loop's own thread.
    assert await asyncio.wrap_future(portal.submit(asyncio.sleep, 0, "ok")) == "ok"


def test_refusals_on_the_target_loops_own_thread(lt: offloop.LoopThread) -> None:
    async def inside() -> str:
        with pytest.raises(WouldDeadlockError):
            Portal(lt).call_sync(len, "x")
        handle = Portal(lt).start_task(asyncio.sleep, 0, "started")
        with pytest.raises(WouldDeadlockError, match=r"TaskHandle\.result"):
            handle.result()
        return await asyncio.wrap_future(handle.future)

    assert lt.call(inside) == "started"


def test_bad_arguments_are_refused_before_anything_runs() -> None:
    async def coro() -> None:
        pass

    with pytest.raises(TypeError, match=r"For a coroutine function use offloop\.from_thread\(\)"):
        from_thread_sync(coro)  # type: ignore[unused-coroutine]
    with pytest.raises(TypeError, match=r"portal\.call\(\)"):
        Portal().call_sync(coro)  # type: ignore[unused-coroutine]
    with pytest.raises(TypeError, match=r"Portal\.call"):
        Portal().call(len, "x")  # type: ignore[arg-type]
    # Each entry point names itself, not the one it is built on.
    with pytest.raises(TypeError, match=r"^Portal\.submit\(\) needs"):
        Portal().submit(len, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Portal\.start_task\(\) needs"):
        Portal().start_task(len, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Portal\(target=\.\.\.\)"):
        Portal("loop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Portal\(timeout=\.\.\.\)"):
        Portal(timeout=-1)


# -- timeouts and cancellation -------------------------------------------------


def test_timeout_cancels_the_coroutine(lt: offloop.LoopThread) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(WAIT * 10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match=r"within 0\.05 s"):
        Portal(lt, timeout=0.05).call(forever)
    assert cancelled.wait(WAIT)


def test_timeout_on_a_busy_loop_means_the_function_never_runs(lt: offloop.LoopThread) -> None:
    ran: list[str] = []
    with Blocker(lt), pytest.raises(TimeoutError):
        Portal(lt, timeout=0.02).call_sync(ran.append, "late")
    assert Portal(lt).call_sync(ran.append, "next") is None
    assert ran == ["next"]  # the timed-out call was dropped, not run late


def test_a_stopped_worker_cancels_what_it_waits_for(lt: offloop.LoopThread) -> None:
    ran: list[str] = []
    waiting = threading.Event()
    outcome: list[BaseException] = []
    raised = threading.Event()

    def worker() -> None:
        waiting.set()
        try:
            Portal(lt).call_sync(ran.append, "late")
        except BaseException as exc:
            outcome.append(exc)
            raised.set()
            raise

    async def main() -> None:
        task = asyncio.ensure_future(offloop.to_thread(worker))
        await asyncio.to_thread(waiting.wait, WAIT)
        await asyncio.sleep(0.01)  # let it block on the busy loop (either order is checked)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with Blocker(lt):
        asyncio.run(main())  # the worker returned while the target loop was still busy
    Portal(lt).call_sync(ran.append, "after")
    assert ran == ["after"]  # the stopped caller's function never ran
    # The worker's thread raises on its own time (its awaiter was cancelled,
    # not waited for): wait for it, bounded.
    assert raised.wait(WAIT), "the stopped worker never raised"
    assert len(outcome) == 1
    assert isinstance(outcome[0], CallerGoneError)


def test_future_form_cancels_both_ways(lt: offloop.LoopThread) -> None:
    cancelled = threading.Event()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(WAIT * 10)
        finally:
            cancelled.set()

    portal = Portal(lt)
    future = portal.submit(forever)
    assert isinstance(future, cf.Future)
    assert started.wait(WAIT)
    assert future.cancel()  # the caller cancels: the remote task is cancelled
    assert cancelled.wait(WAIT)

    async def cancel_self() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # cancelled on its loop: the future is cancelled
        await asyncio.sleep(0)

    with pytest.raises(cf.CancelledError):
        portal.submit(cancel_self).result(WAIT)
    with pytest.raises(ValueError, match="remote"):
        portal.submit(_afail, "remote").result(WAIT)


async def _afail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


def test_close_with_work_in_flight_answers_every_caller() -> None:
    lt = offloop.LoopThread(name="portal-close").start()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(WAIT * 10)

    future = Portal(lt).submit(forever)
    assert started.wait(WAIT)
    results: list[Any] = []

    def blocked_caller() -> None:
        try:
            Portal(lt).call(forever)
        except BaseException as exc:
            results.append(exc)

    caller = threading.Thread(target=blocked_caller)
    caller.start()
    offloop_wait_until_tasks(lt, 2)
    lt.close()
    caller.join(WAIT)
    assert not caller.is_alive()
    with pytest.raises(offloop.PoolClosedError):
        future.result(WAIT)
    assert isinstance(results[0], offloop.PoolClosedError)
    with pytest.raises(offloop.PoolClosedError):
        Portal(lt).call_sync(len, "x")


def offloop_wait_until_tasks(lt: offloop.LoopThread, count: int) -> None:
    from tests.helpers import wait_until

    wait_until(lambda: lt._active >= count, what=f"{count} calls on {lt!r}")


def test_a_worker_whose_loop_closed_gets_caller_gone() -> None:
    loop = asyncio.new_event_loop()
    loop.close()

    def body() -> None:
        # What a worker of a pool whose awaiting loop has since closed sees.
        thread_state.call = WorkerCall(body, loop, StopToken())
        try:
            from_thread_sync(len, "x")
        finally:
            thread_state.call = None

    with pytest.raises(CallerGoneError, match="sent this work to the thread"):
        in_plain_thread(body)


async def test_iterate_on_a_running_loop_is_refused_by_name_before_anything_starts() -> None:
    async def numbers() -> Any:
        yield 1

    target = offloop.LoopThread(name="iterate-refused")
    try:
        with pytest.raises(WouldDeadlockError, match=r"Portal\.iterate\(\).*async for"):
            next(Portal(target).iterate(numbers))
        assert target.state.value == "created"  # refused before the loop thread started
    finally:
        await target.aclose()


def test_iterate_a_generators_system_exit_reaches_the_caller_and_stops_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As from any crossing: the caller gets it, and it stops the loop the
    # generator ran on (the loop thread refuses calls after), quietly.
    closed = threading.Event()

    async def exits() -> AsyncIterator[int]:
        try:
            yield 1
            raise SystemExit(3)
        finally:
            closed.set()

    lt = offloop.LoopThread(name="iter-exit").start()
    try:
        iterator = Portal(lt).iterate(exits)
        assert next(iterator) == 1
        with pytest.raises(SystemExit) as raised:
            next(iterator)
        assert raised.value.code == 3
        assert closed.is_set()
        wait_until(lambda: lt.state is not offloop.LoopThreadState.RUNNING, QUICK_WAIT)
        with pytest.raises(offloop.PoolClosedError):
            Portal(lt).call(asyncio.sleep, 0)
        del iterator, raised  # the stream and its task go with them
    finally:
        lt.close()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_refused_start_leaves_nothing_on_the_workers_stop_token() -> None:
    # A worker's token (a thread service's lives as long as the service) must
    # not keep a handle, and its arguments, for every start that was refused.
    lt = offloop.LoopThread(name="refusing").start()
    lt.close()
    loop = asyncio.new_event_loop()
    loop.close()
    token = StopToken()

    async def noop() -> None:
        pass

    def body() -> None:
        thread_state.call = WorkerCall(body, None, token)
        try:
            for portal in (Portal(lt), Portal(loop)):
                for start in (portal.submit, portal.start_task):
                    with pytest.raises(offloop.PoolClosedError):
                        start(noop)
        finally:
            thread_state.call = None

    in_plain_thread(body)
    assert not token._callbacks

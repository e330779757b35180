"""LoopThread at its edges: exceptions past the usual ones, failing task factories, bad closes."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

import offloop
from offloop import LoopThread
from tests.helpers import QUICK_WAIT, state, wait_until, where_am_i


class Fatal(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


async def fatal() -> None:
    await asyncio.sleep(0)
    raise Fatal("from the coroutine")


def test_a_base_exception_reaches_its_caller_and_is_not_logged_as_never_retrieved() -> None:
    reported: list[dict[str, Any]] = []
    with LoopThread(name="base-exception") as lt:
        assert lt.loop is not None
        lt.loop.set_exception_handler(lambda loop, context: reported.append(context))
        with pytest.raises(Fatal, match="from the coroutine"):
            lt.call(fatal)

        async def from_another_loop() -> None:
            with pytest.raises(Fatal, match="from the coroutine"):
                await lt.run(fatal)

        asyncio.run(from_another_loop())
        # Unlike SystemExit, it does not stop the loop: the loop thread still
        # runs, and is still stopped if dropped unclosed.
        assert lt.call(where_am_i)[0] == "offloop-loop-base-exception"
        assert lt._finalizer is not None
        assert lt._finalizer.alive
    gc.collect()  # a task with an exception nobody retrieved is reported when collected
    assert reported == []


async def cancelled_on_its_loop() -> str:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()  # by something on the loop, not by the caller
    await asyncio.sleep(0)
    return "not cancelled"


@pytest.mark.loops("asyncio")
async def test_a_coroutine_cancelled_on_its_loop_is_caller_gone_for_every_sync_caller() -> None:
    # One meaning, one type: a sync caller is no task, and a bare CancelledError
    # (a BaseException) would slip past its `except Exception`.
    def outcome(call: Any) -> BaseException:
        try:
            call()
        except BaseException as exc:  # recorded for the assertions below
            return exc
        raise AssertionError("no exception")

    async with LoopThread(name="self-cancel") as lt:
        errors = {
            "LoopThread.call": await asyncio.to_thread(
                outcome, lambda: lt.call(cancelled_on_its_loop)
            ),
            "from_thread, plain thread": await asyncio.to_thread(
                outcome, lambda: offloop.from_thread(cancelled_on_its_loop)
            ),
            "from_thread, worker": await offloop.to_thread(
                outcome, lambda: offloop.from_thread(cancelled_on_its_loop)
            ),
            "LoopThread.call, worker": await offloop.to_thread(
                outcome, lambda: lt.call(cancelled_on_its_loop)
            ),
        }
        for where, error in errors.items():
            assert isinstance(error, offloop.CallerGoneError), (where, error)
            assert "cancelled_on_its_loop' was cancelled on the event loop" in str(error), where
            assert isinstance(error.__cause__, asyncio.CancelledError), where
        # An async caller is a task: it gets the cancellation, as from any awaited task.
        with pytest.raises(asyncio.CancelledError):
            await lt.run(cancelled_on_its_loop)


class FactoryRefused(Exception):
    pass


def refusing_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    coro.close()
    raise FactoryRefused("no tasks today")


@pytest.mark.loops("asyncio")
async def test_a_task_factory_that_raises_reaches_the_caller() -> None:
    async with LoopThread(name="no-tasks") as lt:
        assert lt.loop is not None
        lt.loop.set_task_factory(refusing_factory)
        with pytest.raises(FactoryRefused, match="no tasks today"):
            await asyncio.wait_for(asyncio.to_thread(lt.call, where_am_i), 10)
        with pytest.raises(FactoryRefused, match="no tasks today"):
            await asyncio.wait_for(lt.run(where_am_i), 10)
        assert " 0 tasks" in repr(lt)  # both counted as finished
        lt.loop.set_task_factory(None)
        assert (await lt.run(where_am_i))[0] == "offloop-loop-no-tasks"


@pytest.mark.loops("asyncio")
async def test_a_bad_close_timeout_is_refused_before_the_loop_thread_closes() -> None:
    lt = LoopThread(name="timeouts").start()
    try:
        for timeout, error in [("x", TypeError), (-1, ValueError), (float("nan"), ValueError)]:
            with pytest.raises(error, match=r"^LoopThread\.aclose\(timeout=\.\.\.\) must be"):
                await lt.aclose(timeout=timeout)  # type: ignore[arg-type]
            with pytest.raises(error, match=r"^LoopThread\.close\(timeout=\.\.\.\) must be"):
                await asyncio.to_thread(lt.close, timeout=timeout)  # type: ignore[arg-type]
            assert state(lt) == "running"
        assert (await lt.run(where_am_i))[0] == "offloop-loop-timeouts"
        await asyncio.to_thread(lt.close, timeout=1e10)  # beyond a wait's maximum: no timeout
        assert state(lt) == "closed"
    finally:
        await lt.aclose()


@pytest.mark.parametrize("queued", [False, True], ids=["before-queued", "after-queued"])
def test_ctrl_c_while_a_call_is_sent_leaves_the_count_right_and_the_call_unrun(
    monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    # KeyboardInterrupt strikes while the call is handed to the loop: before
    # the loop has it, or once it has it but before the sender returns. The
    # caller gets the interrupt, so the call must neither run nor stay counted
    # (a count left over keeps a shared loop thread from ever retiring).
    ran: list[str] = []

    async def record() -> None:
        ran.append("ran")

    with LoopThread(name="interrupted-send") as lt:
        lt.call(where_am_i)  # started; its own call is counted done
        loop = lt.loop
        assert loop is not None
        real = loop.call_soon_threadsafe

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.undo()  # only this one call is interrupted
            if queued:
                real(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(loop, "call_soon_threadsafe", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lt.call(record)
        # Queued after it, so the interrupted call's start (if queued) went first.
        assert lt.call(where_am_i)[0] == "offloop-loop-interrupted-send"
        assert lt._active == 0, repr(lt)
        assert ran == []


async def fails_at_once() -> None:
    raise ValueError("nobody hears this")


@pytest.mark.parametrize("how", ["closed", "interrupted", "closed-after-it-failed"])
async def test_a_caller_gone_while_its_coroutine_runs_there_cancels_it_and_nothing_is_logged(
    how: str,
) -> None:
    # The caller's coroutine is closed while it waits (a task collected pending,
    # say) or gets an exception thrown in: nobody will await the outcome, so the
    # coroutine on the loop thread is cancelled, and its end (or an error it
    # had sent back already) reaches nobody without an error on either loop.
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
    lt = LoopThread(name="caller-gone").start()
    try:
        assert lt.loop is not None
        lt.loop.set_exception_handler(lambda loop, ctx: reported.append(ctx))
        if how == "closed-after-it-failed":
            caller = lt.run(fails_at_once)
            caller.send(None)
            # Not awaited here: the error's delivery waits for this loop.
            wait_until(lambda: lt._active == 0, QUICK_WAIT, "the coroutine's end there")
            caller.close()
        else:
            started = threading.Event()
            ended: list[str] = []

            async def long() -> None:
                started.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    ended.append("cancelled")
                    raise

            caller = lt.run(long)
            caller.send(None)  # up to its wait for the outcome
            assert await asyncio.to_thread(started.wait, QUICK_WAIT), "it never started there"
            if how == "closed":
                caller.close()
            else:
                with pytest.raises(Fatal):
                    caller.throw(Fatal("the caller is gone"))
        # A round trip through the loop thread, then through this loop: the
        # cancel sent there has run, and so has the delivery sent back here.
        await lt.run(asyncio.sleep, 0)
        await asyncio.sleep(0)
        if how != "closed-after-it-failed":
            assert ended == ["cancelled"]
        assert lt._active == 0, repr(lt)
        del caller
    finally:
        await lt.aclose()
    gc.collect()
    assert reported == []

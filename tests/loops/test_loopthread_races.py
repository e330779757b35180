"""LoopThread races: calls whose remote task is cancelled before its first step.

On asyncio's own loops a crossing's task takes its first step at once (see
``_loops/crossing.py``'s ``_step_now``); on other loops (uvloop) it waits for the loop's
next iteration, so the races run on both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import threading
from typing import Any

import pytest
import uvloop

import offloop
from offloop import LoopThread, LoopThreadState, PoolClosedError, Portal
from tests.helpers import WAIT, await_until, wait_until


async def hold(release: threading.Event) -> None:
    release.wait(WAIT)  # blocks the loop thread in sync code, on purpose


async def quick() -> str:
    return "quick"


def _nothing() -> None:
    pass


def deferred_step_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose new tasks wait for the next iteration, as uvloop's do."""
    loop = asyncio.new_event_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        loop.call_soon(_nothing)  # the task's step is no longer last in the ready queue
        return task

    loop.set_task_factory(factory)
    return loop


#: The loops a LoopThread runs the races on: asyncio's (first step taken at
#: once), and two where it waits for the next iteration.
LOOPS = pytest.mark.parametrize(
    "loop_factory",
    [None, uvloop.new_event_loop, deferred_step_loop],
    ids=["asyncio", "uvloop", "deferred-step"],
)
LoopFactory = Any


async def let_run_send(n: int = 3) -> None:
    # lt.run() schedules its start on the loop thread in its first steps.
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.loops("asyncio")
@LOOPS
async def test_a_call_started_as_the_loop_thread_closes_gets_an_answer(
    loop_factory: LoopFactory,
) -> None:
    lt = LoopThread(name="close-race", loop_factory=loop_factory).start()
    release = threading.Event()
    holder = asyncio.ensure_future(lt.run(hold, release))
    victim = asyncio.ensure_future(lt.run(quick))  # its start waits behind the holder
    await let_run_send()
    closer = threading.Thread(target=lt.close, name="test-closer")
    closer.start()
    await await_until(lambda: lt.state is not LoopThreadState.RUNNING, WAIT, "closing")
    release.set()
    try:
        # It used to wait forever. Depending on where the close stands when the
        # start runs, the call completes or is refused; either way it answers.
        (answer,) = await asyncio.wait_for(asyncio.gather(victim, return_exceptions=True), WAIT)
        if isinstance(answer, PoolClosedError):
            assert "before function 'quick' started there" in str(answer)
        else:
            assert answer == "quick"
        # The holder was running when the close began: finished or cancelled, it answers.
        await asyncio.wait_for(asyncio.gather(holder, return_exceptions=True), WAIT)
    finally:
        closer.join(WAIT)
    assert lt.state is LoopThreadState.CLOSED


@pytest.mark.loops("asyncio")
@LOOPS
async def test_cancelling_before_the_remote_task_ran_settles_the_task_count(
    loop_factory: LoopFactory,
) -> None:
    async with LoopThread(name="cancel-race", loop_factory=loop_factory) as lt:
        release = threading.Event()
        holder = asyncio.ensure_future(lt.run(hold, release))
        await let_run_send()
        victims = [asyncio.ensure_future(lt.run(quick)) for _ in range(5)]
        await let_run_send()  # their starts, then their cancels, queue behind the holder
        for victim in victims:
            victim.cancel()
        release.set()
        for victim in victims:
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(victim, WAIT)
        await asyncio.wait_for(holder, WAIT)
        # Every call was accounted for: the count drops back to 0 (a leak kept
        # the shared to_loop thread from ever retiring).
        await await_until(lambda: " 0 tasks" in repr(lt), WAIT, "the task count to settle")
        assert await lt.run(quick) == "quick"


@LOOPS
def test_a_sync_call_started_as_the_loop_thread_closes_gets_pool_closed(
    loop_factory: LoopFactory,
) -> None:
    lt = LoopThread(name="sync-race", loop_factory=loop_factory).start()
    release = threading.Event()
    outcomes: dict[str, object] = {}

    def call(key: str, async_fn: Any, *args: Any) -> None:
        try:
            outcomes[key] = lt.call(async_fn, *args)
        except BaseException as exc:  # recorded for the assertions below
            outcomes[key] = exc

    threads = [threading.Thread(target=call, args=("holder", hold, release), name="test-holder")]
    threads[0].start()
    wait_until(lambda: " 1 task" in repr(lt), WAIT, "the holder to run")
    threads.append(threading.Thread(target=call, args=("victim", quick), name="test-victim"))
    threads[1].start()
    wait_until(lambda: " 2 tasks" in repr(lt), WAIT, "the victim to be sent")
    closer = threading.Thread(target=lt.close, name="test-closer")
    closer.start()
    try:
        wait_until(lambda: lt.state is not LoopThreadState.RUNNING, WAIT, "closing")
        release.set()
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        # Completed, or refused with the documented error (not CallerGoneError
        # after polling a closed loop).
        victim = outcomes["victim"]
        assert victim == "quick" or isinstance(victim, PoolClosedError), outcomes
    finally:
        release.set()
        closer.join(WAIT)


def test_from_thread_gets_caller_gone_when_the_sending_loop_shuts_down() -> None:
    started = threading.Event()
    outcome: list[BaseException | str] = []
    worker_done = threading.Event()

    async def long_wait() -> str:
        started.set()
        await asyncio.sleep(WAIT)
        return "finished"

    def worker() -> None:
        try:
            outcome.append(offloop.from_thread(long_wait))
        except BaseException as exc:  # recorded for the assertions below
            outcome.append(exc)
        finally:
            worker_done.set()

    async def main() -> None:
        offloop.to_thread(worker)  # left running when main() returns
        await asyncio.to_thread(started.wait, WAIT)

    asyncio.run(main())  # cancels long_wait, which runs on this loop
    assert worker_done.wait(WAIT)
    # Not a bare CancelledError, which `except Exception` in the worker would miss.
    assert isinstance(outcome[0], offloop.CallerGoneError), outcome
    assert "cancelled on the event loop that sent this work" in str(outcome[0])
    assert isinstance(outcome[0].__cause__, asyncio.CancelledError)


@pytest.mark.loops("asyncio")
async def test_system_exit_in_one_coroutine_still_answers_the_others() -> None:
    lt = LoopThread(name="exiting").start()
    forever = asyncio.Event()
    other = asyncio.ensure_future(lt.run(forever.wait))
    await await_until(lambda: " 1 task" in repr(lt), WAIT, "the other call to run")

    async def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        await asyncio.to_thread(lt.call, leave)  # it ends the loop thread, as it should
    # ...but the call still there gets an answer instead of waiting forever.
    with pytest.raises(PoolClosedError, match="was closed while coroutine"):
        await asyncio.wait_for(other, WAIT)
    await asyncio.wait_for(lt.aclose(), WAIT)
    assert lt.state is LoopThreadState.CLOSED


TAG: contextvars.ContextVar[str] = contextvars.ContextVar("TAG", default="unset")


async def read_and_change() -> str:
    seen = TAG.get()
    TAG.set("changed inside")
    return seen


@pytest.mark.loops("asyncio")
async def test_a_crossing_onto_the_loop_it_is_on_still_copies_the_context() -> None:
    async def nested_to_loop() -> tuple[str, str]:
        TAG.set("outer")
        return await offloop.to_loop(read_and_change), TAG.get()

    assert await offloop.to_loop(nested_to_loop) == ("outer", "outer")
    async with LoopThread(name="nested-ctx") as lt:

        async def nested_run() -> tuple[str, str]:
            TAG.set("outer")
            return await lt.run(read_and_change), TAG.get()

        assert await lt.run(nested_run) == ("outer", "outer")


def test_close_from_the_loops_own_executor_is_refused_and_the_close_still_ends() -> None:
    lt = LoopThread(name="self-close").start()
    refused: list[BaseException] = []

    def close_here() -> None:
        try:
            lt.close()  # would wait for the executor, which waits for this thread
        except offloop.WouldDeadlockError as exc:
            refused.append(exc)

    async def close_from_executor() -> None:
        await asyncio.get_running_loop().run_in_executor(None, close_here)

    with pytest.raises(PoolClosedError):
        lt.call(close_from_executor)  # the close cancels the very call that asked for it
    wait_until(lambda: lt.state is LoopThreadState.CLOSED, WAIT, "the loop thread to close")
    assert len(refused) == 1
    assert "default executor" in str(refused[0])
    lt.close()  # closed: returns at once


@pytest.mark.parametrize(
    "loop_factory", [None, deferred_step_loop], ids=["asyncio", "deferred-step"]
)
def test_a_start_queued_before_the_close_is_refused_on_every_loop(
    loop_factory: LoopFactory,
) -> None:
    # The victim's start and the close's stop queue up, in that order, while
    # the holder blocks the loop. Whether a task's first step is taken at once
    # or not, the victim never starts once the close began, and hears why.
    lt = LoopThread(name="first-step", loop_factory=loop_factory).start()
    holding, release = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    async def hold_loop() -> None:
        holding.set()
        release.wait(WAIT)

    def call(key: str, async_fn: Any) -> None:
        try:
            outcomes[key] = lt.call(async_fn)
        except BaseException as exc:  # recorded for the assertions below
            outcomes[key] = exc

    threads = [threading.Thread(target=call, args=("holder", hold_loop), name="test-holder")]
    threads[0].start()
    closer = threading.Thread(target=lt.close, name="test-closer")
    try:
        assert holding.wait(WAIT), "the holder never ran"
        threads.append(threading.Thread(target=call, args=("victim", quick), name="test-victim"))
        threads[1].start()
        wait_until(lambda: " 2 tasks" in repr(lt), WAIT, "the victim to be sent")
        closer.start()
        wait_until(lambda: lt.state is not LoopThreadState.RUNNING, WAIT, "closing")
    finally:
        release.set()
        for thread in [*threads, closer]:
            if thread.ident is not None:
                thread.join(WAIT)
                assert not thread.is_alive(), thread
    assert outcomes["holder"] is None
    victim = outcomes["victim"]
    assert isinstance(victim, PoolClosedError), outcomes
    assert "before function 'quick' started there, so it never ran" in str(victim)
    assert lt.state is LoopThreadState.CLOSED


@pytest.mark.loops("asyncio")
async def test_a_start_run_inside_a_task_leaves_the_first_step_queued() -> None:
    # Starts run as plain loop callbacks; should one ever run inside a task,
    # taking the new task's step there would fail ("Cannot enter into task")
    # and strand the caller. It must fall back to the next iteration instead.
    from offloop._loops.crossing import Reply, start_sync

    reply = Reply(asyncio.get_running_loop(), None)
    start_sync(reply, quick, (), {})
    assert not reply.claim.locked(), "the step ran inside the current task"
    assert await asyncio.to_thread(reply.lock.acquire, True, WAIT)
    assert reply.outcome == (True, "quick")


def test_the_first_outcome_posted_to_a_reply_wins_and_wakes_the_caller_once() -> None:
    # The loop's result and a stop path (token set, loop closed) may race to post.
    from offloop._loops.crossing import TOKEN_SET, Reply

    loop = asyncio.new_event_loop()
    try:
        reply = Reply(loop, None)
        assert not reply.lock.acquire(False)  # the caller's lock starts taken
        reply.post((True, 1))
        reply.post(TOKEN_SET)
        assert reply.outcome == (True, 1)
        assert reply.lock.acquire(False)
        reply.post((True, 2))  # late: must neither change the outcome nor wake anyone
        assert not reply.lock.acquire(False)
        assert reply.outcome == (True, 1)
    finally:
        loop.close()


@pytest.mark.loops("asyncio")
@LOOPS
async def test_a_call_queued_behind_a_system_exit_is_refused_not_left_waiting(
    loop_factory: LoopFactory,
) -> None:
    lt = LoopThread(name="exit-queue", loop_factory=loop_factory).start()
    holding, release = threading.Event(), threading.Event()

    async def hold_then_exit() -> None:
        holding.set()
        release.wait(WAIT)  # blocks the loop while the victim's start queues up
        raise SystemExit(3)

    async def run_exiting() -> BaseException | None:
        try:
            await lt.run(hold_then_exit)
        except SystemExit as exc:  # caught here: escaping a task would stop this loop
            return exc
        return None

    exiting = asyncio.ensure_future(run_exiting())
    try:
        assert await asyncio.to_thread(holding.wait, WAIT), "the holder never ran"
        victim = asyncio.ensure_future(lt.run(quick))
        await await_until(lambda: " 2 tasks" in repr(lt), WAIT, "the victim to be sent")
    finally:
        release.set()
    assert isinstance(await asyncio.wait_for(exiting, WAIT), SystemExit)
    # Its start ran while the loop was closing: it used to create a task that
    # the close never cancelled, and the caller waited forever. (uvloop may
    # still run the start before its loop stops; then the close cancels it.)
    started = "before function 'quick' started there|was closed while coroutine 'quick' ran"
    with pytest.raises(PoolClosedError, match=started):
        await asyncio.wait_for(victim, WAIT)
    await asyncio.wait_for(lt.aclose(), WAIT)
    assert lt.state is LoopThreadState.CLOSED
    assert " 0 tasks" in repr(lt)


@pytest.mark.loops("asyncio")
@LOOPS
@pytest.mark.parametrize("crossing", ["call", "run", "submit"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_an_exit_exception_reaches_its_caller_and_leaves_no_unretrieved_task(
    loop_factory: LoopFactory,
    crossing: str,
    exc_type: type[BaseException],
    caplog: pytest.LogCaptureFixture,
) -> None:
    lt = LoopThread(name="exit-log", loop_factory=loop_factory).start()

    async def leave() -> None:
        raise exc_type

    async def run_leaving() -> BaseException | None:
        try:
            await lt.run(leave)
        except exc_type as exc:  # caught here: escaping a task would stop this loop
            return exc
        return None

    if crossing == "call":
        with pytest.raises(exc_type):
            await asyncio.to_thread(lt.call, leave)
    elif crossing == "submit":
        with pytest.raises(exc_type):
            await asyncio.to_thread(Portal(lt).submit(leave).result, WAIT)
    else:
        assert isinstance(await asyncio.wait_for(run_leaving(), WAIT), exc_type)
    # It still ends the loop thread, as it ends asyncio.run()...
    await asyncio.wait_for(lt.aclose(), WAIT)
    assert lt.state is LoopThreadState.CLOSED
    # ...but its caller has it, so the task it ended in is not reported as
    # "Task exception was never retrieved" when collected.
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.loops("asyncio")
async def test_a_coroutine_started_while_the_close_waits_for_the_executor_is_cancelled() -> None:
    lt = LoopThread(name="late-start").start()
    executor_busy, release = threading.Event(), threading.Event()
    first_sweep_done = threading.Event()

    def busy() -> None:
        executor_busy.set()
        release.wait(WAIT)

    async def start_busy_and_linger() -> None:
        asyncio.get_running_loop().run_in_executor(None, busy)
        try:
            await asyncio.Event().wait()
        finally:  # cancelled by the close's first sweep
            first_sweep_done.set()

    loop = lt.loop
    assert loop is not None
    lingering = asyncio.ensure_future(lt.run(start_busy_and_linger))
    closing = None
    try:
        assert await asyncio.to_thread(executor_busy.wait, WAIT)
        closing = asyncio.ensure_future(asyncio.to_thread(lt.close))
        assert await asyncio.to_thread(first_sweep_done.wait, WAIT)
        # The close now waits for the default executor, its loop still running:
        # a coroutine sent through the public .loop starts there.
        late = asyncio.run_coroutine_threadsafe(asyncio.Event().wait(), loop)
    finally:
        release.set()
    await asyncio.wait_for(closing, WAIT)
    # It used to be left pending when the loop closed, its caller waiting forever.
    assert late.cancelled()
    with pytest.raises(PoolClosedError):
        await asyncio.wait_for(lingering, WAIT)


@pytest.mark.loops("asyncio")
@LOOPS
async def test_a_close_racing_a_system_exit_still_answers_the_calls_left(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coroutine's SystemExit stops the loop, and a close() that comes before
    # the loop thread has noticed (the exiting call's caller leaving its
    # 'with lt:' block, say) asks the stopped loop to stop once more. That
    # stop must not end the shutdown's run of the loop early: the call still
    # there would never get its answer.
    noticed, release = threading.Event(), threading.Event()
    loop_stopped = LoopThread._loop_stopped

    def late_loop_stopped(self: LoopThread, exited: bool) -> None:
        noticed.set()
        release.wait(WAIT)
        loop_stopped(self, exited)

    monkeypatch.setattr(LoopThread, "_loop_stopped", late_loop_stopped)
    lt = LoopThread(name="exit-close", loop_factory=loop_factory).start()

    async def linger() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # a cleanup that takes another turn of the loop

    other = asyncio.ensure_future(lt.run(linger))
    await await_until(lambda: " 1 task" in repr(lt), WAIT, "the other call to run")

    async def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        await asyncio.to_thread(lt.call, leave)
    try:
        assert await asyncio.to_thread(noticed.wait, WAIT), "the loop never stopped"
        closing = asyncio.ensure_future(asyncio.to_thread(lt.close))
        await await_until(lambda: lt.state is LoopThreadState.CLOSING, WAIT, "the close")
    finally:
        release.set()
    with pytest.raises(PoolClosedError, match=r"was closed while coroutine .*linger"):
        await asyncio.wait_for(other, WAIT)
    await asyncio.wait_for(closing, WAIT)
    assert lt.state is LoopThreadState.CLOSED
    assert " 0 tasks" in repr(lt)


#: The loops where a task made in one turn of the loop takes its first step
#: in the next (uvloop takes it in the same turn, before a stop ends it).
NEXT_TURN_LOOPS = pytest.mark.parametrize(
    "loop_factory", [None, deferred_step_loop], ids=["asyncio", "deferred-step"]
)


def _stop_just_after_a_start(loop: asyncio.AbstractEventLoop, stop: Any, start: Any) -> None:
    # Queues start() then stop() while the loop is held in a callback, so one
    # turn of the loop runs both: the task start() makes is cancelled by the
    # shutdown before its first step.
    holding, release = threading.Event(), threading.Event()

    def held() -> None:
        holding.set()
        release.wait(WAIT)

    loop.call_soon_threadsafe(held)
    try:
        assert holding.wait(WAIT), "the loop never ran the holder"
        start()
        loop.call_soon_threadsafe(stop)
    finally:
        release.set()


@NEXT_TURN_LOOPS
def test_a_submitted_task_its_loop_thread_stops_before_its_first_step_settles(
    loop_factory: LoopFactory,
) -> None:
    lt = LoopThread(name="submit-exit", loop_factory=loop_factory).start()
    assert lt.loop is not None
    submitted: list[concurrent.futures.Future[str]] = []

    def exit_loop() -> None:
        raise SystemExit(3)  # stops the loop, as a coroutine's SystemExit does

    _stop_just_after_a_start(lt.loop, exit_loop, lambda: submitted.append(Portal(lt).submit(quick)))
    # It used to stay pending for good, and the task counted as running.
    with pytest.raises(PoolClosedError, match="was closed while coroutine 'quick'"):
        submitted[0].result(timeout=WAIT)
    lt.close(timeout=WAIT)
    assert lt.state is LoopThreadState.CLOSED
    assert " 0 tasks" in repr(lt)


@NEXT_TURN_LOOPS
def test_a_submitted_task_a_bare_loop_stops_before_its_first_step_settles(
    loop_factory: LoopFactory,
) -> None:
    loop = (loop_factory or asyncio.new_event_loop)()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    submitted: list[concurrent.futures.Future[str]] = []
    try:
        _stop_just_after_a_start(
            loop, loop.stop, lambda: submitted.append(Portal(loop).submit(quick))
        )
        runner.join(WAIT)
        assert not runner.is_alive()
        # What asyncio.run() does once its main coroutine has returned.
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    finally:
        loop.close()
    with pytest.raises(concurrent.futures.CancelledError):
        submitted[0].result(timeout=WAIT)

"""A thread pool's idle threads: which one takes the next call, and when they exit."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import offloop
from offloop._threads import growth
from offloop._threads import pool as pool_module
from offloop._threads import workers as workers_module
from tests.helpers import WAIT, await_until, wait_until


async def _grow(pool: offloop.ThreadPool, threads: int) -> None:
    # Runs `threads` calls at once, each waiting for all of them to start,
    # so each has a thread of its own; returns once they are all idle again.
    barrier = threading.Barrier(threads)
    await asyncio.wait_for(
        asyncio.gather(*(pool.run(barrier.wait, WAIT) for _ in range(threads))), WAIT
    )
    await await_until(lambda: pool.statistics()["idle"] == threads, WAIT, "the threads to idle")


@pytest.mark.loops("asyncio", "uvloop")
async def test_a_sequential_caller_is_served_by_the_thread_that_went_idle_last() -> None:
    # The thread that just finished a call is warm and may still be polling;
    # the others have slept longest. Handing each call to a thread that had
    # waited longest made sequential round trips measurably slower on a pool
    # that had once grown (the thread wake-up is most of a round trip).
    async with offloop.ThreadPool(4, name="lifo") as pool:
        await _grow(pool, 3)
        served = {await pool.run(threading.get_ident) for _ in range(50)}
        assert len(served) == 1, f"50 sequential calls ran on {len(served)} threads"
        assert pool.statistics()["threads"] == 3


@pytest.mark.loops("asyncio")
async def test_the_threads_a_sequential_caller_leaves_alone_age_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bottom of the idle stack is what a steady trickle of calls never
    # reaches: it exits after IDLE_TIMEOUT while the thread in use stays.
    monkeypatch.setattr(pool_module, "IDLE_TIMEOUT", 0.05)
    async with offloop.ThreadPool(4, name="ageout") as pool:
        await _grow(pool, 3)
        served: set[int] = set()

        async def trickle() -> None:
            while pool.statistics()["threads"] > 1:
                served.add(await pool.run(threading.get_ident))
                await asyncio.sleep(0)

        await asyncio.wait_for(trickle(), WAIT)
        assert len(served) == 1
        assert pool.statistics()["threads"] == 1
        assert await pool.run(threading.get_ident) in served  # the survivor is the one in use


@pytest.mark.loops("asyncio")
async def test_an_idle_pool_lets_its_threads_exit_and_starts_new_ones_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "IDLE_TIMEOUT", 0.05)
    async with offloop.ThreadPool(4, name="idleexit") as pool:
        await _grow(pool, 2)
        await await_until(lambda: pool.statistics()["threads"] == 0, WAIT, "the threads to exit")
        assert pool.statistics()["idle"] == 0
        assert await asyncio.wait_for(pool.run(abs, -3), WAIT) == 3
        assert pool.statistics()["threads"] == 1


@pytest.mark.loops("asyncio")
async def test_lowering_max_workers_ends_the_threads_idle_longest() -> None:
    async with offloop.ThreadPool(4, name="lowered") as pool:
        await _grow(pool, 3)
        last = await pool.run(threading.get_ident)  # now on top of the idle stack
        pool.max_workers = 1
        await await_until(lambda: pool.statistics()["threads"] == 1, WAIT, "two threads to end")
        assert await pool.run(threading.get_ident) == last
        assert pool.statistics()["idle"] == 1


@pytest.mark.loops("asyncio")
async def test_a_call_whose_thread_fails_to_start_is_taken_by_a_thread_that_went_idle(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The call was put on the queue for a new thread. By the time that
    # thread fails to start, the busy one has finished and gone idle, where
    # it waits to be handed a call, not on the queue: it must be sent there.
    release = threading.Event()
    pool = offloop.ThreadPool(2, name="lateidle")
    real_start = threading.Thread.start

    def start_after_the_first_goes_idle(thread: threading.Thread) -> None:
        if thread.name != "offloop-lateidle-2":
            real_start(thread)
            return
        release.set()
        wait_until(lambda: pool.statistics()["idle"] == 1, WAIT, "the busy thread to go idle")
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", start_after_the_first_goes_idle)
    busy = pool.run(release.wait, WAIT)
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    queued = pool.run(abs, -5)  # waits behind the busy thread: growth starts a second one
    assert await asyncio.wait_for(queued, WAIT) == 5
    assert await busy is True
    assert "could not start a worker thread" in caplog.text
    stats = pool.statistics()
    assert (stats["threads"], stats["idle"], stats["queued"]) == (1, 1, 0)
    await asyncio.wait_for(pool.aclose(), WAIT)


@pytest.mark.loops("asyncio")
async def test_closing_ends_idle_and_busy_threads_alike() -> None:
    pool = offloop.ThreadPool(4, name="closeidle")
    await _grow(pool, 3)
    release = threading.Event()
    busy = pool.run(release.wait, WAIT)  # on the top idle thread; two stay idle
    await await_until(lambda: pool.statistics()["running"] == 1, WAIT)
    closing = asyncio.ensure_future(pool.aclose())
    await await_until(lambda: pool.statistics()["threads"] == 1, WAIT, "the idle threads to end")
    release.set()
    await asyncio.wait_for(closing, WAIT)
    assert await busy is True
    stats = pool.statistics()
    assert (stats["state"], stats["threads"], stats["idle"]) == ("closed", 0, 0)


@pytest.mark.loops("asyncio")
async def test_a_done_callback_that_waits_for_the_pool_gets_another_thread() -> None:
    # concurrent.futures runs a future's done callbacks in the thread that
    # completes it: for the executor view, the worker that ran the call.
    # That worker must not be handed the next call while it still runs them,
    # or a callback that waits for a call of the same pool waits for itself
    # while another thread of the pool sits idle.
    async with offloop.ThreadPool(2, name="callback") as pool:
        await _grow(pool, 2)
        view = pool.executor()
        gate = threading.Event()
        got: list[object] = []
        called = threading.Event()

        def wait_for_another_call(_: object) -> None:
            try:
                got.append(view.submit(abs, -4).result(timeout=WAIT))
            except BaseException as exc:  # reported by the assert below
                got.append(exc)
            called.set()

        outer = view.submit(gate.wait, WAIT)
        outer.add_done_callback(wait_for_another_call)
        gate.set()
        assert await asyncio.to_thread(called.wait, 2 * WAIT), "the callback never ran"
        assert got == [4]
        view.shutdown()


@pytest.mark.loops("asyncio")
async def test_the_last_thread_to_retire_leaves_the_pool_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thread told to end by a lowered max_workers may be the last to leave
    # when another ended its idle wait meanwhile. An open pool with no
    # thread is not a closed one: it starts a thread for its next call.
    pool = offloop.ThreadPool(2, name="lastretire")
    release = await _last_thread_retiring(pool, monkeypatch)
    release.set()
    await await_until(lambda: pool.statistics()["threads"] == 0, WAIT, "the last thread to end")
    assert pool.statistics()["state"] == "open"
    assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2
    await asyncio.wait_for(pool.aclose(), WAIT)


async def _last_thread_retiring(
    pool: offloop.ThreadPool, monkeypatch: pytest.MonkeyPatch
) -> threading.Event:
    # Leaves the pool (of max_workers 2) with max_workers 1 and one thread,
    # told to end by the lowered max_workers and held just before it leaves
    # the pool (as if preempted there), until the returned event is set. The
    # other thread ended its idle wait; later ones end theirs in 0.05 s.
    await _grow(pool, 2)
    real_exited = pool._thread_exited
    exiting = threading.Event()
    release = threading.Event()

    def exit_last(worker: Any) -> None:
        exiting.set()
        assert release.wait(WAIT), "the test never let the retiring thread exit"
        real_exited(worker)

    monkeypatch.setattr(pool, "_thread_exited", exit_last)
    pool.max_workers = 1  # the thread idle longest is told to end
    assert await asyncio.to_thread(exiting.wait, WAIT), "no thread retired"
    monkeypatch.setattr(pool_module, "IDLE_TIMEOUT", 0.05)
    assert await asyncio.wait_for(pool.run(abs, -1), WAIT) == 1  # the other waits anew, briefly
    await await_until(lambda: pool.statistics()["threads"] == 1, WAIT, "the other to time out")
    return release


def _fail_one_start(
    pool: offloop.ThreadPool, monkeypatch: pytest.MonkeyPatch, *, times: int = 1
) -> list[str]:
    # The pool's next thread (next ``times`` threads) fails to start, as at a
    # thread limit; the ones after start. Returns the names of the threads refused.
    real_start = threading.Thread.start
    refused: list[str] = []

    def fail_once(thread: threading.Thread) -> None:
        if thread.name.startswith(f"offloop-{pool.name}-") and len(refused) < times:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", fail_once)
    return refused


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("fails", ["before it exits", "once it exited"])
async def test_a_call_whose_thread_failed_to_start_runs_once_the_last_thread_retires(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fails: str
) -> None:
    # A lowered max_workers ends a thread while a call is pending. Either a
    # raised max_workers lets the check start a thread for the call before
    # the retiring one exits, and that start fails: the call waits for the
    # retiring thread, which exits instead, so the call goes back to _pending
    # after the check gave up. Or the check starts one once the last thread
    # has exited, and that start fails. Either way no thread is left to come
    # free: the start must be tried again without waiting for another call.
    pool = offloop.ThreadPool(2, name="stranded")
    release = await _last_thread_retiring(pool, monkeypatch)
    refused = _fail_one_start(pool, monkeypatch)
    call = pool.run(abs, -2)  # pending: the retiring thread still counts
    if fails == "before it exits":
        pool.max_workers = 2  # room for one more: the check starts it, and fails
        await await_until(
            lambda: "could not start a worker thread" in caplog.text, WAIT, "the start to fail"
        )
    release.set()  # the last thread exits
    await await_until(lambda: bool(refused), WAIT, "the check to start a thread")
    assert await asyncio.wait_for(call, WAIT) == 2
    await asyncio.wait_for(pool.aclose(), WAIT)
    stats = pool.statistics()
    assert (stats["completed"], stats["queued"], stats["threads"]) == (4, 0, 0)


@pytest.mark.loops("asyncio")
async def test_a_failed_start_at_a_batch_leaves_the_scheduled_check_armed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A batch (dispatch.py) that starts the pool's only thread, which fails,
    # while the check its loop armed for the pending calls is scheduled:
    # that check goes on, and must stay on record as armed, or the next call
    # that waits arms a second one beside it for as long as calls wait.
    pool = offloop.ThreadPool(2, name="flushfail")
    release = await _last_thread_retiring(pool, monkeypatch)
    gate = threading.Event()

    def blocked() -> bool:
        return gate.wait(WAIT)

    # As if the pool had learnt that it waits: a batch gives it a thread at once.
    pool._waits[blocked.__code__] = workers_module.WAITS_AFTER
    refused = _fail_one_start(pool, monkeypatch)
    pending = pool.run(abs, -2)  # pending (the retiring thread counts): arms the check
    channel = pending._channel
    assert channel in pool._armed
    batched = pool.run(blocked)  # in the loop's batch, taken in at the next iteration
    release.set()
    wait_until(lambda: pool.statistics()["threads"] == 0, WAIT, "the last thread to exit")
    try:
        await await_until(lambda: bool(refused), WAIT, "the batch to start a thread")
        assert "could not start a worker thread" in caplog.text
        assert channel in pool._armed, "a check is scheduled but no longer on record as armed"
    finally:
        gate.set()
    assert await asyncio.wait_for(batched, WAIT) is True
    assert await asyncio.wait_for(pending, WAIT) == 2
    await asyncio.wait_for(pool.aclose(), WAIT)


@pytest.mark.loops("asyncio")
async def test_a_start_that_keeps_failing_is_logged_once_per_streak(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With no thread left, the check tries the start again every START_RETRY
    # while the call waits: at a thread limit that could last for hours, and
    # a traceback per try would flood the log.
    pool = offloop.ThreadPool(2, name="startstreak")
    release = await _last_thread_retiring(pool, monkeypatch)
    monkeypatch.setattr(growth, "START_RETRY", 0.01)
    refused = _fail_one_start(pool, monkeypatch, times=4)
    caplog.set_level("DEBUG", logger="offloop")
    call = pool.run(abs, -2)  # pending: the retiring thread still counts
    release.set()  # the last thread exits; the check starts one, which fails 4 times
    assert await asyncio.wait_for(call, WAIT) == 2
    assert len(refused) == 4
    failed = [r for r in caplog.records if "could not start a worker thread" in r.getMessage()]
    assert [(r.levelname, r.exc_info is not None) for r in failed] == [("ERROR", True)] + [
        ("DEBUG", False)
    ] * 3
    assert "calls that need one wait" in failed[0].getMessage()
    again = [r for r in caplog.records if "started a worker thread again" in r.getMessage()]
    assert [r.getMessage() for r in again] == [
        "offloop: pool 'startstreak' started a worker thread again, after 4 failed starts."
    ]
    await asyncio.wait_for(pool.aclose(), WAIT)

"""The measured choice of whether a thread polls before it sleeps (_core/spin.py)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import pytest

import offloop
from offloop._core.spin import GAP_LIMIT, SAMPLES, SETTLE, TURN, SpinTuner
from offloop._threads.pool import SPIN_WINDOW
from tests.helpers import WAIT, await_until


def _compare(tuner: SpinTuner, *, polling: float, not_polling: float) -> None:
    # Feeds one whole comparison: each worker reports the window it used.
    while True:
        window = tuner.window
        tuner.record(polling if window else not_polling, window)
        if repr(tuner).endswith(f"for {SETTLE} more gaps>"):
            return


def test_it_starts_polling_and_alternates_turns_while_comparing() -> None:
    tuner = SpinTuner(SPIN_WINDOW)
    assert tuner.window == SPIN_WINDOW
    seen = []
    for _ in range(4 * TURN):
        seen.append(tuner.window)
        tuner.record(20e-6, tuner.window)
    assert seen == [SPIN_WINDOW] * TURN + [0.0] * TURN + [SPIN_WINDOW] * TURN + [0.0] * TURN


@pytest.mark.parametrize(
    ("polling", "not_polling", "chosen"),
    [
        (20e-6, 40e-6, SPIN_WINDOW),  # the poll catches calls a wake-up would delay
        (50e-6, 30e-6, 0.0),  # the poll slows the loop's thread more than it saves
        (30e-6, 30.5e-6, 0.0),  # too close to call: the poll's CPU is not worth it
    ],
)
def test_it_keeps_the_mode_with_the_shorter_gaps(
    polling: float, not_polling: float, chosen: float
) -> None:
    tuner = SpinTuner(SPIN_WINDOW)
    _compare(tuner, polling=polling, not_polling=not_polling)
    assert tuner.window == chosen
    for _ in range(SETTLE - 1):  # settled: the other mode's gaps change nothing
        tuner.record(1e-6, tuner.window)
        assert tuner.window == chosen


def test_it_compares_again_after_settle_gaps_and_follows_a_change() -> None:
    tuner = SpinTuner(SPIN_WINDOW)
    _compare(tuner, polling=50e-6, not_polling=30e-6)
    assert tuner.window == 0.0
    for _ in range(SETTLE):
        tuner.record(30e-6, 0.0)
    assert "comparing" in repr(tuner)
    _compare(tuner, polling=20e-6, not_polling=60e-6)  # wake-ups got expensive
    assert tuner.window == SPIN_WINDOW


def test_gaps_of_an_ended_mode_are_not_counted() -> None:
    tuner = SpinTuner(SPIN_WINDOW)
    for _ in range(10 * SAMPLES):
        tuner.record(1e-6, 0.0 if tuner.window else SPIN_WINDOW)  # parked before a switch
    assert tuner.window == SPIN_WINDOW
    assert repr(tuner) == "<SpinTuner polling, comparing>"


@pytest.mark.loops("asyncio", "uvloop")
async def test_a_sequential_caller_settles_its_pools_choice() -> None:
    async with offloop.ThreadPool(2, name="tuned") as pool:
        tuner = pool._spin

        async def round_trips() -> None:
            while "comparing" in repr(tuner):
                await pool.run(threading.get_ident)

        # About 2 * SAMPLES round trips, however long each takes.
        await asyncio.wait_for(round_trips(), WAIT)
        assert tuner.window in (0.0, SPIN_WINDOW)
        await await_until(lambda: pool.statistics()["idle"] == 1, WAIT)


def test_callers_on_many_threads_may_share_a_tuner_without_a_lock() -> None:
    # Sync callers of every thread share one tuner (crossing.REPLY_POLLING):
    # races may lose a gap or repeat a decision, but must never leave it
    # stuck in one mode or with its counters out of range.
    tuner = SpinTuner(SPIN_WINDOW)
    start = threading.Barrier(4)

    def feed() -> None:
        start.wait(WAIT)
        for _ in range(3 * (SETTLE + 2 * SAMPLES)):
            window = tuner.window
            tuner.record(20e-6 if window else 40e-6, window)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert tuner.window == SPIN_WINDOW  # polling was faster throughout
    assert 0 < tuner._left <= TURN
    assert tuner._settled >= 0
    assert all(len(gaps) <= 2 * SAMPLES for gaps in tuner._gaps)


def test_a_caller_still_deciding_when_another_decides_too_does_not_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two callers may both count the last gap of a comparison (each before
    # the other starts the next turn) and both decide: the one still taking
    # its medians when the other has decided must find its gaps there.
    from offloop._core import spin

    tuner = SpinTuner(SPIN_WINDOW)

    def record_one() -> None:
        window = tuner.window
        tuner.record(20e-6 if window else 40e-6, window)

    for _ in range(2 * SAMPLES - 1):  # one gap short of a decision
        record_one()
    assert "comparing" in repr(tuner)
    in_median = threading.Event()
    resume = threading.Event()

    def paused_median(data: list[float]) -> float:
        if threading.current_thread().name == "first" and not in_median.is_set():
            in_median.set()
            resume.wait(WAIT)
        return statistics.median(data)

    monkeypatch.setattr(spin, "median", paused_median)
    errors: list[BaseException] = []

    def first_decides() -> None:
        try:
            record_one()
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=first_decides, name="first")
    first.start()
    try:
        assert in_median.wait(WAIT)
        for _ in range(TURN):  # another caller meanwhile: a whole turn, and its decision
            record_one()
    finally:
        resume.set()
        first.join(WAIT)
    assert errors == []
    assert tuner.window == SPIN_WINDOW  # polling was faster
    assert repr(tuner).endswith(f"for {SETTLE} more gaps>")


def test_a_loop_thread_and_its_sync_callers_settle_their_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offloop._loops import crossing

    replies = SpinTuner(crossing.SPIN_WINDOW)
    monkeypatch.setattr(crossing, "REPLY_POLLING", replies)

    async def one() -> int:
        return 1

    with offloop.LoopThread(name="tuned") as lt:
        selector = lt.loop._selector  # type: ignore[union-attr]
        deadline = time.monotonic() + WAIT
        while "comparing" in repr(replies) or "comparing" in repr(selector.polling):
            assert lt.call(one) == 1
            assert time.monotonic() < deadline, f"never settled: {replies}, {selector.polling}"


class _Selector:
    """A selector whose polls find nothing and whose blocking wait finds an event."""

    def __init__(self) -> None:
        self.blocking_waits = 0

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is None:
            self.blocking_waits += 1
            return [("event", 1)]
        return []


@pytest.mark.parametrize("polls", [True, False])
def test_a_process_pool_manager_polls_only_while_its_tuner_says_so(polls: bool) -> None:
    from offloop._process import manager

    tuner = SpinTuner(manager.SPIN_WINDOW)
    if not polls:
        tuner.window = 0.0
    selector = _Selector()
    events: list[Any] = manager._poll_then_wait(selector, tuner)  # type: ignore[arg-type]
    assert events == [("event", 1)]
    assert selector.blocking_waits == 1
    assert [len(gaps) for gaps in tuner._gaps] == ([0, 1] if polls else [1, 0])


def test_wake_ups_longer_than_the_gap_limit_count_against_not_polling() -> None:
    # Where a thread's wake-up alone takes longer than GAP_LIMIT, every gap
    # without the poll is long while the poll catches each call at once. A
    # long gap is a sample of the mode it was measured in: were it left out,
    # the comparison would wait for that mode's samples forever and the pool
    # would never poll again, on the very machine where polling pays most.
    tuner = SpinTuner(SPIN_WINDOW)
    for _ in range(10 * SAMPLES):
        window = tuner.window
        tuner.record(20e-6 if window else 2 * GAP_LIMIT, window)
        if "comparing" not in repr(tuner):
            break
    assert repr(tuner) == f"<SpinTuner polling, for {SETTLE} more gaps>"


def test_callers_that_never_make_round_trips_stop_the_poll() -> None:
    # A caller that does other work between its calls leaves every gap long,
    # with the poll or without: the poll never catches a call, only burns
    # its window each time, so the pool stops polling.
    tuner = SpinTuner(SPIN_WINDOW)
    for _ in range(10 * SAMPLES):
        tuner.record(GAP_LIMIT * 2, tuner.window)
        if "comparing" not in repr(tuner):
            break
    assert repr(tuner) == f"<SpinTuner not polling, for {SETTLE} more gaps>"

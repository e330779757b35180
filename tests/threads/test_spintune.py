"""The measured choice of whether a pool's idle threads poll before they sleep."""

from __future__ import annotations

import asyncio
import threading

import pytest

import offloop
from offloop._threads.spintune import (
    GAP_LIMIT,
    SAMPLES,
    SETTLE,
    SPIN_WINDOW,
    TURN,
    SpinTuner,
)
from tests.helpers import WAIT, await_until


def _compare(tuner: SpinTuner, *, polling: float, not_polling: float) -> None:
    # Feeds one whole comparison: each worker reports the window it used.
    while True:
        window = tuner.window
        tuner.record(polling if window else not_polling, window)
        if repr(tuner).endswith(f"for {SETTLE} more gaps>"):
            return


def test_it_starts_polling_and_alternates_turns_while_comparing() -> None:
    tuner = SpinTuner()
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
    tuner = SpinTuner()
    _compare(tuner, polling=polling, not_polling=not_polling)
    assert tuner.window == chosen
    for _ in range(SETTLE - 1):  # settled: the other mode's gaps change nothing
        tuner.record(1e-6, tuner.window)
        assert tuner.window == chosen


def test_it_compares_again_after_settle_gaps_and_follows_a_change() -> None:
    tuner = SpinTuner()
    _compare(tuner, polling=50e-6, not_polling=30e-6)
    assert tuner.window == 0.0
    for _ in range(SETTLE):
        tuner.record(30e-6, 0.0)
    assert "comparing" in repr(tuner)
    _compare(tuner, polling=20e-6, not_polling=60e-6)  # wake-ups got expensive
    assert tuner.window == SPIN_WINDOW


def test_gaps_of_an_ended_mode_are_not_counted() -> None:
    tuner = SpinTuner()
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


def test_wake_ups_longer_than_the_gap_limit_count_against_not_polling() -> None:
    # Where a thread's wake-up alone takes longer than GAP_LIMIT, every gap
    # without the poll is long while the poll catches each call at once. A
    # long gap is a sample of the mode it was measured in: were it left out,
    # the comparison would wait for that mode's samples forever and the pool
    # would never poll again, on the very machine where polling pays most.
    tuner = SpinTuner()
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
    tuner = SpinTuner()
    for _ in range(10 * SAMPLES):
        tuner.record(GAP_LIMIT * 2, tuner.window)
        if "comparing" not in repr(tuner):
            break
    assert repr(tuner) == f"<SpinTuner not polling, for {SETTLE} more gaps>"

"""What DaskPool's client thread does to leave the GIL to the caller's loop (no cluster needed).

The loop lag itself is measured by ``benchmarks/bench_process.py``; these tests
pin the mechanisms: when the pacer hands the GIL over, and that the task's
function is pickled by value once.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import pytest

from offloop._process import daskargs
from offloop._process.clientloop import PACE_SLEEP, PACE_SLICE, GILPacer
from offloop._process.pickling import OK

cloudpickle = pytest.importorskip("cloudpickle")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # clientloop reads both through the time module, at each call.
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    return fake


def test_the_pacer_sleeps_once_per_slice_of_back_to_back_submissions(clock: FakeClock) -> None:
    pacer = GILPacer()
    step = PACE_SLICE * 0.4  # each submission's work
    for _ in range(3):  # the first slice: no hand-over yet
        pacer.pace()
        clock.now += step
    assert clock.sleeps == []
    pacer.pace()  # past one slice of work without a rest
    assert clock.sleeps == [PACE_SLEEP]
    for _ in range(6):  # two more slices
        clock.now += step
        pacer.pace()
    assert clock.sleeps == [PACE_SLEEP] * 3


def test_the_pacer_starts_over_after_the_thread_rested(clock: FakeClock) -> None:
    pacer = GILPacer()
    for _ in range(40):
        pacer.pace()
        # Each pause longer than a slice: the thread was idle (its loop
        # waited), so no submission storm, and nothing to hand over.
        clock.now += PACE_SLICE * 1.5
    assert clock.sleeps == []


def test_the_task_function_is_pickled_by_value_once(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    real_dumps = cloudpickle.dumps

    def counting_dumps(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        made.append(obj)
        return real_dumps(obj, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(cloudpickle, "dumps", counting_dumps)
    runner = daskargs.PickledOnce(daskargs.make_runner())
    first, second = pickle.dumps(runner), pickle.dumps(runner)
    assert first == second
    assert len(made) == 1  # the bytes are made once, then copied
    # What the worker gets back is the plain function, by value: it runs a call.
    fn = pickle.loads(second)
    data = pickle.dumps((divmod, (7, None), {}))
    assert fn(data, (1,), 2) == (OK, (3, 1))
    assert runner(data, (1,), 2) == (OK, (3, 1))

"""Shared benchmark machinery: interleaved rounds, medians and ratio tables.

Benchmark machines are often shared and noisy, so absolute times mean little. Every case of
a benchmark runs in the same process, round after round in interleaved order,
and the table reports each case's median and its ratio to the others.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from offloop._core.spin import SpinTuner

ROUNDS = int(os.environ.get("OFFLOOP_BENCH_ROUNDS", "5"))


@dataclass
class Result:
    """The per-round figures of one case (seconds per operation, or any unit)."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def interleaved(
    cases: dict[str, Callable[[], float]], rounds: int = ROUNDS, *, warmup: bool = True
) -> dict[str, Result]:
    """Run every case once per round, in rotating order, and collect its figures.

    Each case is a callable returning one figure (e.g. seconds per call).
    """
    names = list(cases)
    results = {name: Result(name) for name in names}
    if warmup:
        for name in names:
            cases[name]()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            results[name].samples.append(cases[name]())
    return results


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def table(
    title: str,
    results: dict[str, Result],
    *,
    reference: str,
    unit: Callable[[float], str] = fmt_time,
) -> None:
    """Print medians and ratios against ``reference`` (ratio > 1: reference is faster)."""
    ref = results[reference].median
    print(f"\n## {title}  (median of {len(results[reference].samples)} interleaved rounds)")
    print(f"{'case':<44} {'median':>12}  {'x ' + reference:>14}")
    for name, res in sorted(results.items(), key=lambda kv: kv[1].median):
        ratio = res.median / ref if ref else float("nan")
        shown = f"{ratio:13.2f}x" if math.isfinite(ratio) and ratio > 0 else f"{'-':>14}"
        print(f"{name:<44} {unit(res.median):>12}  {shown}")
    sys.stdout.flush()


def check(label: str, ok: bool, detail: str) -> bool:
    """Print one target line: MET or MISSED with the measured figure."""
    print(f"target {'MET   ' if ok else 'MISSED'} {label}: {detail}")
    return ok


def ratio(results: dict[str, Result], slow: str, fast: str) -> float:
    """How many times ``fast`` beats ``slow`` (median over median)."""
    return results[slow].median / results[fast].median


def round_ratios(results: dict[str, Result], slow: str, fast: str) -> str:
    """The same ratio round by round (min / median / max): how much the noise moves it.

    Interleaved rounds pair up, so a machine that slows down for a while slows
    both cases of a round; the spread shows what one run's median can be off by.
    """
    per_round = sorted(
        s / f for s, f in zip(results[slow].samples, results[fast].samples, strict=True)
    )
    return (
        f"per round min {per_round[0]:.2f}x / median {statistics.median(per_round):.2f}x / "
        f"max {per_round[-1]:.2f}x"
    )


def percentiles(values: Sequence[float], ps: Sequence[float] = (50, 99)) -> list[float]:
    data = sorted(values)
    out = []
    for p in ps:
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        out.append(data[k])
    return out


class FixedPolling(SpinTuner):
    """A polling choice pinned to one mode, to measure what a SpinTuner chooses between."""

    def record(self, gap: float, window: float) -> None:
        pass


def check_polling_choice(
    label: str, results: dict[str, Result], *, measured: str, always: str, never: str, chosen: str
) -> bool:
    """The target that a measured polling choice is as fast as the better pinned one (1.05x)."""
    m = results[measured].median / min(results[always].median, results[never].median)
    return check(
        f"{label} as fast as the better pinned one (<= 1.05x)",
        m <= 1.05,
        f"{m:.2f}x ({chosen}; always polling / never {ratio(results, always, never):.2f}x)",
    )

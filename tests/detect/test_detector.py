"""The blocking detector names the line that blocks a real loop.

Every block here lasts 0.3 s against a 0.05 s threshold (or waits for the
detector itself), so the assertions are about *which line* was named, never
about how long anything took.
"""

# The tests block their own loop on purpose: that is what is being detected.
# ruff: noqa: ASYNC251

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest

import offloop
from offloop import BlockEvent, BlockingDetector, BlockSite, DetectorState, detect_blocking
from tests.conftest import run_on
from tests.helpers import bounded, line_of, wait_until

HERE = Path(__file__)
BLOCK = 0.3
THRESHOLD = 0.05


def state(det: BlockingDetector) -> DetectorState:
    return det.state  # a call, so mypy does not keep a narrowed state across start()


def only_site(det: BlockingDetector) -> BlockSite:
    sites = det.report()
    assert len(sites) == 1, f"expected one blocking site, got {sites}"
    return sites[0]


def pbkdf2_iterations(seconds: float) -> int:
    """Iterations of pbkdf2_hmac that take about ``seconds`` on the machine running the test."""
    n = 20_000
    start = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", n)
    return max(n, int(n * seconds / (time.perf_counter() - start)))


# -- naming the line ------------------------------------------------------------------------


@bounded(10)
async def test_names_the_line_of_time_sleep_in_a_coroutine() -> None:
    events: list[BlockEvent] = []
    async with detect_blocking(threshold=THRESHOLD, on_block=events.append) as det:
        time.sleep(BLOCK)  # BLOCK:sleep
        await asyncio.sleep(0)
    site = only_site(det)
    assert (site.file, site.line) == (__file__, line_of("BLOCK:sleep", HERE))
    assert site.function == "test_names_the_line_of_time_sleep_in_a_coroutine"
    assert site.count == 1
    assert site.max_ms >= THRESHOLD * 1e3
    assert site.total_ms == site.max_ms
    assert [(e.file, e.line, e.ongoing) for e in events] == [(site.file, site.line, False)]
    assert events[0].stack[-1].startswith(f"{__file__}:{site.line} in ")
    assert "time.sleep(BLOCK)" in events[0].stack[-1]
    assert str(site.line) in str(events[0])


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_interval_defaults_to_a_quarter_of_the_threshold_and_can_be_set() -> None:
    async with detect_blocking(threshold=THRESHOLD) as default:
        assert default.interval == THRESHOLD / 4
    async with detect_blocking(threshold=THRESHOLD, interval=THRESHOLD / 10) as det:
        assert det.interval == THRESHOLD / 10
        time.sleep(BLOCK)  # BLOCK:interval
        await asyncio.sleep(0)
    site = only_site(det)
    assert (site.file, site.line) == (__file__, line_of("BLOCK:interval", HERE))


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_names_the_line_of_a_pure_python_cpu_loop() -> None:
    end = time.monotonic() + BLOCK
    async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
        spins = sum(1 for _ in iter(lambda: time.monotonic() < end, False))  # BLOCK:cpu
        await asyncio.sleep(0)
    assert spins > 0
    site = only_site(det)
    assert (site.file, site.line) == (__file__, line_of("BLOCK:cpu", HERE))


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_names_the_line_of_a_c_extension_call() -> None:
    iterations = pbkdf2_iterations(BLOCK)
    async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", iterations)  # BLOCK:pbkdf2
        await asyncio.sleep(0)
    site = only_site(det)
    assert (site.file, site.line) == (__file__, line_of("BLOCK:pbkdf2", HERE))
    assert "pbkdf2_hmac" in site.stack[-1]


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_names_the_deepest_user_frame_in_another_module(tmp_path: Path) -> None:
    helper = tmp_path / f"slow_helpers_{uuid.uuid4().hex}.py"
    helper.write_text(
        textwrap.dedent(
            """\
            import time


            def load_config(seconds):
                return read_slowly(seconds)


            def read_slowly(seconds):
                time.sleep(seconds)  # BLOCK:helper
            """
        )
    )
    module = import_file(helper)
    async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
        module.load_config(BLOCK)  # BLOCK:calls-helper
        await asyncio.sleep(0)
    site = only_site(det)
    assert (site.file, site.line, site.function) == (
        str(helper),
        line_of("BLOCK:helper", helper),
        "read_slowly",
    )
    # The stack shows the chain, outermost first: this test, then the helpers.
    chain = [entry.split(" in ")[0] for entry in site.stack[-3:]]
    assert chain == [
        f"{__file__}:{line_of('BLOCK:calls-helper', HERE)}",
        f"{helper}:5",
        f"{helper}:{line_of('BLOCK:helper', helper)}",
    ]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_sync_with_that_ends_inside_the_block_still_records_it() -> None:
    with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
        time.sleep(BLOCK)  # BLOCK:inside-with
    # stop() ran on the loop's thread before the loop came back.
    assert det.state is DetectorState.STOPPED
    site = only_site(det)
    assert site.line == line_of("BLOCK:inside-with", HERE)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_blocks_at_several_sites_are_counted_and_sorted() -> None:
    async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
        for _ in range(2):
            time.sleep(BLOCK)  # BLOCK:twice
            await asyncio.sleep(0)
        time.sleep(BLOCK)  # BLOCK:once
        await asyncio.sleep(0)
    assert det.blocks == 3
    sites = det.report()
    assert [(s.line, s.count) for s in sites] == [
        (line_of("BLOCK:twice", HERE), 2),
        (line_of("BLOCK:once", HERE), 1),
    ]
    assert sites[0].total_ms >= sites[0].max_ms
    assert "3 block(s) at 2 site(s)" in repr(det)


# -- a clean loop, callbacks, long blocks --------------------------------------------------


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_loop_whose_blocking_work_is_offloaded_reports_nothing() -> None:
    events: list[BlockEvent] = []

    async def chatter() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    # A generous threshold: a busy machine may delay a healthy loop a little.
    async with detect_blocking(threshold=0.25, on_block=events.append) as det:
        await asyncio.gather(offloop.to_thread(time.sleep, BLOCK), *(chatter() for _ in range(50)))
    assert det.report() == []
    assert events == []
    assert det.blocks == 0


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_on_block_runs_on_the_daemon_monitor_thread() -> None:
    seen: list[tuple[str, bool]] = []

    def on_block(event: BlockEvent) -> None:
        thread = threading.current_thread()
        seen.append((thread.name, thread.daemon))

    async with detect_blocking(threshold=THRESHOLD, on_block=on_block) as det:
        assert det.name.startswith("offloop-detector-")
        monitors = [t for t in threading.enumerate() if t.name == det.name]
        assert len(monitors) == 1
        assert monitors[0].daemon
        time.sleep(BLOCK)
        await asyncio.sleep(0)
    assert seen == [(det.name, True)]
    assert not monitors[0].is_alive()  # stopped on exit of the context


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_an_exception_in_on_block_is_logged_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_block(event: BlockEvent) -> None:
        raise RuntimeError("the metrics backend is down")

    with caplog.at_level(logging.ERROR, logger="offloop.detector"):
        async with detect_blocking(threshold=THRESHOLD, on_block=on_block) as det:
            for _ in range(2):
                time.sleep(BLOCK)  # BLOCK:raising-callback
                await asyncio.sleep(0)
    assert [(s.line, s.count) for s in det.report()] == [
        (line_of("BLOCK:raising-callback", HERE), 2)
    ]
    errors = [r for r in caplog.records if "on_block raised" in r.getMessage()]
    assert len(errors) == 2
    assert errors[0].exc_info is not None
    assert "metrics backend" in str(errors[0].exc_info[1])


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_the_default_on_block_logs_the_site_and_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="offloop.detector"):
        async with detect_blocking(threshold=THRESHOLD):
            time.sleep(BLOCK)  # BLOCK:logged
            await asyncio.sleep(0)
    (record,) = [r for r in caplog.records if r.name == "offloop.detector"]
    text = record.getMessage()
    assert f"{__file__}:{line_of('BLOCK:logged', HERE)} in " in text.splitlines()[0]
    assert "Stack of the loop thread" in text
    assert "time.sleep(BLOCK)" in text.splitlines()[-1]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_block_that_goes_on_is_reported_while_it_lasts() -> None:
    events: list[BlockEvent] = []
    noticed = threading.Event()

    def on_block(event: BlockEvent) -> None:
        events.append(event)
        if event.ongoing:
            noticed.set()

    # The loop stays blocked until the detector has said so: no timing involved.
    async with detect_blocking(threshold=0.02, on_block=on_block) as det:
        assert noticed.wait(10)  # BLOCK:stuck
        await asyncio.sleep(0)
    line = line_of("BLOCK:stuck", HERE)
    assert [(e.line, e.ongoing) for e in events] == [(line, True), (line, False)]
    assert "still blocked" in str(events[0])
    assert events[1].duration_ms >= events[0].duration_ms
    assert det.blocks == 1  # the early notice is not a second block


# -- loops in other threads, uvloop, several loops -----------------------------------------


async def block_remotely() -> None:
    time.sleep(BLOCK)  # BLOCK:remote


def start_loop_thread(kind: str) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop: asyncio.AbstractEventLoop
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"test-loop-{kind}")
    thread.start()
    wait_until(loop.is_running, what="the loop to run")
    return loop, thread


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    assert not thread.is_alive()
    loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_attaches_from_another_thread_to_a_running_loop(kind: str) -> None:
    loop, thread = start_loop_thread(kind)
    try:
        det = BlockingDetector(loop, threshold=THRESHOLD, on_block=lambda e: None).start()
        asyncio.run_coroutine_threadsafe(block_remotely(), loop).result(10)
        wait_until(lambda: det.blocks >= 1, what="the block to be recorded")
        det.stop()
    finally:
        stop_loop_thread(loop, thread)
    site = only_site(det)
    assert (site.line, site.function) == (line_of("BLOCK:remote", HERE), "block_remotely")


def block_in_thread_a() -> None:
    time.sleep(BLOCK)  # BLOCK:thread-a


def block_in_thread_b() -> None:
    end = time.monotonic() + BLOCK
    sum(1 for _ in iter(lambda: time.monotonic() < end, False))  # BLOCK:thread-b


def test_one_detector_per_loop_in_several_threads_at_once() -> None:
    both_watching = threading.Barrier(2, timeout=10)
    reports: dict[str, list[BlockSite]] = {}
    failures: list[BaseException] = []

    def run(kind: str, block: object) -> None:
        async def main() -> None:
            async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as det:
                both_watching.wait()  # both loops block at the same time
                assert callable(block)
                block()
                await asyncio.sleep(0)
            reports[kind] = det.report()

        try:
            run_on(kind, main())
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=run, args=("asyncio", block_in_thread_a)),
        threading.Thread(target=run, args=("uvloop", block_in_thread_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not failures
    assert [(s.line, s.function) for s in reports["asyncio"]] == [
        (line_of("BLOCK:thread-a", HERE), "block_in_thread_a")
    ]
    # Python 3.10 code objects have no qualified name: the bare name of the
    # innermost frame there, the generator expression or the lambda it calls.
    outer = {"block_in_thread_b"} if sys.version_info >= (3, 11) else {"<genexpr>", "<lambda>"}
    assert [(s.line, s.function.split(".")[0] in outer) for s in reports["uvloop"]] == [
        (line_of("BLOCK:thread-b", HERE), True)
    ]


# -- lifecycle and bad input ---------------------------------------------------------------


@pytest.mark.loops("asyncio")
async def test_lifecycle_has_a_message_for_every_illegal_transition() -> None:
    det = BlockingDetector(threshold=THRESHOLD, on_block=lambda e: None)
    assert state(det) is DetectorState.NEW
    assert repr(det) == (
        f"<BlockingDetector {det.name!r} new: threshold 50 ms, 0 block(s) at 0 site(s)>"
    )
    assert det.interval == THRESHOLD / 4
    assert det.loop is asyncio.get_running_loop()
    det.start()
    assert state(det) is DetectorState.RUNNING
    with pytest.raises(RuntimeError, match="is already running; stop\\(\\) it first") as running:
        det.start()
    assert repr(det) in str(running.value)
    det.stop()
    det.stop()  # idempotent
    assert state(det) is DetectorState.STOPPED
    with pytest.raises(RuntimeError, match="was stopped and cannot start again") as stopped:
        async with det:
            pass
    assert "'offloop-detector-" in str(stopped.value)
    # A new detector works after all that.
    async with detect_blocking(threshold=THRESHOLD, on_block=lambda e: None) as again:
        time.sleep(BLOCK)
        await asyncio.sleep(0)
    assert again.blocks == 1


def test_a_detector_never_started_can_be_stopped() -> None:
    loop = asyncio.new_event_loop()
    try:
        det = BlockingDetector(loop)
        det.stop()
        assert det.state is DetectorState.STOPPED
        with pytest.raises(RuntimeError, match="cannot start again"):
            det.start()
    finally:
        loop.close()


def test_detect_blocking_outside_a_running_loop_says_what_to_use() -> None:
    with pytest.raises(
        RuntimeError, match=r"inside a running event loop.*BlockingDetector\(loop\)"
    ):
        detect_blocking()
    with pytest.raises(RuntimeError, match=r"Pass the loop to watch, BlockingDetector\(loop\)"):
        BlockingDetector()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": 0}, ValueError, "threshold to be a positive number of seconds, got 0"),
        ({"threshold": -1.0}, ValueError, "threshold to be a positive"),
        ({"threshold": float("nan")}, ValueError, "threshold to be a positive"),
        ({"threshold": "0.1"}, TypeError, "threshold as a number of seconds"),
        ({"threshold": True}, TypeError, "threshold as a number of seconds"),
        ({"interval": 0.0}, ValueError, "interval to be a positive"),
        ({"on_block": 42}, TypeError, "on_block to be a function taking a BlockEvent"),
        ({"loop": "loop"}, TypeError, "needs an asyncio event loop as loop"),
    ],
)
def test_bad_arguments_are_rejected_with_the_argument_named(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    loop = asyncio.new_event_loop()
    try:
        args: dict[str, object] = {"loop": loop, **kwargs}
        with pytest.raises(error, match=match):
            BlockingDetector(**args)  # type: ignore[arg-type]
        BlockingDetector(loop, threshold=THRESHOLD).start().stop()  # the next one works
    finally:
        loop.close()


def test_a_closed_loop_cannot_be_watched() -> None:
    loop = asyncio.new_event_loop()
    det = BlockingDetector(loop)
    loop.close()
    with pytest.raises(RuntimeError, match="its event loop is closed") as info:
        det.start()
    assert repr(det) in str(info.value)


def test_the_detector_stops_by_itself_when_its_loop_closes() -> None:
    loop = asyncio.new_event_loop()
    det = BlockingDetector(loop, threshold=THRESHOLD, on_block=lambda e: None).start()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    wait_until(lambda: det.state is DetectorState.STOPPED, what="the detector to stop")
    wait_until(
        lambda: all(t.name != det.name for t in threading.enumerate()),
        what="the monitor thread to exit",
    )


def test_a_forgotten_detector_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    script = tmp_path / "forgotten.py"
    script.write_text(
        textwrap.dedent(
            """\
            import asyncio
            import threading
            import offloop

            loop = asyncio.new_event_loop()
            det = offloop.BlockingDetector(loop, threshold=0.05).start()
            loop.run_until_complete(asyncio.sleep(0.01))
            print([t.name for t in threading.enumerate() if t.name == det.name], flush=True)
            # neither stopped nor closed: the daemon monitor must not hold up exit
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("['offloop-detector-")

"""How a stack becomes a site, and how blocks add up into the report."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._detect.report import (
    MAX_SITES_PER_BLOCK,
    BlockEvent,
    Sample,
    SampleTally,
    SiteTable,
    is_library_file,
    is_offloop_file,
    make_event,
    sample_thread,
)
from tests.helpers import wait_until

USER = str(Path(__file__).parent / "app.py")


@pytest.mark.parametrize(
    ("filename", "library"),
    [
        (asyncio.__file__, True),  # the standard library
        (pytest.__file__, True),  # site-packages
        (offloop.__file__, True),  # offloop's own frames are never the user's to fix
        ("<frozen runpy>", True),
        (__file__, False),
        (USER, False),
        ("<string>", False),  # exec'd code is the user's
        ("/srv/app/venv/lib/python3.11/site-packages/requests/api.py", True),
    ],
)
def test_library_files_are_told_apart_from_user_code(filename: str, library: bool) -> None:
    assert is_library_file(filename) is library


def test_a_sample_names_the_innermost_user_frame() -> None:
    ready = threading.Event()
    release = threading.Event()

    def user_code() -> None:
        ready.set()
        release.wait(10)  # SAMPLED

    thread = threading.Thread(target=user_code)
    thread.start()
    try:
        assert ready.wait(10)
        sample = sample_thread(thread.ident)
    finally:
        release.set()
        thread.join(10)
    assert sample is not None
    line = next(
        n
        for n, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if text.endswith("# SAMPLED")
    )
    # Innermost is threading.Event.wait (stdlib); the site is the user's frame.
    assert is_library_file(sample.frames[-1][0])
    # Python 3.10 code objects have no qualified name: the bare name there.
    name = user_code.__qualname__ if sys.version_info >= (3, 11) else user_code.__name__
    assert sample.site == (__file__, line, name)
    assert sample.frames[0][0] == threading.__file__  # outermost first


def test_a_stack_of_library_code_only_falls_back_to_the_innermost_frame() -> None:
    # The thread runs Event.wait straight from threading: from its start until
    # release, every frame of its stack is library code.
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(10,))
    thread.start()  # returns once the thread runs (in threading's bootstrap)
    try:
        sample = sample_thread(thread.ident)
    finally:
        release.set()
        thread.join(10)
    assert sample is not None
    assert all(is_library_file(file) for file, _, _ in sample.frames)
    assert sample.site == sample.frames[-1]  # the innermost frame
    assert sample.site[0] == threading.__file__


OFFLOOP_DIR = os.path.dirname(offloop.__file__)


def test_a_stack_whose_innermost_frames_are_offloop_s_names_the_first_frame_outside_it() -> None:
    # The user's code installed as a package (site-packages: library code too)
    # calls offloop, which waits on a lock another thread holds. No frame is
    # the user's own by path, and offloop's frame is never the one to fix.
    user_pkg = "/srv/app/venv/lib/python3.11/site-packages/userapp/jobs.py"
    in_offloop = os.path.join(OFFLOOP_DIR, "_simulated_wait.py")
    namespace: dict[str, Any] = {}
    exec(compile("def wait(lock):\n    lock.acquire(timeout=10)\n", in_offloop, "exec"), namespace)
    exec(compile("def run(wait, lock):\n    wait(lock)\n", user_pkg, "exec"), namespace)
    lock = threading.Lock()
    lock.acquire()  # held by this thread: the sampled one waits on it
    thread = threading.Thread(target=namespace["run"], args=(namespace["wait"], lock))
    thread.start()
    try:

        def waiting() -> bool:
            frame = sys._current_frames().get(thread.ident or -1)
            return frame is not None and frame.f_code.co_filename == in_offloop

        wait_until(waiting, what="the thread to wait on the lock")
        sample = sample_thread(thread.ident)
    finally:
        lock.release()
        thread.join(10)
    assert sample is not None
    assert sample.frames[-2:] == ((user_pkg, 2, "run"), (in_offloop, 2, "wait"))
    assert sample.site == (user_pkg, 2, "run")
    assert [is_offloop_file(f) for f in (in_offloop, offloop.__file__)] == [True, True]
    assert [is_offloop_file(f) for f in (user_pkg, threading.__file__)] == [False, False]


def test_sampling_an_unknown_or_missing_thread_gives_nothing() -> None:
    assert sample_thread(None) is None
    assert sample_thread(-1) is None


def test_the_site_seen_most_often_names_the_event() -> None:
    a, b = (USER, 10, "first"), (USER, 20, "second")
    outer = ("/nonexistent/python3.11/asyncio/events.py", 80, "Handle._run")
    samples = [Sample(a, (outer, a)), Sample(b, (outer, b)), Sample(b, (outer, b))]
    event = make_event(samples, 0.25, ongoing=False)
    assert (event.file, event.line, event.function) == b
    assert event.samples == 3
    assert event.duration_ms == pytest.approx(250)
    assert event.stack == (f"{outer[0]}:80 in Handle._run", f"{USER}:20 in second")


def test_a_block_without_samples_has_an_unknown_site() -> None:
    event = make_event([], 0.2, ongoing=True)
    assert (event.file, event.line, event.stack, event.ongoing) == ("<unknown>", 0, (), True)


def test_the_table_adds_up_blocks_by_site_most_time_first() -> None:
    table = SiteTable()

    def event(line: int, ms: float, *, ongoing: bool = False) -> BlockEvent:
        return BlockEvent(USER, line, "handler", ms, (f"stack of {ms}",), 1, ongoing)

    for e in (event(1, 100), event(2, 150), event(1, 120), event(2, 900, ongoing=True)):
        table.add(e)
    sites = table.report()
    assert [(s.line, s.count, s.total_ms, s.max_ms) for s in sites] == [
        (1, 2, 220, 120),
        (2, 1, 150, 150),
    ]
    assert sites[0].stack == ("stack of 120",)  # the longest block's stack
    assert table.blocks == 3
    assert len(table) == 2
    as_json = json.loads(json.dumps(sites[0].to_dict()))
    assert as_json == {
        "file": USER,
        "line": 1,
        "function": "handler",
        "count": 2,
        "total_ms": 220,
        "max_ms": 120,
        "stack": ["stack of 120"],
    }
    assert str(sites[0]) == f"{USER}:1 in handler: 2 block(s), 220 ms in total, longest 120 ms"


def test_a_long_block_keeps_one_stack_per_site_for_a_bounded_number_of_sites() -> None:
    outer = ("/nonexistent/python3.11/asyncio/events.py", 80, "Handle._run")
    stuck = (USER, 7, "serve_forever")
    tally = SampleTally()
    # A block that never ends is sampled every interval: memory must not grow
    # with the number of samples, nor with the number of lines it visits.
    for n in range(10_000):
        tally.add(Sample(stuck, (outer, (USER, n, "caller"), stuck)))
    for line in range(1000, 1000 + 2 * MAX_SITES_PER_BLOCK):
        site = (USER, line, "elsewhere")
        tally.add(Sample(site, (outer, site)))
    assert tally.total == 10_000 + 2 * MAX_SITES_PER_BLOCK
    assert len(tally.counts) == len(tally.stacks) == MAX_SITES_PER_BLOCK
    event = make_event(tally, 60.0, ongoing=True)
    assert (event.file, event.line, event.function) == stuck
    assert event.samples == tally.total
    assert event.stack[-2] == f"{USER}:0 in caller"  # the first stack seen at the site

"""LoopService (``isolate="loop"``): what ``kill()`` reports is its own loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from offloop._services.functions import LoopService
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import bounded


@pytest.fixture
def namesake() -> Iterator[threading.Thread]:
    """A thread of the program's own, named as the loop thread of a service 'job' is."""
    release = threading.Event()
    thread = threading.Thread(
        target=release.wait, args=(WAIT,), name="offloop-loop-service-job", daemon=True
    )
    thread.start()
    yield thread
    release.set()
    thread.join(WAIT)
    assert not thread.is_alive()


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_kill_after_the_run_ended_reports_no_thread_of_the_same_name(
    namesake: threading.Thread,
) -> None:
    async def job() -> None:
        return None

    svc = LoopService(job, "job")
    await svc.start()
    await asyncio.wait_for(svc.wait(), WAIT)  # its loop thread is joined by then
    assert namesake.is_alive()
    assert svc.kill() == []


@pytest.mark.loops("asyncio")
@bounded(20)
async def test_kill_reports_only_its_own_stuck_loop_thread(namesake: threading.Thread) -> None:
    blocking = threading.Event()
    release = threading.Event()

    async def job() -> None:
        blocking.set()
        release.wait(WAIT)  # blocks its own loop: cancellation cannot reach it

    svc = LoopService(job, "job")
    await svc.start()
    try:
        assert await asyncio.to_thread(blocking.wait, WAIT), "the job never started"
        reports = svc.kill()
        assert len(reports) == 1, reports
        assert reports[0].startswith("thread 'offloop-loop-service-job', currently at:")
        assert "in job\n    release.wait(WAIT)" in reports[0]
    finally:
        release.set()
    # Released, the job returns, and its loop thread closes and is joined.
    task = svc._task
    assert task is not None
    await asyncio.wait_for(asyncio.wait({task}), WAIT)

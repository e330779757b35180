"""A run kill() abandoned has its end logged; a task that ends when killed is not abandoned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import pytest

from offloop import Supervisor
from tests.helpers import QUICK_WAIT, await_until, bounded

GRACE = 0.05


class Deaf:
    """A job that ignores its stop (its token, or its cancellations) until released."""

    def __init__(self, *, crash: bool) -> None:
        self.crash = crash
        self.entered = threading.Event()
        self.release = threading.Event()
        self.task_release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _end(self) -> None:
        if self.crash:
            raise ValueError("late crash of the abandoned run")

    def sync_job(self) -> None:
        self.entered.set()
        self.release.wait(QUICK_WAIT)  # a blocking call that does not look at the token
        self._end()

    async def async_job(self) -> None:
        self.entered.set()
        while not self.task_release.done():
            with contextlib.suppress(asyncio.CancelledError):  # a careless retry loop
                await asyncio.shield(self.task_release)
        self._end()

    def set_free(self) -> None:
        self.release.set()
        if not self.task_release.done():
            self.task_release.set_result(None)


def thread_service(sv: Supervisor, deaf: Deaf) -> str:
    sv.service(name="job")(deaf.sync_job)
    return "thread 'offloop-service-job'"


def task_service(sv: Supervisor, deaf: Deaf) -> str:
    sv.service(name="job")(deaf.async_job)
    return "task 'offloop-service-job'"


def every_sync(sv: Supervisor, deaf: Deaf) -> str:
    sv.every(3600, name="job")(deaf.sync_job)
    return "thread 'offloop-service-job'"


def every_async(sv: Supervisor, deaf: Deaf) -> str:
    sv.every(3600, name="job")(deaf.async_job)
    return "task 'offloop-run-job'"


def late_ends(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "ended later" in r.getMessage()]


@pytest.mark.parametrize(
    "add",
    [thread_service, task_service, every_sync, every_async],
    ids=["thread", "task", "every-def", "every-async"],
)
@pytest.mark.parametrize("crash", [True, False], ids=["crash", "return"])
@pytest.mark.loops("asyncio")
@bounded(10)
async def test_the_end_of_an_abandoned_run_is_logged(
    add: Callable[[Supervisor, Deaf], str], crash: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # kill() ends the run it abandons (a cascade may start the service again at
    # once), so the thread or task, if it ever ends, ends nobody's run: its
    # outcome must still reach the log, or a late crash is silent.
    caplog.set_level(logging.INFO, logger="offloop")
    deaf = Deaf(crash=crash)
    sv = Supervisor(name="sv", grace=GRACE)
    what = add(sv, deaf)
    try:
        async with sv:
            await asyncio.to_thread(deaf.entered.wait, QUICK_WAIT)
        assert any("abandoned" in m for m in caplog.messages), caplog.messages
        assert late_ends(caplog) == []  # still running: nothing to report yet
    finally:
        deaf.set_free()
    await await_until(lambda: bool(late_ends(caplog)), QUICK_WAIT, "the late end in the log")
    [record] = late_ends(caplog)
    message = record.getMessage()
    assert message.startswith(f"sv: service 'job': its abandoned {what} ended later"), message
    if crash:
        assert record.levelno == logging.ERROR
        assert "ValueError('late crash of the abandoned run')" in message
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], ValueError)
    else:
        assert record.levelno == logging.WARNING
        assert message.endswith("ended later: it returned"), message
        assert record.exc_info is None
    # The supervisor had stopped long before: its status is not the run's to change.
    assert sv.status()["job"].state == "stopped"
    assert sv.status()["job"].last_error is None
    await await_until(
        lambda: not [t for t in threading.enumerate() if t.name.endswith("-job")],
        QUICK_WAIT,
        "the released thread to end",
    )


class Sulky:
    """Swallows the first cancellation (the polite stop), honours the second (the kill)."""

    def __init__(self) -> None:
        self.swallowed = 0
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def job(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
        try:
            await asyncio.sleep(3600)  # the second cancellation, kill()'s, ends it
        finally:
            self.ended.set_result(None)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_task_that_honours_the_kill_is_not_reported_abandoned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    sulky = Sulky()
    sv = Supervisor(name="sv", grace=GRACE)
    sv.service(name="sulky")(sulky.job)
    async with sv:
        pass
    assert sulky.swallowed == 1
    assert sulky.ended.done()  # it ended in the step after kill()'s cancel
    messages = caplog.messages
    assert "sv: service 'sulky' did not stop within the grace period; killed it" in messages
    assert not [m for m in messages if "abandoned" in m], messages
    assert sv.status()["sulky"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_task_that_ignores_the_kill_too_is_reported_abandoned_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    deaf = Deaf(crash=False)
    sv = Supervisor(name="sv", grace=GRACE)
    sv.service(name="job")(deaf.async_job)
    try:
        async with sv:
            await asyncio.to_thread(deaf.entered.wait, QUICK_WAIT)
        # Judged once the task had the step in which it could honour kill()'s cancel.
        [report] = [m for m in caplog.messages if "abandoned" in m]
        assert report.startswith(
            "sv: service 'job' abandoned task 'offloop-service-job', which ignores its cancellation"
        ), report
        assert "in async_job" in report  # where it is stuck
    finally:
        deaf.set_free()
    await await_until(lambda: bool(late_ends(caplog)), QUICK_WAIT, "the late end in the log")

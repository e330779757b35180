"""A dependent that will not stop is abandoned by the cascade, then starts again with the rest."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest

from offloop import Supervisor
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_supervisor_cascade import Crashable

GRACE = 0.1


class Deaf:
    """Jobs that ignore the request to stop (a token, a cancellation) until released."""

    def __init__(self) -> None:
        self.entered = 0
        self.thread_release = threading.Event()
        self.task_release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def sync_job(self) -> None:
        self.entered += 1
        self.thread_release.wait(QUICK_WAIT)  # a blocking call that does not look at the token

    async def async_job(self) -> None:
        self.entered += 1
        while not self.task_release.done():
            # Swallowed, as a careless retry loop does.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.task_release)

    async def release(self) -> None:
        self.thread_release.set()
        self.task_release.set_result(None)
        await await_until(
            lambda: (
                not [
                    t for t in asyncio.all_tasks() if t.get_name().endswith("-job") and not t.done()
                ]
            ),
            QUICK_WAIT,
            "the abandoned tasks to end",
        )


def thread_service(sv: Supervisor, deaf: Deaf) -> None:
    sv.service(depends_on=["db"], name="job")(deaf.sync_job)


def task_service(sv: Supervisor, deaf: Deaf) -> None:
    sv.service(depends_on=["db"], name="job")(deaf.async_job)


def loop_service(sv: Supervisor, deaf: Deaf) -> None:
    async def job() -> None:
        deaf.sync_job()  # blocks the service's own loop, in its thread

    sv.service(depends_on=["db"], name="job", isolate="loop")(job)


def every_sync(sv: Supervisor, deaf: Deaf) -> None:
    sv.every(0.01, depends_on=["db"], name="job")(deaf.sync_job)


def every_async(sv: Supervisor, deaf: Deaf) -> None:
    sv.every(0.01, depends_on=["db"], name="job")(deaf.async_job)


@pytest.mark.parametrize(
    "add",
    [thread_service, task_service, loop_service, every_sync, every_async],
    ids=["thread", "task", "loop", "every-def", "every-async"],
)
@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_dependent_that_will_not_stop_is_abandoned_and_started_again(add: Any) -> None:
    # docs/supervisor.md: a dependent that does not stop within grace "is killed
    # (a thread that ignores its token is abandoned and reported) and started
    # again with the rest". So kill() must end the run it abandons: a start()
    # refused as "still stopping" would fail the whole supervisor.
    deaf = Deaf()
    sv = Supervisor(name="abandon", grace=GRACE)
    db = sv.add(Crashable("db", []), backoff=0.01, max_backoff=0.01)
    add(sv, deaf)
    try:
        async with sv:
            await await_until(lambda: deaf.entered == 1, QUICK_WAIT, "the first run")
            db.crash()
            await await_until(
                lambda: (
                    sv.status()["job"].dependency_restarts == 1
                    and sv.status()["job"].state == "running"
                ),
                QUICK_WAIT,
                "job running again after db's restart",
            )
            # A new run, beside the abandoned one, which still ignores its stop.
            await await_until(lambda: deaf.entered == 2, QUICK_WAIT, "a run after the restart")
            assert sv.state == "running"
            assert sv.status()["job"].last_error is None
    finally:
        await deaf.release()

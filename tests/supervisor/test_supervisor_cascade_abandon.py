"""A dependent whose thread ignores its token is abandoned by the cascade, then starts again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from offloop import Supervisor
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.supervisor.test_supervisor_cascade import Crashable

GRACE = 0.1


def thread_service(sv: Supervisor, fn: Callable[[], None]) -> None:
    sv.service(depends_on=["db"], name="job")(fn)


def every_service(sv: Supervisor, fn: Callable[[], None]) -> None:
    sv.every(0.01, depends_on=["db"], name="job")(fn)


def loop_service(sv: Supervisor, fn: Callable[[], None]) -> None:
    async def job() -> None:
        fn()  # blocks the service's own loop, in its thread

    sv.service(depends_on=["db"], name="job", isolate="loop")(job)


@pytest.mark.parametrize(
    "add", [thread_service, every_service, loop_service], ids=["service", "every", "loop"]
)
@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_dependent_whose_thread_ignores_its_token_is_abandoned_and_started_again(
    add: Any,
) -> None:
    # docs/supervisor.md: a dependent that does not stop within grace "is killed
    # (a thread that ignores its token is abandoned and reported) and started
    # again with the rest". Its start was refused ("it is still stopping"),
    # which failed the whole supervisor.
    release = threading.Event()
    entered: list[int] = []

    def job() -> None:
        entered.append(1)
        release.wait(QUICK_WAIT)  # a blocking call that does not look at the token

    sv = Supervisor(name="abandon", grace=GRACE)
    db = sv.add(Crashable("db", []), backoff=0.01, max_backoff=0.01)
    add(sv, job)
    try:
        async with sv:
            await await_until(lambda: len(entered) == 1, QUICK_WAIT, "the first run")
            db.crash()
            await await_until(
                lambda: (
                    sv.status()["job"].dependency_restarts == 1
                    and sv.status()["job"].state == "running"
                ),
                QUICK_WAIT,
                "job running again after db's restart",
            )
            # A new run, beside the abandoned one, which still blocks.
            await await_until(lambda: len(entered) == 2, QUICK_WAIT, "a run after the restart")
            assert sv.state == "running"
            assert sv.status()["job"].last_error is None
    finally:
        release.set()

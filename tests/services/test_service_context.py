"""Function services see the context variables of the code that started the supervisor.

An ``async def`` service's task copies them (asyncio does); a plain ``def``
service's thread and each run of a scheduled plain ``def`` get a copy too, as
``asyncio.to_thread`` and ``offloop.to_thread`` give each call.
"""

from __future__ import annotations

import contextvars
import threading

from offloop import StopToken, Supervisor, to_thread
from offloop._services.cron import make_cron
from tests.helpers import QUICK_WAIT, await_until, bounded
from tests.services.test_periodic import HandClock, stamp

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


@bounded(10)
async def test_thread_and_scheduled_sync_services_see_a_copy_of_the_starters_context() -> None:
    seen: dict[str, list[str]] = {}
    ran_twice = threading.Event()

    def note(where: str) -> None:
        seen.setdefault(where, []).append(request_id.get())
        request_id.set(f"changed by {where}")  # in its copy only

    sv = Supervisor(name="ctx")

    @sv.service
    async def task() -> None:
        note("task")

    @sv.service
    def thread(token: StopToken) -> None:
        note("thread")
        token.wait()

    @sv.every(0.01)
    def periodic() -> None:
        note("every")
        if len(seen["every"]) >= 2:
            ran_twice.set()

    clock = HandClock(stamp(2026, 1, 5, 9, 0))
    cron = make_cron(
        lambda: note("cron"), "*/5 * * * *", tz="UTC", overlap="skip", missed="skip", name="c"
    )
    cron.clock = clock
    sv.add(cron)

    token = request_id.set("req-42")
    try:
        async with sv:
            await await_until(lambda: "thread" in seen and "task" in seen, QUICK_WAIT, "runs")
            await await_until(ran_twice.is_set, QUICK_WAIT, "two periodic runs")
            await clock.wake_at()
            await await_until(lambda: "cron" in seen, QUICK_WAIT, "the cron run")
            # The same as offloop.to_thread gives a call.
            assert await to_thread(request_id.get) == "req-42"
        assert request_id.get() == "req-42"  # no service's change leaked out
    finally:
        request_id.reset(token)
    # Each run has a fresh copy: the first run's change is not seen by the second.
    assert {where: runs[:2] for where, runs in seen.items()} == {
        "task": ["req-42"],
        "thread": ["req-42"],
        "every": ["req-42", "req-42"],
        "cron": ["req-42"],
    }

"""``to_loop`` isolates a coroutine that blocks: an ``http_service`` beside a ``bot_start``.

A program that runs ``await http_service()`` and then ``bot_start()`` on one
loop, or the common recipe ``asyncio.run_coroutine_threadsafe(http_service(),
loop)`` on the *same* loop, isolates nothing: both starve the bot while the
service blocks. With ``offloop.to_loop`` the service blocks its own loop
thread and both tick side by side. Ticks are counted instead of printed, and
each side waits for the other to make progress, so the test is bounded and
never depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import offloop

TICKS = 4


class Ticks:
    """Tick counters for both parts, readable from any thread."""

    def __init__(self) -> None:
        self.http = 0
        self.bot = 0
        self.bot_seen_by_http: list[int] = []  # the bot's count at each http tick


async def http_service(ticks: Ticks, until_bot_ticks: int, deadline: float) -> None:
    # Blocks like a sync web framework inside ``async def``: time.sleep, no await.
    while (ticks.bot < until_bot_ticks or ticks.http < TICKS) and time.monotonic() < deadline:
        time.sleep(0.005)  # noqa: ASYNC251 - a blocking service, on purpose
        ticks.http += 1
        ticks.bot_seen_by_http.append(ticks.bot)


async def bot_start(ticks: Ticks, until_http_ticks: int, deadline: float) -> None:
    while (ticks.http < until_http_ticks or ticks.bot < TICKS) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        ticks.bot += 1


async def test_with_offloop_both_tick_side_by_side() -> None:
    ticks = Ticks()
    deadline = time.monotonic() + 10
    # Each part runs until both have ticked TICKS times. Run one after the
    # other, the first would wait for the second until the deadline: finishing
    # in time proves they ran side by side.
    service = asyncio.ensure_future(offloop.to_loop(http_service, ticks, TICKS, deadline))
    await bot_start(ticks, TICKS, deadline)
    await asyncio.wait_for(service, 10)
    assert time.monotonic() < deadline, "one side starved the other"
    assert ticks.bot >= TICKS
    assert ticks.http >= TICKS
    # http_service, blocked in time.sleep, saw the bot tick.
    assert ticks.bot_seen_by_http[-1] >= 1


@pytest.mark.loops("asyncio")
async def test_without_offloop_the_blocking_coroutine_starves_the_bot() -> None:
    ticks = Ticks()
    deadline = time.monotonic() + 10
    bot = asyncio.ensure_future(bot_start(ticks, 1, deadline))
    # Without offloop: 'await http_service()' on the same loop. The bot task
    # exists but cannot run a single tick until the service gives the loop back
    # (here after 50 ms; a real service never does).
    await http_service(ticks, until_bot_ticks=1, deadline=time.monotonic() + 0.05)
    assert ticks.http > 0
    assert ticks.bot_seen_by_http == [0] * ticks.http
    await asyncio.wait_for(bot, 10)


def test_the_run_coroutine_threadsafe_recipe_isolates_nothing() -> None:
    ticks = Ticks()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bot = asyncio.ensure_future(bot_start(ticks, 1, time.monotonic() + 10))
        # The recipe schedules the service on the very loop it should avoid.
        future = asyncio.run_coroutine_threadsafe(
            http_service(ticks, until_bot_ticks=1, deadline=time.monotonic() + 0.05), loop
        )
        await asyncio.wait_for(asyncio.wrap_future(future), 10)
        await asyncio.wait_for(bot, 10)

    runner = threading.Thread(target=asyncio.run, args=(main(),))
    runner.start()
    runner.join(15)
    assert not runner.is_alive()
    assert ticks.http > 0
    # While the service ran, the bot never ticked: same loop, same starvation.
    assert ticks.bot_seen_by_http == [0] * ticks.http

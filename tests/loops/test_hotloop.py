"""The default loop of offloop's loop threads: it polls briefly after a wake-up from a thread.

Only behaviour is checked here (which wake-ups make it poll, that it still
sleeps and keeps its timers, which loop a policy gets); the speed it buys is
measured by ``benchmarks.bench_from_thread``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvloop

import offloop
from offloop._loops import hotloop as _hotloop
from offloop._loops.hotloop import HOT_WINDOW, new_loop
from tests.helpers import WAIT


@pytest.fixture
def hot_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_loop()
    try:
        yield loop
    finally:
        loop.close()


def selector_of(loop: asyncio.AbstractEventLoop) -> _hotloop._HotSelector:
    selector = loop._selector  # type: ignore[attr-defined]
    assert isinstance(selector, _hotloop._HotSelector)
    return selector


def is_hot(selector: _hotloop._HotSelector) -> bool:
    return selector._hot


def test_only_a_wake_up_from_another_thread_makes_it_poll(
    hot_loop: asyncio.AbstractEventLoop,
) -> None:
    selector = selector_of(hot_loop)
    assert selector.wake_fd == hot_loop._ssock.fileno()  # type: ignore[attr-defined]
    a, b = socket.socketpair()
    try:
        hot_loop.add_reader(a.fileno(), lambda: a.recv(1))
        b.send(b"x")  # a socket of its own: not another thread's call
        hot_loop.run_until_complete(asyncio.sleep(0))
        hot_loop.run_until_complete(asyncio.sleep(0.001))
        assert not is_hot(selector)
        woken = threading.Thread(target=hot_loop.call_soon_threadsafe, args=(lambda: None,))
        woken.start()
        woken.join(WAIT)
        events = selector.select(0)
        assert [key.fd for key, _ in events] == [selector.wake_fd]
        assert is_hot(selector)
        hot_loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()


def test_a_polling_loop_still_sleeps_until_its_timeout(hot_loop: asyncio.AbstractEventLoop) -> None:
    selector = selector_of(hot_loop)
    selector._hot = True
    timeout = HOT_WINDOW * 200  # 10 ms: far beyond the polling window
    start = time.monotonic()
    assert selector.select(timeout) == []
    # Not a speed bound: it must neither return early nor stay hot.
    assert time.monotonic() - start >= timeout
    assert not is_hot(selector)


def test_timers_and_calls_from_threads_run_on_a_hot_loop(
    hot_loop: asyncio.AbstractEventLoop,
) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        done = asyncio.Event()
        timer_due = loop.time() + 0.02

        def from_thread(n: int) -> None:
            seen.append(f"call {n}")

        def timer() -> None:
            assert loop.time() >= timer_due
            seen.append("timer")
            done.set()

        loop.call_at(timer_due, timer)
        for n in range(3):
            # Each call wakes the loop from another thread, so it polls after each.
            sender = threading.Thread(target=loop.call_soon_threadsafe, args=(from_thread, n))
            sender.start()
            await asyncio.to_thread(sender.join, WAIT)
        await asyncio.wait_for(done.wait(), WAIT)
        return seen

    assert hot_loop.run_until_complete(main()) == ["call 0", "call 1", "call 2", "timer"]


def test_loop_threads_use_it_unless_a_policy_or_a_factory_says_otherwise() -> None:
    with offloop.LoopThread(name="hot") as lt:
        assert isinstance(lt.loop._selector, _hotloop._HotSelector)  # type: ignore[union-attr]
    with offloop.LoopThread(name="factory", loop_factory=asyncio.new_event_loop) as lt:
        assert not isinstance(lt.loop._selector, _hotloop._HotSelector)  # type: ignore[union-attr]
    old_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        with offloop.LoopThread(name="policy") as lt:
            assert isinstance(lt.loop, uvloop.Loop)  # the installed policy's loop, as before
    finally:
        asyncio.set_event_loop_policy(old_policy)


def test_it_stays_hot_while_the_wake_up_takes_more_iterations(
    hot_loop: asyncio.AbstractEventLoop,
) -> None:
    # The woken call schedules more work, so the loop's next selects only
    # look (timeout 0) and find nothing: that says nothing of who woke it,
    # and it must still poll once it would sleep again.
    selector = selector_of(hot_loop)
    woken = asyncio.Event()
    # Sent, self-pipe byte included, before the loop runs: a sender still
    # writing that byte while the loop already ran its call would not wake it.
    sender = threading.Thread(
        target=hot_loop.call_soon_threadsafe, args=(hot_loop.call_soon, woken.set)
    )
    sender.start()
    sender.join(WAIT)
    assert not sender.is_alive()

    async def main() -> bool:
        await asyncio.wait_for(woken.wait(), WAIT)
        return is_hot(selector)

    assert hot_loop.run_until_complete(main())

"""LoopCloseHook: a callback run by a loop's close(), on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref

import pytest

from offloop._core.loopclose import LoopCloseHook
from tests.conftest import new_loop

LOOPS = ("asyncio", "uvloop")


async def _turn() -> None:
    await asyncio.sleep(0)


@pytest.mark.parametrize("kind", LOOPS)
def test_the_callback_runs_in_close_in_the_closing_thread(kind: str) -> None:
    loop = new_loop(kind)
    ran: list[int] = []
    LoopCloseHook(loop, lambda: ran.append(threading.get_ident()))
    loop.run_until_complete(_turn())
    assert ran == []  # running the loop does not fire it
    loop.close()
    assert ran == [threading.get_ident()]


@pytest.mark.parametrize("kind", LOOPS)
def test_a_cancelled_hook_never_runs_and_leaves_no_timer(kind: str) -> None:
    loop = new_loop(kind)
    ran: list[str] = []
    hook = LoopCloseHook(loop, lambda: ran.append("ran"))
    target = hook._target()
    assert target is not None
    collected = threading.Event()
    weakref.finalize(target, collected.set)
    del target
    hook.cancel()
    loop.run_until_complete(_turn())  # the loop takes the timer off
    gc.collect()
    assert collected.is_set()  # released by the running loop, not only by its close
    loop.close()
    assert ran == []


@pytest.mark.parametrize("kind", LOOPS)
def test_a_cancel_from_another_thread_is_applied_by_the_loop(kind: str) -> None:
    loop = new_loop(kind)
    ran: list[str] = []
    hook = LoopCloseHook(loop, lambda: ran.append("ran"))
    canceller = threading.Thread(target=hook.cancel)
    canceller.start()
    canceller.join()
    loop.run_until_complete(_turn())
    loop.close()
    assert ran == []


def test_the_hook_does_not_keep_a_closed_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    hook = LoopCloseHook(loop, lambda: None)
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None
    hook.cancel()  # after the loop went: nothing to do, no error


def test_a_callback_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()

    def broken() -> None:
        raise ValueError("broken callback")

    LoopCloseHook(loop, broken)
    with caplog.at_level(logging.ERROR, logger="offloop"):
        loop.close()
    assert "a callback for an event loop's close() raised" in caplog.text
    assert "broken callback" in caplog.text

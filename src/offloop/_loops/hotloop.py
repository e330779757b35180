"""The default event loop of offloop's loop threads: it stays awake briefly after a wake-up.

A sync caller (``from_thread`` from a plain thread, ``LoopThread.call``) wakes
the loop thread through asyncio's self-pipe, gets its reply, and often sends
the next call at once. A loop asleep in ``epoll_wait`` by then pays a thread
wake-up per call; one still polling takes the call at once. So after a wake-up
from another thread the loop polls its selector, without blocking, for up to
:data:`HOT_WINDOW` before it sleeps. The calling side does the same while it
waits for the reply (``crossing._spin``), and a ThreadPool's workers while
they wait for the next call (``ThreadPool._work``): a sequential round trip then
needs no thread wake-up at all.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
from time import monotonic
from typing import Any, Final

from .._core.spin import SpinTuner, yield_cpu

__all__ = ["HOT_WINDOW", "new_loop"]

#: Seconds the loop keeps polling after another thread woke it, where that
#: pays (each loop's SpinTuner measures it, see _core/spin.py). The same
#: window as the pool workers' and the sync callers' own polling; every turn
#: yields the CPU and the GIL, so other threads run meanwhile.
HOT_WINDOW: Final = 50e-6


class _HotSelector(selectors.DefaultSelector):
    """The platform's selector, polling for :data:`HOT_WINDOW` after a self-pipe wake-up."""

    def __init__(self) -> None:
        super().__init__()
        #: The loop's self-pipe (what ``call_soon_threadsafe`` writes to).
        self.wake_fd = -1
        self._hot = False
        #: Whether this loop polls after a wake-up: measured, see _core/spin.py.
        self.polling = SpinTuner(HOT_WINDOW)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        select = super().select
        if self._hot and (timeout is None or timeout > 0):
            # Woken by another thread last time, which may well do it again
            # soon: the time to the next events is the gap the tuner compares.
            polling = self.polling
            window = polling.window
            start = monotonic()
            if window:
                limit = window if timeout is None else min(window, timeout)
                while True:
                    events = select(0)
                    if events:
                        break
                    spent = monotonic() - start
                    if spent >= limit:
                        events = select(None if timeout is None else max(timeout - spent, 0.0))
                        break
                    yield_cpu()
            else:
                events = select(timeout)
            if events:  # else a timer is due: no other thread's doing
                polling.record(monotonic() - start, window)
        else:
            events = select(timeout)
            if not events and timeout == 0:
                # A look between two busy iterations (asyncio's selector
                # call while callbacks are ready) found nothing: who woke the
                # loop last is unchanged, and so is whether it polls next.
                return events
        wake = self.wake_fd
        self._hot = False
        for key, _ in events:
            if key.fd == wake:
                self._hot = True
                break
        return events


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a loop thread, as ``asyncio.new_event_loop()`` makes it.

    The same loop class on the same selector, with the polling above; where
    that cannot be had (an event loop policy installed, e.g. uvloop's, or
    Windows' proactor loop) the policy's own loop.
    """
    # None until someone asks for the policy; an asyncio class is the default
    # one (its name differs across versions). Read without the getter, which
    # Python 3.14 deprecates.
    policy: Any = getattr(asyncio.events, "_event_loop_policy", object())
    if sys.platform == "win32" or (
        policy is not None and not type(policy).__module__.startswith("asyncio.")
    ):
        return asyncio.new_event_loop()
    selector = _HotSelector()
    loop = asyncio.SelectorEventLoop(selector)
    ssock = getattr(loop, "_ssock", None)
    if ssock is not None:
        selector.wake_fd = ssock.fileno()
    return loop

"""A callback run by an event loop's ``close()``, for loops that end without telling anyone.

``asyncio.run``, ``asyncio.Runner`` and uvloop end a loop by cancelling its
tasks and shutting down its async generators first, which offloop watches
for. A loop ended by hand (``run_until_complete()`` and then ``close()``,
which is also what python-telegram-bot's ``run_polling`` does) skips both,
and asyncio has no hook for ``close()`` itself.

But ``close()`` discards the callbacks still scheduled: asyncio's drops them,
uvloop's cancels them. :class:`LoopCloseHook` schedules an object for a time
no loop reaches and holds it only weakly, so ``close()`` drops the last
reference to it, and its ``__del__`` runs the callback then, in the thread
that closed the loop. Only public API is involved: no warning, and the same
on both loops.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Final, final

__all__ = ["LoopCloseHook"]

logger: Final = logging.getLogger("offloop")

#: A delay no timer reaches (ten years): the hook is scheduled for then.
NEVER: Final = 10 * 365 * 86400.0


@final
class _AtClose:
    """The scheduled object; its release by the loop runs the callback."""

    __slots__ = ("__weakref__", "callback")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        # Ten years on, the loop still open: again, as the handle that ran
        # this drops it now, and __del__ would report a close that did not
        # happen.
        asyncio.get_running_loop().call_later(NEVER, self)

    def __del__(self) -> None:
        callback, self.callback = self.callback, None
        if callback is None:
            return
        # Not a context manager or a logger call that may fail: this may run
        # while the interpreter tears modules down.
        try:
            callback()
        except Exception:
            try:  # noqa: SIM105
                logger.exception("offloop: a callback for an event loop's close() raised")
            except Exception:
                pass


@final
class LoopCloseHook:
    """Runs ``callback()`` once, when ``loop.close()`` runs, unless cancelled before.

    The callback runs in the thread that closes the loop, inside ``close()``;
    it must be quick and must not need the loop. It also runs if an asyncio
    loop is garbage-collected unclosed (its ``__del__`` closes it, in whichever
    thread the collection runs); an unclosed uvloop loop is never freed, and
    the callback then never runs.
    """

    __slots__ = ("_handle", "_loop", "_target")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        target = _AtClose(callback)
        # Weak, all three: the loop's timer must hold the last reference to
        # the target, and this hook must not keep a closed loop alive.
        self._target = weakref.ref(target)
        self._handle = weakref.ref(loop.call_later(NEVER, target))
        self._loop = weakref.ref(loop)

    def cancel(self) -> None:
        """Never run the callback, and take the timer off the loop (from any thread)."""
        target = self._target()
        if target is not None:
            target.callback = None
        handle, loop = self._handle(), self._loop()
        if handle is None or loop is None:
            return
        # A loop still running would keep the timer, one per hook, until it
        # closes. call_soon_threadsafe: this may run in any thread, even in a
        # __del__ during the interpreter's teardown.
        try:  # noqa: SIM105
            loop.call_soon_threadsafe(handle.cancel)
        except RuntimeError:  # closed: the timer went with its other callbacks
            pass

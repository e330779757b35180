"""``Room``: the free slots of ``iterate()``'s buffer, given back without a lock."""

from __future__ import annotations

import threading
from typing import final

__all__ = ["Room"]


@final
class Room:
    """Free slots between one producer thread and one consumer: ``iterate()``'s backpressure.

    Not a ``threading.Semaphore``: its ``release()`` takes the lock of its
    Condition, which the consumer holds for a moment on every item it takes.
    A stop request gives room too (to wake a producer that waits for it), and
    may come from a ``signal.signal`` handler through a stop token's callback:
    in the main thread, between two bytecodes of a consumer running there,
    maybe inside that ``release()``, whose lock the handler would then wait
    for forever. Here giving room is ``list.append`` and the release of the
    lock the producer sleeps on, neither of which waits.
    """

    __slots__ = ("_free", "_sleeper")

    def __init__(self, size: int) -> None:
        # One entry per free slot. Only the producer pops.
        self._free: list[None] = [None] * size
        # What the producer sleeps on while it waits for room, a fresh lock
        # each time; None while it does not wait.
        self._sleeper: threading.Lock | None = None

    def give(self) -> None:
        """Free one slot and wake the producer if it waits for one. Any thread, any time."""
        self._free.append(None)
        # Read after the append, and the producer publishes its lock before
        # it looks at the slots: either it sees this slot, or this sees its lock.
        sleeper = self._sleeper
        if sleeper is not None:
            # Not contextlib.suppress: this runs for every item the consumer takes.
            try:  # noqa: SIM105
                sleeper.release()
            except RuntimeError:
                pass  # another give() woke it first

    def take(self, timeout: float) -> bool:
        """Take a free slot, waiting up to ``timeout`` seconds for one (the producer only)."""
        free = self._free
        try:
            free.pop()
        except IndexError:
            pass
        else:
            return True
        sleeper = threading.Lock()
        sleeper.acquire()
        self._sleeper = sleeper
        try:
            if not free:  # a slot given before the lock was published woke nobody
                sleeper.acquire(timeout=timeout)
        finally:
            # A give() that read the lock may still release it: harmless, as
            # nobody waits on this lock again.
            self._sleeper = None
        try:
            free.pop()
        except IndexError:
            return False
        return True

"""How a ThreadPool's new calls reach its threads: submits and per-iteration batches.

The loop side of :class:`~offloop.ThreadPool`'s hot path, which inherits
it; ``pool.py`` states the counters and their invariants, and holds ``run()``
and the worker thread's body. Everything here runs on the thread of
the event loop that made the call:

- ``_submit`` places a call made when the pool can take it: handed to the
  thread that went idle last, on the queue for a new thread, or in ``_pending``.
- A call that had to wait in ``_pending`` opens a *batch* on its loop's
  :class:`~offloop._core.offload.Channel`: the further calls this loop makes
  for this pool in the same iteration wait there (phase BATCHED, not yet
  counted by the pool; ``run()`` appends them), and ``_flush``, scheduled
  with ``call_soon``, hands them all to the pool at the next iteration under
  one lock. A fan-out such as a 500-wide ``gather`` then pays one lock round
  for most of its calls, while a lone ``await`` (which finds a thread free)
  still goes out at once. The pool cannot run the batched calls sooner
  anyway: its threads are busy, and need the GIL that this loop holds while
  it makes them.
- ``_rebalance`` (``growth.py``) runs every GROWTH_PERIOD (FULL_PERIOD while
  every thread is busy) while calls are pending, and dispatches them into
  the CPU slots running calls free.
"""

from __future__ import annotations

import contextlib
from time import monotonic
from typing import Any, Final

from .._core.errors import PoolClosedError
from .._core.offload import BATCHED, QUEUED, SKIPPED, Channel, OffloadFuture
from .._core.poolbase import PoolState, complete_waiter
from .growth import GROWTH_PERIOD, ThreadPoolGrowth
from .workers import Worker

__all__ = ["ThreadPoolDispatch"]

_OPEN: Final = PoolState.OPEN


class ThreadPoolDispatch(ThreadPoolGrowth):
    """The loop side of a ThreadPool: where each call goes, and when threads start."""

    def _submit(self, call: OffloadFuture[Any]) -> None:
        dispatch = False
        starter: Worker | None = None
        with self._lock:
            if self._state is not PoolState.OPEN:
                raise PoolClosedError(
                    f"{self._describe()} is {self._state.value} and takes no new calls; "
                    f"create a new ThreadPool or use offloop.to_thread()."
                )
            self._queued += 1
            if (
                not self._pending
                and self._ready + self._running - self._waiting < self._cpu_slots
                and (self._idle or not self._workers)
                and not (self._gil_calls and self._gil_fns.holds(call.fn))
            ):
                # A free CPU slot and a thread for it: dispatch now. A new
                # thread only for the first call; later ones come from
                # _rebalance, once the running calls have shown that they
                # are long (for short calls one warm thread is fastest).
                dispatch = True
            elif (
                self._waits  # a dict: a C-level test, see WaitMemory
                and self._waits.waits(call.fn)
                and (self._idle or len(self._workers) < self._max_workers)
            ):
                # Its function's last call was found waiting: like that one,
                # it will hold no CPU slot, so it takes a thread at once (one
                # of its own if need be), as a pool without slots would.
                dispatch = True
            if dispatch:
                self._ready += 1
                if self._gil_fns and self._gil_fns.holds(call.fn):
                    self._gil_calls.add(call)  # see gil.py
                # Handed or put while still holding the lock: a close() from
                # another thread in between would not know of the call, and
                # nobody would ever take it. Last in the block: a polling
                # worker takes the call at once and then needs the lock to
                # start it.
                if self._idle:
                    # The thread that went idle last (Worker.give, inlined):
                    # it may still be polling, and is warm in any case.
                    worker = self._idle.pop()
                    worker.hand = call
                    worker.wake.release()
                else:
                    worker = Worker()
                    self._workers.append(worker)
                    starter = self._want_started([worker], now=monotonic())
                    self._queue.put(call)  # the new thread's first call
            if not dispatch or (self._unstarted and not self._starting):
                channel = call._channel
                if not dispatch:
                    self._pending.append(call)
                    if channel.batch is None:
                        # The pool is busy: the calls this loop makes in the
                        # rest of this iteration wait in the channel's batch,
                        # and go to the pool in one go at the next one.
                        channel.batch = []
                        channel.batch_owner = self
                        call.loop.call_soon(self._flush, channel)
                # The check also starts threads no worker came by to start.
                if channel not in self._armed:
                    self._armed.add(channel)
                    loop = call.loop
                    due = loop.time() + GROWTH_PERIOD
                    loop.call_at(due, self._rebalance, channel, loop, due)
        if not dispatch:
            return
        if starter is not None:
            try:
                self._start_thread(starter, starts_others=True)
            except BaseException:
                with self._lock:
                    waiters = self._give_up_starting()
                    taken = call._phase is not QUEUED  # by a thread another call started
                    if not taken:
                        # run() raises, so the call must never run: a later
                        # thread takes it off the queue and drops it, or,
                        # with no thread left, it went back to _pending
                        # (_serve_backlog), where it must not stay.
                        call._phase = SKIPPED
                        self._queued -= 1
                        with contextlib.suppress(ValueError):
                            self._pending.remove(call)
                for waiter in waiters:
                    complete_waiter(waiter)
                if not taken:
                    raise

    def _flush(self, channel: Channel) -> None:
        # On the channel's loop, one iteration after a call found the pool
        # busy: hand the calls batched since to the pool, under one lock.
        batch = channel.batch
        channel.batch = None
        channel.batch_owner = None
        if not batch:
            return
        closed: list[OffloadFuture[Any]] = []
        to_start: list[Worker] = []
        starter: Worker | None = None
        with self._lock:
            if self._state is not _OPEN:
                for call in batch:
                    if call._phase is BATCHED:
                        self._queued += 1  # _skip_closed counts it out again
                        self._skip_closed(call)
                        closed.append(call)
            else:
                pending = self._pending
                waits = self._waits
                for call in batch:
                    if call._phase is not BATCHED:
                        continue  # cancelled meanwhile
                    call._phase = QUEUED
                    self._queued += 1
                    if (
                        waits  # as in _submit
                        and waits.waits(call.fn)
                        and (self._idle or len(self._workers) < self._max_workers)
                    ):
                        self._dispatch(call, to_start)
                    else:
                        pending.append(call)
                # Idle threads take what free CPU slots allow; _next_pending
                # and _rebalance (armed below) see to the rest.
                while (
                    pending
                    and self._idle
                    and self._ready + self._running - self._waiting < self._cpu_slots
                ):
                    if self._gil_calls:
                        nxt = self._take_pending()
                        if nxt is None:
                            break  # they wait for the GIL-holding call (gil.py)
                    else:
                        nxt = pending.popleft()
                        if nxt._phase is not QUEUED:
                            continue  # cancelled meanwhile
                    self._dispatch(nxt, to_start)
                if to_start:
                    starter = self._want_started(to_start, now=monotonic())
                if (pending or (self._unstarted and not self._starting)) and (
                    channel not in self._armed
                ):
                    self._armed.add(channel)
                    loop = batch[0].loop
                    due = loop.time() + GROWTH_PERIOD
                    loop.call_at(due, self._rebalance, channel, loop, due)
        for call in closed:
            call._channel.post(call)
        if starter is not None:
            self._start_or_give_up(starter)

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
from .._core.validate import describe
from .growth import GROWTH_PERIOD, ThreadPoolGrowth
from .workers import Worker

__all__ = ["ThreadPoolDispatch"]

_OPEN: Final = PoolState.OPEN


class ThreadPoolDispatch(ThreadPoolGrowth):
    """The loop side of a ThreadPool: where each call goes, and when threads start."""

    def _submit(self, call: OffloadFuture[Any]) -> None:
        dispatch = False
        starter: Worker | None = None
        new: Worker | None = None  # the thread wanted for the call, if one is
        placed = False  # whether the locked section ran to its end
        try:
            with self._lock:
                # Whether a thread is being started already: if not, and the
                # call below that claims the start for ``new`` is interrupted
                # after claiming it (on Python 3.10 a signal handler also runs
                # as a Python function returns), the except clause must hand
                # the claim back, or the pool would never start a thread again.
                was_starting = self._starting
                if self._state is not PoolState.OPEN:
                    raise PoolClosedError(
                        f"{self._describe()} is {self._state.value} and takes no new calls; "
                        f"create a new ThreadPool or use offloop.to_thread()."
                    )
                self._queued += 1
                try:
                    if (
                        not self._pending
                        and self._ready + self._running - self._waiting < self._cpu_slots
                        and (self._idle or not self._workers)
                        and not (self._gil_calls and self._gil_fns.holds(call.fn))
                    ):
                        # A free CPU slot and a thread for it: dispatch now. A
                        # new thread only for the first call; later ones come
                        # from _rebalance, once the running calls have shown
                        # that they are long (for short calls one warm thread
                        # is fastest).
                        dispatch = True
                    elif (
                        self._waits  # a dict: a C-level test, see WaitMemory
                        and self._waits.waits(call.fn)
                        and (self._idle or len(self._workers) < self._max_workers)
                    ):
                        # Its function's last call was found waiting: like that
                        # one, it will hold no CPU slot, so it takes a thread at
                        # once (one of its own if need be), as a pool without
                        # slots would.
                        dispatch = True
                    # The steps below are ordered for the except clause: an
                    # exception from a signal handler (Ctrl-C's
                    # KeyboardInterrupt) comes only at a call, a function's
                    # start or a jump (on 3.10 any taken ``if``), and after
                    # each of those the clause must be able to tell what was
                    # done.
                    if dispatch:
                        if self._gil_fns and self._gil_fns.holds(call.fn):
                            self._gil_calls.add(call)  # see gil.py
                        # Handed or put while still holding the lock: a close()
                        # from another thread in between would not know of the
                        # call, and nobody would ever take it. Last in the
                        # block: a polling worker takes the call at once and
                        # then needs the lock to start it.
                        idle = self._idle
                        if idle:
                            # The thread that went idle last (see
                            # Worker's docs): it may still be polling, and is warm in
                            # any case. No call from taking it off the stack to
                            # waking it: a thread taken off and never woken
                            # would be lost for good.
                            worker = idle[-1]
                            del idle[-1]
                            self._ready += 1
                            worker.hand = call
                            worker.wake.release()
                        else:
                            new = Worker()
                            self._ready += 1
                            self._queue.put(call)  # the new thread's first call
                            self._workers.append(new)
                            if self._want_started([new], now=monotonic()):
                                # Taken with no call in between: see the
                                # except clause.
                                starter = self._unstarted[0]
                                del self._unstarted[0]
                    if not dispatch or (self._unstarted and not self._starting):
                        channel = call._channel
                        if not dispatch:
                            self._pending.append(call)
                            if channel.batch is None:
                                # The pool is busy: the calls this loop makes in
                                # the rest of this iteration wait in the
                                # channel's batch, and go to the pool in one go
                                # at the next one. The flush is scheduled first:
                                # a flush finds no batch harmless, while a batch
                                # never flushed would hold this loop's calls.
                                call.loop.call_soon(self._flush, channel)
                                channel.batch = []
                                channel.batch_owner = self
                        # The check also starts threads no worker came by to
                        # start. Recorded once scheduled, as with the flush.
                        if channel not in self._armed:
                            loop = call.loop
                            due = loop.time() + GROWTH_PERIOD
                            loop.call_at(due, self._rebalance, channel, loop, due)
                            self._armed.add(channel)
                except BaseException:
                    # Undone under the same hold of the lock: once it is
                    # released, another thread could take the new worker.
                    if starter is not None:
                        self._lose_thread(starter)  # taken to start: not started
                        self._give_up_starting()  # the pool is open: no waiters
                    elif new is not None:
                        self._lose_thread(new)
                        if self._starting and not was_starting:
                            self._give_up_starting()  # claimed for new, as above
                    self._drop_call(call)
                    raise
                placed = True
            if starter is not None:
                self._start_thread(starter, starts_others=True)
        except BaseException as exc:
            if not placed:
                raise  # refused (closed), or undone above
            # The new thread failed to start, or an exception from a signal
            # handler came as the lock was released or as it started.
            with self._lock:
                waiters = []
                # A starter whose thread runs (interrupted as start() waited
                # for it) starts the others itself.
                if starter is not None and starter.launch <= 0:
                    if starter.launch == 0:  # never got as far as its start
                        starter.launch = -1
                        self._lose_thread(starter)
                    waiters = self._give_up_starting()
                # Taken by a thread another call started: it runs, and with
                # the start's failure (an Exception) run() returns it.
                taken = self._drop_call(call)
            for waiter in waiters:
                complete_waiter(waiter)
            if not taken or not isinstance(exc, Exception):
                raise

    def _drop_call(self, call: OffloadFuture[Any]) -> bool:
        # Under _lock, when _submit raises after counting the call: run()
        # raises, so the call must never run (nobody would get its result).
        # Returns whether a thread took it already (then it runs).
        if call._phase is not QUEUED:
            return True
        # A thread that takes it off the queue, or was handed it, drops it;
        # with no thread left, it went back to _pending (_serve_backlog),
        # where it must not stay.
        call._phase = SKIPPED
        self._queued -= 1
        self._gil_calls.discard(call)
        with contextlib.suppress(ValueError):
            self._pending.remove(call)
        return False

    def _flush(self, channel: Channel) -> None:
        # On the channel's loop, one iteration after a call found the pool
        # busy: hand the calls batched since to the pool, under one lock.
        # An exception from a signal handler (Ctrl-C's KeyboardInterrupt)
        # may come at any call or jump: once the batch is taken off the
        # channel, the except clauses hand over what is left of it, or its
        # calls would wait in phase BATCHED for good. (One that comes as
        # this function starts leaves the batch on the channel: the loop's
        # check hands it over, see _rebalance.)
        batch = channel.batch
        channel.batch = None
        channel.batch_owner = None
        to_start: list[Worker] = []
        starter: Worker | None = None
        closed: list[OffloadFuture[Any]] = []
        try:
            if not batch:
                return
            with self._lock:
                was_starting = self._starting
                try:
                    self._take_batch(batch, closed)
                    if self._state is _OPEN:
                        loop = batch[0].loop
                        if self._send_batch(len(batch), to_start) and self._want_started(
                            to_start, now=monotonic()
                        ):
                            # Taken with no call in between: see the except clause.
                            starter = self._unstarted[0]
                            del self._unstarted[0]
                        if (self._pending or (self._unstarted and not self._starting)) and (
                            channel not in self._armed
                        ):
                            # Scheduled first, as in _submit: a check that
                            # was never scheduled must not count as armed.
                            due = loop.time() + GROWTH_PERIOD
                            loop.call_at(due, self._rebalance, channel, loop, due)
                            self._armed.add(channel)
                except BaseException:
                    self._take_batch(batch, closed)
                    self._undo_starts(to_start, starter, was_starting)
                    raise
            for call in closed:
                call._channel.post(call)
            if starter is not None:
                self._start_or_give_up(starter)
        except BaseException:
            with self._lock:
                if batch:
                    self._take_batch(batch, closed)
                waiters = self._settle_start(starter)
            for waiter in waiters:
                complete_waiter(waiter)
            # A call's second post reaches its loop's drain, which skips a
            # future already done.
            for call in closed:
                call._channel.post(call)
            raise

    def _take_batch(
        self, batch: list[OffloadFuture[Any]], closed: list[OffloadFuture[Any]]
    ) -> None:
        # Under _lock: count the batch's calls still BATCHED in, as pending
        # (the others were cancelled meanwhile), or refused if the pool is
        # closed (added to ``closed`` for their awaiters). Each call moves
        # in steps with no call or jump between them: an exception from a
        # signal handler leaves it BATCHED, for the caller's except clause
        # to call this again, or moved.
        pending = self._pending
        for call in batch:
            if call._phase is BATCHED:
                if self._state is not _OPEN:
                    error = PoolClosedError(
                        f"{self._describe()} closed before this call of "
                        f"{describe(call.fn)} started."
                    )
                    closed += (call,)  # not append(): a call, see above
                    call._error = error
                    call._phase = SKIPPED
                    self._cancelled += 1
                    continue
                call._phase = QUEUED
                self._queued += 1
                pending.append(call)

    def _send_batch(self, size: int, to_start: list[Worker]) -> bool:
        # Under _lock: dispatch the batch's calls (the last ``size`` pending
        # ones at most) whose function is known to wait, then as many
        # pending calls as idle threads and free CPU slots allow;
        # _next_pending and _rebalance see to the rest. Returns whether new
        # workers were added to to_start.
        pending = self._pending
        waits = self._waits
        if waits:  # as in _submit
            i = max(0, len(pending) - size)
            while i < len(pending) and (self._idle or len(self._workers) < self._max_workers):
                call = pending[i]
                if call._phase is QUEUED and waits.waits(call.fn):
                    self._dispatch(i, to_start)  # out of pending: i is the next one
                else:
                    i += 1
        while (
            pending and self._idle and self._ready + self._running - self._waiting < self._cpu_slots
        ):
            i = self._pending_index()
            if i < 0:
                break  # they wait for the GIL-holding call (gil.py)
            self._dispatch(i, to_start)
        return bool(to_start)

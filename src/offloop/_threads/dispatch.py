"""How a ThreadPool's calls reach its threads: submits, batches, the rebalancing check.

The loop-side half of :class:`~offloop.ThreadPool`'s hot path, which
inherits it; ``pool.py`` states the counters and their invariants, and holds
``run()`` and the worker thread's body. Everything here runs on the thread of
the event loop that made the call:

- ``_submit`` places a call made when the pool can take it: on the queue
  with a thread claimed for it, or in ``_pending``.
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
- ``_rebalance`` runs every GROWTH_PERIOD while calls are pending: it marks
  running calls that wait (workers.py) and dispatches pending calls into the
  CPU slots they free, starting threads up to ``max_workers``.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import Any, Final

from .._core.errors import PoolClosedError
from .._core.offload import BATCHED, QUEUED, SKIPPED, Channel, OffloadFuture
from .._core.poolbase import PoolState, complete_waiter
from .lifecycle import ThreadPoolLifecycle
from .workers import WaitMemory, Worker

__all__ = ["GROWTH_PERIOD", "LAG_LIMIT", "ThreadPoolDispatch"]

logger: Final = logging.getLogger("offloop")

_OPEN: Final = PoolState.OPEN

#: How often (seconds) a pool with pending calls looks at its running ones
#: (``_rebalance``). A call that has run longer than this and waits gives its
#: CPU slot to a pending call, so blocking calls, and a call that waits for
#: another pending one (a nested offload), never wait long for a thread.
GROWTH_PERIOD: Final = 0.001

#: Seconds late past which a pool's check takes its loop to be starved (see
#: _rebalance): well under the lag a user notices, well over a timer's jitter.
LAG_LIMIT: Final = 0.004


class ThreadPoolDispatch(ThreadPoolLifecycle):
    """The loop side of a ThreadPool: where each call goes, and when threads start."""

    # Set up by ThreadPool.__init__; see pool.py.
    _waits: WaitMemory

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
                and (self._idle > 0 or not self._workers)
            ):
                # A free CPU slot and a thread for it: dispatch now. A new
                # thread only for the first call; later ones come from
                # _rebalance, once the running calls have shown that they
                # are long (for short calls one warm thread is fastest).
                dispatch = True
            elif (
                self._waits  # a dict: a C-level test, see WaitMemory
                and self._waits.waits(call.fn)
                and (self._idle > 0 or len(self._workers) < self._max_workers)
            ):
                # Its function's last call was found waiting: like that one,
                # it will hold no CPU slot, so it takes a thread at once (one
                # of its own if need be), as a pool without slots would.
                dispatch = True
            if dispatch:
                self._ready += 1
                if self._idle > 0:
                    self._idle -= 1
                else:
                    worker = Worker()
                    self._workers.append(worker)
                    starter = self._want_started([worker], now=monotonic())
                # Put while still holding the lock: a close() from another
                # thread between the count and the put would drain the queue
                # without it and queue the workers' exit signals before it,
                # and nobody would ever take it. SimpleQueue.put never blocks.
                # Last in the block: a polling worker takes the call at once
                # and then needs the lock to start it.
                self._queue.put(call)
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
                        # thread takes it off the queue and drops it.
                        call._phase = SKIPPED
                        self._queued -= 1
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
                        and (self._idle > 0 or len(self._workers) < self._max_workers)
                    ):
                        self._dispatch(call, to_start)
                    else:
                        pending.append(call)
                # Idle threads take what free CPU slots allow; _next_pending
                # and _rebalance (armed below) see to the rest.
                while (
                    pending
                    and self._idle > 0
                    and self._ready + self._running - self._waiting < self._cpu_slots
                ):
                    call = pending.popleft()
                    if call._phase is QUEUED:
                        self._dispatch(call, to_start)
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
            self._start_or_give_up(starter, channel)

    def _dispatch(self, call: OffloadFuture[Any], to_start: list[Worker]) -> None:
        # Under _lock: put the call on the queue with a thread claimed for it,
        # an idle one or a new one (added to to_start). _submit does the same
        # inline: it runs once per call, and would pay for the list here.
        self._ready += 1
        if self._idle > 0:
            self._idle -= 1
        else:
            worker = Worker()
            self._workers.append(worker)
            to_start.append(worker)
        self._queue.put(call)  # under the lock, as in _submit

    def _rebalance(self, channel: Channel, loop: asyncio.AbstractEventLoop, due: float) -> None:
        # Runs on ``loop`` every GROWTH_PERIOD while calls are pending: finds
        # the running calls that wait, and dispatches pending calls into the
        # CPU slots they leave, starting threads up to max_workers.
        to_start: list[Worker] = []
        starter: Worker | None = None
        with self._lock:
            if self._state is not PoolState.OPEN or not (self._pending or self._unstarted):
                self._armed.discard(channel)
                return
            now = monotonic()
            for w in self._workers:
                waiting = w.is_waiting(now, GROWTH_PERIOD, self._running)
                if waiting is not w.waiting:
                    w.waiting = waiting
                    self._waiting += 1 if waiting else -1
                    if not waiting:
                        self._waits.remember(w.call, False)
            free = self._cpu_slots - (self._ready + self._running - self._waiting)
            if loop.time() - due > LAG_LIMIT:
                # The loop itself runs late. Calls that look blocked may be
                # waiting for the GIL that a computing call holds (C code
                # such as zlib keeps it for its whole run): while the loop
                # runs late, a waiting call's slot is given away only once it
                # has waited over a whole window (a GIL wait is not that long),
                # or sleeps in the kernel outside a futex (in I/O or a timer,
                # where no GIL wait is). Not never: under steady CPU load the
                # loop is always late, and blocked calls would hold their
                # slots for nothing.
                sure = sum(
                    1
                    for w in self._workers
                    if w.waiting and (w.prev_wall >= 0 or w.sleeps_outside_futex(now))
                )
                free = min(free, self._cpu_slots - (self._ready + self._running - sure))
            # A call that ended within a period since the last look means a
            # thread cycles through short calls: it takes the pending ones
            # itself, faster than new threads would, so none is started.
            room = self._idle + (
                0 if self._short else max(0, self._max_workers - len(self._workers))
            )
            self._short = False
            while free > 0 and room > 0 and self._pending:
                call = self._pending.popleft()
                if call._phase is not QUEUED:
                    continue  # cancelled while pending
                self._dispatch(call, to_start)
                free -= 1
                room -= 1
            starter = self._want_started(to_start, now=now) if to_start else None
            if starter is None:
                starter = self._late_start(now)
        if starter is not None and not self._start_or_give_up(starter, channel):
            return
        due = loop.time() + GROWTH_PERIOD
        loop.call_at(due, self._rebalance, channel, loop, due)

    def _start_or_give_up(self, starter: Worker, channel: Channel) -> bool:
        # On the loop: start the thread of a wanted worker (which starts the
        # others); returns False if it could not.
        try:
            self._start_thread(starter, starts_others=True)
        except BaseException as exc:
            # Their calls wait in the queue for a busy thread to come
            # free (_start_thread counted each in _backlog). No retry
            # every period (and a log line each time): the next call that
            # waits arms the check again.
            with self._lock:
                waiters = self._give_up_starting()
                self._armed.discard(channel)
            for waiter in waiters:
                complete_waiter(waiter)
            if not isinstance(exc, Exception):
                raise
            logger.exception("offloop: pool %r could not start a worker thread", self._name)
            return False
        return True

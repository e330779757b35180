"""How a ThreadPool grows: the periodic check that dispatches pending calls.

While calls wait in a pool's ``_pending``, each loop that submitted them runs
:meth:`ThreadPoolGrowth._rebalance` every :data:`GROWTH_PERIOD` (every
:data:`FULL_PERIOD` while every thread is busy and none can start): it finds the
running calls that wait (I/O, sleeps, locks; see ``workers.py``), and
dispatches pending calls into the CPU slots they leave, starting threads up to
``max_workers``. ``_dispatch`` (a call to an idle thread, or onto the queue
for a new one) and ``_start_or_give_up`` (the loop starting a wanted thread) serve it
and the batches of ``dispatch.py``. ``pool.py`` describes the counters it
reads and what stays true between critical sections;
:class:`~offloop.ThreadPool` inherits it.
"""

from __future__ import annotations

import asyncio
from time import monotonic, process_time, thread_time
from typing import Final

from .._core.offload import QUEUED, Channel
from .._core.poolbase import PoolState, complete_waiter
from .closing import ThreadPoolClosing
from .gil import GIL_ENABLED, GIL_SCAN, GilClocks, judge_gil, may_probe
from .workers import WaitMemory, Worker, waiting_share

__all__ = ["FULL_PERIOD", "GROWTH_PERIOD", "LAG_LIMIT", "START_RETRY", "ThreadPoolGrowth"]


#: How often (seconds) a pool with pending calls looks at its running ones
#: (``_rebalance``). A call that has run longer than this and waits gives its
#: CPU slot to a pending call, so blocking calls, and a call that waits for
#: another pending one (a nested offload), never wait long for a thread.
GROWTH_PERIOD: Final = 0.001

#: The period of the check while the pool has every thread busy and no
#: thread to start (see _rebalance): no call can be dispatched then, but a
#: call presumed to wait that computes must still be found.
FULL_PERIOD: Final = 0.005

#: Seconds after a failed thread start before a check tries again, when no
#: thread is left to take the calls that were to run in it (see
#: _check_later): long enough that a start that keeps failing logs a few
#: lines a second, not one per check; short next to a call's usual wait.
START_RETRY: Final = 0.25

#: Seconds late past which a pool's check takes its loop to be starved (see
#: _rebalance): well under the lag a user notices, well over a timer's jitter.
LAG_LIMIT: Final = 0.004


class ThreadPoolGrowth(ThreadPoolClosing):
    """The pool's periodic check for pending calls (see the module docs)."""

    # Set up by ThreadPool.__init__.
    _waits: WaitMemory

    def _flush(self, channel: Channel) -> None:
        raise NotImplementedError  # dispatch.py's: hands a loop's batch to the pool

    def _rebalance(
        self,
        channel: Channel,
        loop: asyncio.AbstractEventLoop,
        due: float,
        clocks: GilClocks | None = None,
    ) -> None:
        # Runs on ``loop`` every GROWTH_PERIOD (FULL_PERIOD while the pool is
        # full) while calls are pending: finds the running calls that wait,
        # and dispatches pending calls into the CPU slots they leave, starting
        # threads up to max_workers. ``clocks``: what the previous check of
        # this loop read (gil.py), passed along from one check to the next.
        to_start: list[Worker] = []
        starter: Worker | None = None
        period = GROWTH_PERIOD
        try:
            if channel.batch is not None and channel.batch_owner is self:
                # A batch whose flush was cut short as it began (an exception
                # from a signal handler, such as Ctrl-C's KeyboardInterrupt,
                # at the function's start) would hold this loop's calls for
                # good; handed over early, it is only handed over sooner.
                self._flush(channel)
            with self._lock:
                if self._state is not PoolState.OPEN or not (self._pending or self._unstarted):
                    self._armed.discard(channel)
                    return
                was_starting = self._starting
                try:
                    full, clocks = self._grow(loop, due, clocks, to_start)
                    if (
                        self._want_started(to_start, now=monotonic())
                        if to_start
                        else (self._late_start(monotonic()))
                    ):
                        # Taken with no call in between: see the except clause.
                        starter = self._unstarted[0]
                        del self._unstarted[0]
                except BaseException:
                    # An exception from a signal handler: every step above
                    # leaves the calls either pending or dispatched; the new
                    # threads and a start it claimed are given up.
                    self._undo_starts(to_start, starter, was_starting)
                    raise
            period = FULL_PERIOD if full else GROWTH_PERIOD
            if starter is not None and not self._start_or_give_up(starter):
                with self._lock:
                    if self._workers or not self._pending or self._state is not PoolState.OPEN:
                        # The calls that were to run in the new threads wait
                        # for a busy one (_serve_backlog). No retry every
                        # period (and a log line each time): the next call
                        # that waits arms the check again.
                        self._armed.discard(channel)
                        return
                # No thread is left to come free: only a check starts one for
                # the calls, so this one goes on, a little later.
                period = START_RETRY
        except BaseException:
            # Cut short by an exception from a signal handler: the claimed
            # start is settled, and the check goes on (still armed), or the
            # calls it is there for could wait for good.
            with self._lock:
                waiters = self._settle_start(starter)
            for waiter in waiters:
                complete_waiter(waiter)
            due = loop.time() + period
            loop.call_at(due, self._rebalance, channel, loop, due, clocks)
            raise
        due = loop.time() + period
        loop.call_at(due, self._rebalance, channel, loop, due, clocks)

    def _grow(
        self,
        loop: asyncio.AbstractEventLoop,
        due: float,
        clocks: GilClocks | None,
        to_start: list[Worker],
    ) -> tuple[bool, GilClocks | None]:
        # Under _lock, the body of _rebalance: measure the running calls and
        # dispatch pending ones into the slots they free (new workers go to
        # to_start). Returns whether the pool is full, and the GIL clocks.
        now = monotonic()
        # A call that ended within a period since the last look means a
        # thread cycles through short calls: it takes the pending ones
        # itself, faster than new threads would, so none is started.
        room = len(self._idle) + (
            0 if self._short else max(0, self._max_workers - len(self._workers))
        )
        self._short = False
        # Every thread busy and none to start: nothing can be dispatched
        # until a thread comes free, and one that ends a call takes the
        # pending ones itself. The check still measures the running calls
        # (a call presumed to wait may compute, and must get its slot
        # back), but less often: each look wakes the loop, and reads the
        # kernel with the GIL handed away.
        full = not self._idle and len(self._workers) >= self._max_workers and not self._unstarted
        for w in self._workers:
            if w.call is None:
                continue  # idle: not waiting (cleared as its last call ended)
            waiting = w.is_waiting(now, GROWTH_PERIOD, self._running)
            if waiting is not w.waiting:
                w.waiting = waiting
                self._waiting += 1 if waiting else -1
                if not waiting:
                    w.presumed = False
                    self._waits.remember(w.call, False)
            if waiting and self._gil_calls:
                # A GIL-holding call that waits (for a lock, an I/O, or a
                # nested call of its own function) holds no GIL: the next
                # such call may start, or a nested one would never run.
                self._gil_calls.discard(w.call)
        late = loop.time() - due > LAG_LIMIT
        if GIL_ENABLED:
            # Read together, without giving the GIL away in between
            # (``now`` is older: reading the workers above did).
            read = GilClocks(monotonic(), thread_time(), process_time())
            if clocks is not None and (self._gil_fns or self._running - self._waiting >= 2):
                judge_gil(
                    self._workers,
                    self._gil_calls,
                    self._gil_fns,
                    now,
                    waiting_share(self._cpu_slots),
                    clocks.since(read, late=late),
                )
            clocks = read
        free = self._cpu_slots - (self._ready + self._running - self._waiting)
        if room > 0 and late:
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
                if w.waiting and (w.waited_a_window() or w.sleeps_outside_futex(now))
            )
            free = min(free, self._cpu_slots - (self._ready + self._running - sure))
        while free > 0 and room > 0 and self._pending:
            i = self._pending_index()
            if i < 0:
                break  # the rest must wait for the GIL-holding call to end
            self._dispatch(i, to_start)
            free -= 1
            room -= 1
        return full, clocks

    def _check_later(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        # On the loop, armed by _serve_backlog: calls went back to _pending
        # with no thread left after a start failed; check them START_RETRY
        # from now.
        due = loop.time() + START_RETRY
        loop.call_at(due, self._rebalance, channel, loop, due)

    def _dispatch(self, i: int, to_start: list[Worker]) -> None:
        # Under _lock: hand the pending call _pending[i] to the thread that
        # went idle last, or put it on the queue for a new one (added to
        # to_start). _submit does the same inline: it runs once per call.
        # The steps that move the call, count it and take or register its
        # thread make no call and take no jump, so that an exception from a
        # signal handler (Ctrl-C's KeyboardInterrupt) comes before them all
        # (the call is still pending) or after them all: a thread taken off
        # the idle stack and never woken, or a call taken out of _pending
        # and never dispatched, would be lost for good. ``+=`` registers the
        # new worker, as ``append`` is a call.
        pending = self._pending
        call = pending[i]
        holds = bool(self._gil_fns) and self._gil_fns.holds(call.fn)
        idle = self._idle
        if idle:
            worker = idle[-1]
            del idle[-1]
            del pending[i]
            self._ready += 1
            worker.hand = call
            worker.wake.release()
        else:
            worker = Worker()
            del pending[i]
            self._workers += (worker,)
            to_start += (worker,)
            self._ready += 1
            self._queue.put(call)  # under the lock, as in _submit
        if holds:
            # After the hand-over: a call here must not be pending (gil.py);
            # one missed only runs beside another call of its function.
            self._gil_calls.add(call)

    def _pending_index(self) -> int:
        # Under _lock: where in _pending the first call that may run now is
        # (-1: none), once the calls cancelled at its front are dropped. It
        # stays there until dispatched (_dispatch). While a call known to
        # hold the GIL runs (or is on its way to a thread), a call of a
        # function known to hold it must wait (gil.py): the first other one
        # among the next GIL_SCAN goes instead.
        pending = self._pending
        while pending and pending[0]._phase is not QUEUED:
            pending.popleft()  # cancelled while pending
        if not pending:
            return -1
        if not (self._gil_calls and self._gil_fns):
            return 0
        memory = self._gil_fns
        holds = memory.holds
        for i in range(min(len(pending), GIL_SCAN)):
            call = pending[i]
            if call._phase is QUEUED and not holds(call.fn):
                return i
        # Now and then one goes anyway, to see whether its function still
        # contends for the GIL beside the one that runs (gil.py: probes).
        if may_probe(memory, self._gil_calls, self._workers, pending[0].fn, monotonic()):
            return 0
        return -1

    def _start_or_give_up(self, starter: Worker) -> bool:
        # On the loop: start the thread of a wanted worker (which starts the
        # others); returns False if it could not. Whether the loop's check
        # goes on is for the check itself to decide (_rebalance): a check
        # armed for the loop of a batch that starts a thread (_flush) is
        # scheduled whatever the start does, and stays in _armed until it
        # ends, or the loop's next waiting call would arm another.
        try:
            self._start_thread(starter, starts_others=True)
        except BaseException as exc:
            # Their calls wait in the queue for an idle or busy thread
            # (_start_thread counted each in _backlog), or, with none left,
            # in _pending for a check (_serve_backlog). Unless the thread
            # runs (interrupted as start() waited for it): it starts them.
            with self._lock:
                if starter.launch == 0:  # interrupted before its start
                    starter.launch = -1
                    self._lose_thread(starter)
                waiters = self._give_up_starting() if starter.launch < 0 else []
            for waiter in waiters:
                complete_waiter(waiter)
            if not isinstance(exc, Exception):
                raise
            self._start_failed()
            return False
        return True

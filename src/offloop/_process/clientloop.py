"""The event loop a :class:`~offloop.DaskPool` runs its Dask client on, in a thread of its own.

A Dask client does real work on the loop it lives on: it builds and
serialises every task, frames and writes its messages to the scheduler,
reads and deserialises the replies. On the caller's loop that work stalls
every other task for as long as it takes (a burst of calls with megabyte
arguments: hundreds of milliseconds). So the pool keeps its client on a
loop in a daemon thread, ``offloop-dask-<n>``, and the caller's loop only
queues calls and receives results, batched (``_core/offload.py``'s
``Channel``).

``_process`` may not import ``_loops``, whose ``LoopThread`` would do: this
is the few lines of it that a pool needs (start, run a coroutine from another
thread, stop and join), with no public surface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

__all__ = ["ClientLoop", "GILPacer"]

R = TypeVar("R")

#: Seconds the thread's start may take before the pool gives up on it.
START_TIMEOUT: Final = 10.0


#: Seconds of back-to-back work after which the client's thread hands the GIL over.
PACE_SLICE: Final = 0.002
#: Seconds it then sleeps, so that a thread waiting for the GIL takes it.
PACE_SLEEP: Final = 0.0001


class GILPacer:
    """Makes a storm of submissions on the client's thread give the GIL away now and then.

    A burst of calls makes the client's thread submit them back to back,
    about a millisecond of Python each. CPython's switch interval does not
    bound how long the caller's loop then waits for the GIL: every system
    call of the submitting thread (a socket write, ``os.urandom`` for a task
    key) releases the GIL and takes it straight back, before the woken
    waiter runs, and each such release restarts the waiter's interval. So
    the loop can wait for the whole storm. A short sleep releases the GIL
    for long enough for a waiting thread to take it. It changes nothing
    process-wide (no switch interval), and costs a submission storm about
    5 %.
    """

    __slots__ = ("_last", "_started")

    def __init__(self) -> None:
        self._started = self._last = 0.0

    def pace(self) -> None:
        """Call before each submission, on the client's thread."""
        now = time.perf_counter()
        if now - self._last > PACE_SLICE:
            self._started = now  # the thread rested since the last one: a new storm
        elif now - self._started > PACE_SLICE:
            time.sleep(PACE_SLEEP)
            now = self._started = time.perf_counter()
        self._last = now


class ClientLoop:
    """An asyncio loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The thread, once started (``None`` before)."""
        return self._thread

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the thread and return its loop, running (once; later calls return it)."""
        if self.loop is not None:
            return self.loop
        ready = threading.Event()
        box: list[asyncio.AbstractEventLoop] = []
        thread = threading.Thread(
            target=self._serve, args=(ready, box), name=self._thread_name, daemon=True
        )
        thread.start()
        # Thread.start() already waited for the thread to begin; the loop is
        # created first thing there, so this wait is as short.
        if not ready.wait(START_TIMEOUT):  # pragma: no cover - a machine out of threads
            raise RuntimeError(f"the thread {self._thread_name!r} did not start")
        self._thread = thread
        self.loop = box[0]
        return self.loop

    def run(self, coro_fn: Callable[[], Coroutine[Any, Any, R]]) -> concurrent.futures.Future[R]:
        """Run ``coro_fn()`` on the loop; its outcome in a ``concurrent.futures.Future``.

        The coroutine is created on the loop, so none is left never awaited
        when the loop is already stopping.
        """
        loop = self.loop
        assert loop is not None
        outcome: concurrent.futures.Future[R] = concurrent.futures.Future()

        def begin() -> None:
            if not outcome.set_running_or_notify_cancel():
                return
            task = loop.create_task(coro_fn())

            def done(task: asyncio.Task[R]) -> None:
                if task.cancelled():
                    outcome.set_exception(asyncio.CancelledError())
                elif (error := task.exception()) is not None:
                    outcome.set_exception(error)
                else:
                    outcome.set_result(task.result())

            task.add_done_callback(done)

        loop.call_soon_threadsafe(begin)
        return outcome

    def stop(self) -> None:
        """Stop the loop (what runs on it is cancelled) and wait for the thread to end."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # it stopped already
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join()

    @staticmethod
    def _serve(ready: threading.Event, box: list[asyncio.AbstractEventLoop]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        box.append(loop)
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                # What is left (a call whose pool was dropped unclosed) ends here.
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

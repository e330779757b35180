"""The blocking entry point: own an event loop, turn SIGINT/SIGTERM into a graceful stop.

The first signal asks the supervisor to stop (bounded by its ``grace``); a
second one means the user has run out of patience, so the process exits at
once with ``128 + signal number`` (the shell's convention for "killed by").

The handlers are plain ``signal.signal`` handlers, not the loop's: those run
only when the loop gets a turn, so a coroutine blocking the loop (the very
bug offloop exists for) would make the process deaf to Ctrl-C. A Python handler runs on
the main thread between bytecodes even then; and a watchdog thread ends the
process if the stop has not finished ``grace`` (plus a margin) after the
first signal, naming the line the loop is stuck on.

The loop's default executor (``asyncio.to_thread``, ``run_in_executor(None,
...)``) is an offloop pool of daemon threads: a call stuck there when the
loop closes is abandoned and logged, instead of keeping the process alive
after ``run()`` returned, as asyncio's executor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, Final, Protocol

from .._core.forcedexit import run_forced_exit_hooks
from .._loops.shutdown import shut_down
from .._threads.executor import PoolExecutor
from .supervised import SHUTDOWN_OVERRUN

__all__ = ["SignalTarget", "run_with_signals"]

logger: Final = logging.getLogger("offloop.supervisor")

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

#: How long the tasks left on the loop get to end once cancelled, when ``main()``
#: ended without a shutdown deadline. After a supervisor's shutdown they get
#: what is left of its bound (``grace`` plus its overrun) instead: a task that
#: swallows its cancellation must not make ``run()`` outlast that bound.
LEFTOVER_WAIT: Final = 1.0

#: Seconds past ``grace`` before a stop that has not finished ends the process:
#: the supervisor's own overrun (the last chances and kills after grace), room
#: for the leftover wait, and a second for a loaded machine. No slower shutdown
#: is graceful any more, so it is taken for a blocked loop.
FORCE_MARGIN: Final = SHUTDOWN_OVERRUN + LEFTOVER_WAIT + 1.0

#: Seconds a forced exit waits for its last log line and the flushes of the
#: log handlers and standard streams before it exits without them.
LAST_WORDS_WAIT: Final = 0.5

#: Seconds the first signal's handler waits for its log line, so that the line
#: comes before those of the stop, and ``run_with_signals`` waits for it before
#: it returns. Only a log call that blocks (a full stderr pipe) takes that long.
ORDER_WAIT: Final = 1.0


class SignalTarget(Protocol):
    """What ``run_with_signals`` needs of the Supervisor it stops on a signal."""

    name: str
    grace: float
    #: Loop time by which its shutdown has ended, once it has begun (else None).
    _stop_deadline: float | None

    def _request_stop_threadsafe(self, reason: str, *, defer: bool = False) -> None: ...


def run_with_signals(
    sv: SignalTarget,
    main: Callable[[], Awaitable[None]],
    *,
    on_forced_exit: Callable[[], None] | None = None,
) -> int:
    """Run ``main()`` on a new loop with SIGINT/SIGTERM stopping ``sv``; return 0.

    ``on_forced_exit`` runs just before a forced exit (a second signal, or the
    watchdog), which skips every cleanup: say, to show the terminal's cursor
    again. It runs in a signal handler or the watchdog thread, so it must not
    take a lock (the loop's thread may hold it); its errors are ignored.

    Raises:
        RuntimeError: called from a thread whose event loop is running.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            f"{sv!r}.run() was called from a running event loop; it would need to block "
            f"that loop. Use 'await sv.serve()' in async code instead."
        )
    loop = asyncio.new_event_loop()
    loop.set_default_executor(PoolExecutor("executor"))
    received: list[int] = []
    finished = threading.Event()
    watchdogs: list[threading.Thread] = []
    log_lines: list[threading.Event] = []
    main_ident = threading.get_ident()

    def watchdog(signum: int, deadline: float) -> None:  # on its own thread
        # It logs nothing before its timer runs out: a log reader that stopped
        # reading (a full stderr pipe) blocks every log call, and this timer
        # is what bounds the stop then.
        name = signal.Signals(signum).name
        if finished.wait(max(deadline - time.monotonic(), 0.0)):
            return
        frame = sys._current_frames().get(main_ident)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        del frame
        _force_exit(
            signum,
            on_forced_exit,
            lambda: logger.error(
                "%s: still not stopped %gs after %s; the event loop is probably blocked, "
                "exiting now. The main thread is at:\n%s",
                sv.name,
                sv.grace + FORCE_MARGIN,
                name,
                where.rstrip(),
            ),
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:  # on the main thread
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            deadline = time.monotonic() + sv.grace + FORCE_MARGIN
            # Only schedules the stop on the loop and wakes it: safe in a handler.
            sv._request_stop_threadsafe(f"received {name}", defer=True)
            thread = threading.Thread(
                target=watchdog,
                args=(signum, deadline),
                name="offloop-signal-watchdog",
                daemon=True,
            )
            watchdogs.append(thread)
            thread.start()
            # Not logged in the handler (which may interrupt a log call) nor on
            # the loop (which may be blocked), but waited for a moment, so that
            # the line comes before those of the stop.
            logged = _log_in_background(
                lambda: logger.warning(
                    "%s: received %s, stopping gracefully within %gs (send it again to exit "
                    "at once)",
                    sv.name,
                    name,
                    sv.grace,
                )
            )
            log_lines.append(logged)
            logged.wait(ORDER_WAIT)
            return
        _force_exit(
            signum,
            on_forced_exit,
            lambda: logger.error("%s: received %s again, exiting now", sv.name, name),
        )

    previous: dict[signal.Signals, Any] = {}
    wakeup = None
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            # Ignored when the process started (nohup, a background job of a
            # non-interactive shell): the parent meant it, so it stays ignored,
            # as Python itself keeps an ignored SIGINT ignored.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, on_signal)
        _say_which_signals_are_ignored(sv.name, [s for s in SIGNALS if s not in previous])
        wakeup = _Wakeup(loop)
    else:
        # Only the main thread can handle a signal: a Ctrl-C then raises
        # KeyboardInterrupt there, and ends the program without this stop
        # unless the program calls stop() itself. Said once, at INFO: running
        # in a thread, with the program stopping it, is a documented use.
        logger.info(
            "%s: run() in thread %r, not the main thread: it does not handle SIGINT or "
            "SIGTERM (only the main thread can). Call sv.stop() where the program gets "
            "them (on KeyboardInterrupt in the main thread, say) for a graceful stop.",
            sv.name,
            threading.current_thread().name,
        )
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        return 0
    finally:
        try:
            # Bounded, unlike asyncio.run(): a task that swallows cancellation
            # must not keep the process alive after the supervisor said it
            # stopped. Nor is the default executor waited for (see the module
            # docstring): loop.close() abandons its stuck calls.
            shut_down(
                loop,
                sweeps=1,
                on_raised=functools.partial(_log_raised, sv.name),
                wait=_leftover_wait(loop, sv._stop_deadline),
                on_ignored=functools.partial(_log_abandoned, sv.name),
            )
        finally:
            finished.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if wakeup is not None:
                wakeup.close()
            for thread in watchdogs:
                thread.join()  # it saw `finished` and returns now
            for logged in log_lines:
                logged.wait(ORDER_WAIT)  # a daemon thread's line must not be lost at exit
            asyncio.set_event_loop(None)
            loop.close()


def _say_which_signals_are_ignored(name: str, ignored: list[signal.Signals]) -> None:
    # A 'kill -INT' to a background job that ignores it does nothing at all:
    # say so once, with what does work, rather than leave the user guessing.
    if not ignored:
        return
    pid = os.getpid()
    why = "started with it ignored (a background job of a shell, nohup)"
    if ignored == [signal.SIGINT]:
        logger.warning(
            "%s: SIGINT is ignored: this process %s, so Ctrl-C and 'kill -INT' do nothing. "
            "Stop it with SIGTERM ('kill %d').",
            name,
            why,
            pid,
        )
    elif ignored == [signal.SIGTERM]:
        logger.warning(
            "%s: SIGTERM is ignored: this process %s, so 'kill %d' does nothing. Stop it "
            "with SIGINT (Ctrl-C, or 'kill -INT %d').",
            name,
            why,
            pid,
            pid,
        )
    else:
        logger.warning(
            "%s: SIGINT and SIGTERM are ignored: this process started with them ignored "
            "(nohup, a background job), so only stop() or SIGKILL ('kill -KILL %d', which "
            "skips the graceful stop) ends it.",
            name,
            pid,
        )


class _Wakeup:
    """Wakes the idle loop when a signal arrives, whichever thread the kernel picked.

    A Python signal handler runs only when the main thread executes bytecode.
    A process-directed signal may land on another thread, leaving the main
    thread asleep in the selector: the wakeup fd (written by the C-level
    handler) makes the selector return, and the handler then runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        loop.add_reader(self.reader.fileno(), self._drain)
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.reader.fileno())
        self.reader.close()
        self.writer.close()


def _log_raised(name: str, task: asyncio.Task[Any]) -> None:
    logger.error(
        "%s: task %s raised while stopping", name, task.get_name(), exc_info=task.exception()
    )


def _log_abandoned(name: str, task: asyncio.Task[Any]) -> None:
    logger.warning("%s: abandoned task %s, which ignores cancellation", name, task.get_name())


def _leftover_wait(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float:
    # What remains of the shutdown's bound (grace plus the overrun), not a
    # fixed extra: a task that swallows cancellation must not stretch the
    # documented bound. Zero still runs the loop once, so each cancelled task
    # gets its first step and a plain `finally:` clause always runs.
    return LEFTOVER_WAIT if deadline is None else max(deadline - loop.time(), 0.0)


def _force_exit(
    signum: int, on_forced_exit: Callable[[], None] | None, last_words: Callable[[], None]
) -> None:
    # The last log line and the flushes get a bounded time: a timer exits
    # without them if they block (a full stderr pipe). They are written from
    # this thread, not handed to another one: in a signal handler, the main
    # thread may be inside a log call, holding the handler's lock, which only
    # it can take again.
    exited = threading.Lock()

    def exit_now() -> None:
        if not exited.acquire(blocking=False):
            return  # the other one is exiting
        if on_forced_exit is not None:
            with contextlib.suppress(Exception):
                on_forced_exit()
        # Kills isolate='process' children, among others: os._exit skips every cleanup.
        os._exit(run_forced_exit_hooks(128 + signum))

    timer = threading.Timer(LAST_WORDS_WAIT, exit_now)
    timer.daemon = True
    try:
        timer.start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        exit_now()
    with contextlib.suppress(Exception):
        last_words()
    _flush()
    exit_now()
    # The timer won the race and is exiting the process: wait for it.
    threading.Event().wait()


def _log_in_background(emit: Callable[[], None]) -> threading.Event:
    """Run ``emit`` (a log call) on a daemon thread; the event is set once it returned."""
    done = threading.Event()

    def run() -> None:
        try:
            with contextlib.suppress(Exception):
                emit()
        finally:
            done.set()

    try:
        threading.Thread(target=run, name="offloop-signal-log", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        done.set()
    return done


def _flush() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("offloop").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()

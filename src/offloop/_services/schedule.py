"""Services that run a function on a schedule: ``@sv.every`` and ``@sv.cron``.

One :class:`ScheduledService` drives both. A *plan* (``periodic.py``'s
:class:`~offloop._services.periodic.EveryPlan`, ``cron.py``'s
:class:`~offloop._services.cron.CronPlan`) says when runs are due; the
service sleeps on a :class:`Clock` until the next due time and starts a run
there. The next due time always comes from the plan, never from the end of
the last run, so a slow run or a late wake-up does not push the schedule back.

Each run is one call of the function: an ``async def`` as a task on the
supervisor's loop, a plain ``def`` in a thread of its own (named
``offloop-service-<name>``) with the service's :class:`~offloop.StopToken`.
A run that raises ends the service's run as a crash, so the supervisor's
restart policy applies. A restart goes on with the schedule's grid if a run
had worked before (the next run comes when due), and begins a fresh schedule
otherwise.

Missed runs: a due time reached more than ``plan.window(due)`` late (the
program was blocked, or the machine asleep) is *missed*. ``missed="skip"``
drops it and waits for the next due time; ``missed="run_once"`` makes up for
all the missed ones with one run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Final, Literal

from .._core.errors import OffloopError
from .._core.token import StopToken, WorkerCall, thread_state
from .._core.validate import describe
from .base import ServiceInterrupted, supervisor_name
from .functions import FunctionService, describe_task, describe_thread
from .lifecycle import LifecycleState, log_abandoned_end
from .plan import MISSED_AFTER, Clock, LoopClock, Plan, ScheduleStatus

__all__ = [
    "MISSED_AFTER",
    "Clock",
    "LoopClock",
    "Missed",
    "Overlap",
    "Plan",
    "ScheduleStatus",
    "ScheduledService",
]

logger: Final = logging.getLogger("offloop.supervisor")

Overlap = Literal["skip", "queue", "allow"]
Missed = Literal["skip", "run_once"]


class _Run:
    """One call of the function: its task or thread."""

    __slots__ = ("abandoned", "began", "cancelled", "task", "thread")

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.task: asyncio.Task[None] | None = None
        self.thread: threading.Thread | None = None
        # What kill() abandoned ("thread 'offloop-service-x'"), for the log when it ends.
        self.abandoned: str | None = None
        # It ended by a cancellation as the service stopped.
        self.cancelled = False


class ScheduledService(FunctionService):
    """Runs a function whenever its plan says a run is due; see the module's docstring."""

    _CLEAN_END = LifecycleState.ENDED

    def __init__(
        self,
        fn: Callable[..., object],
        name: str,
        plan: Plan,
        *,
        is_async: bool,
        pass_token: bool,
        overlap: Overlap,
        missed: Missed,
        jitter: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(fn, name)
        self.plan = plan
        self.is_async = is_async
        self.pass_token = pass_token
        self.overlap: Overlap = overlap
        self.missed: Missed = missed
        self.jitter = jitter
        self.clock: Clock = clock if clock is not None else LoopClock()
        self._rng = random.Random()
        self._runs: set[_Run] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._queued = False
        self._next: float | None = None
        # Why the current service run is ending: None while it goes on.
        self._ending: list[BaseException | None] | None = None
        self._count = self._missed = self._overlapped = 0
        self._missed_exact = True
        self._last_duration: float | None = None
        self._last_error: BaseException | None = None
        # Whether a run has ended without an error, and whether the next start
        # goes on with the schedule's grid (set as such a schedule crashes).
        self._succeeded = self._resume = False
        self._failures = 0
        self._last_success: float | None = None
        # Whether due times have been finding the last run still going since
        # the last run that started on time (see _overlapped_run).
        self._overlapping = False

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self._state.value} "
            f"{self.plan.describe()} fn={describe(self.fn)}>"
        )

    @property
    def schedule(self) -> ScheduleStatus:
        """A snapshot of the schedule and the runs so far."""
        wall = self._next if self._state is LifecycleState.RUNNING else None
        return ScheduleStatus(
            self.plan.describe(),
            wall,
            self._count,
            self._missed,
            self._overlapped,
            self._last_duration,
            self._last_error,
            missed_exact=self._missed_exact,
            failures=self._failures,
            last_success=self._last_success,
        )

    # -- the service's run -----------------------------------------------------------------

    async def start(self) -> None:
        self._begin()
        self._token = StopToken()
        self._ending, self._queued = None, False
        self._cancelled_by_loop = False
        self._scheduler = asyncio.get_running_loop().create_task(
            self._schedule(), name=f"offloop-schedule-{self.name}"
        )
        # Once the scheduler is done, the service's run ends with its last run.
        self._scheduler.add_done_callback(self._scheduler_done)
        self._ready()

    async def stop(self) -> None:
        self._resume = False  # stopped, not crashed: the next start is a fresh one
        done = self._mark_stopping()
        if done is None:
            return
        # Runs the loop's end cancelled already are waited for, not cancelled
        # again in the middle of their cleanup.
        self._wind_down(None, cancel_runs=not self._cancelled_by_loop)
        await asyncio.wait({done})

    def has_worked(self) -> bool:
        # A run that returned: a crash of a later one, however soon, is no
        # failure to start (a job every 0.5 s would otherwise fail the program
        # when its second run met an outage).
        return self._succeeded

    def live_threads(self) -> list[threading.Thread]:
        return [
            run.thread
            for run in list(self._runs)
            if run.thread is not None and run.thread.is_alive()
        ]

    def kill(self) -> list[str]:
        self._wind_down(None)
        # What is still going on is abandoned: the service's run ends without it
        # (start() may follow at once, in a cascade), and _run_ended only logs
        # its end. A thread is abandoned now; a task, which _wind_down just
        # cancelled again, once it had the step in which it may honour that.
        abandoned = []
        tasks = False
        for run in list(self._runs):
            if run.thread is not None and run.thread.is_alive():
                abandoned.append(describe_thread(run.thread))
                self._drop(run, f"thread {run.thread.name!r}")
            elif run.task is not None and not run.task.done():
                tasks = True
        if tasks:
            asyncio.get_running_loop().call_soon(self._abandon_deaf_tasks)
        self._finish_if_idle()
        return abandoned

    def _drop(self, run: _Run, what: str) -> None:
        run.abandoned = what
        self._runs.discard(run)

    def _abandon_deaf_tasks(self) -> None:
        for run in list(self._runs):
            if run.task is not None and not run.task.done():
                self._drop(run, f"task {run.task.get_name()!r}")
                logger.warning(
                    "%s: service %r abandoned %s",
                    supervisor_name(self),
                    self.name,
                    describe_task(run.task),
                )
        self._finish_if_idle()

    def _wind_down(self, error: BaseException | None, *, cancel_runs: bool = True) -> None:
        """End the service's run: no new runs; stop those going on; finish once they ended."""
        if self._ending is None:
            self._ending = [error]
        self.signal_stop("service stopping" if error is None else "a run of it crashed")
        scheduler = self._scheduler
        if scheduler is not None and not scheduler.done():
            scheduler.cancel("offloop service stopping")
        for run in list(self._runs):
            if run.task is not None and cancel_runs:
                run.task.cancel("offloop service stopping")
        self._finish_if_idle()

    def _finish_if_idle(self) -> None:
        scheduler = self._scheduler
        if self._ending is None or self._runs or (scheduler is not None and not scheduler.done()):
            return
        done = self._done
        if done is not None:
            self._next = None
            self._finish(done, self._ending[0])

    def _scheduler_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: it is the service's error, kept in _ending
        self._finish_if_idle()

    async def _schedule(self) -> None:
        clock, plan = self.clock, self.plan
        try:
            # Restarted after a crash of a schedule that had worked: a failure
            # of the outside world (an API that is down), most likely. Its next
            # run comes when due, as with the peers' schedulers, not at once:
            # run at the restart's pace, it would use up the restart budget in
            # seconds and fail the program for a short outage. A schedule that
            # never worked starts afresh, so a broken job fails fast.
            resume, self._resume = self._resume, False
            due = plan.after(clock.now()) if resume else plan.first(clock.now())
            while True:
                # As wall-clock time, computed here on the loop: status() may be
                # asked from any thread, and the loop's clock needs its loop.
                self._next = clock.to_wall(due)
                delay = self._rng.uniform(0, self.jitter) if self.jitter else 0.0
                woke = await clock.sleep_until(due + delay)
                if woke < due + delay:
                    due = self._after_set_back(due, woke - delay)
                    continue
                now = max(clock.now(), due)
                nxt = plan.after(now)
                self._next = clock.to_wall(nxt)
                # The latest due time already reached: it runs if it is on time.
                latest = plan.latest(due, now)
                on_time = now - latest <= plan.window(latest) + delay
                if on_time or self.missed == "run_once":
                    self._launch(on_time=on_time)
                # Counted once the run is launched: after a long sleep the count
                # takes a while (it gives the loop back as it goes), and the run
                # due now does not wait for it.
                passed, exact = await plan.count(due, latest)
                self._note_missed(passed + (0 if on_time else 1), exact, on_time)
                due = nxt
        except Exception as e:  # a plan that failed (a bug): the service's run crashes
            if self._ending is None:
                self._ending = [e]
            raise
        finally:
            self._next = None
            if self._ending is None:
                self._ending = [None]

    def _after_set_back(self, due: float, same: float) -> float:
        """The next due time once the clock was set back: ``due`` reads ``same`` on it now.

        The run comes at the first due time from that instant on, as the
        clock now reads it: not sooner than it would have come, so a clock set
        back a little after a run does not repeat the run, and not later, so
        a clock that was set ahead (a machine that booted with its clock in
        the future, then NTP set it right) does not hold the runs back for as
        long as it was ahead: as systemd's calendar timers go on from the
        time the clock reads (systemd issue #6036).
        """
        now = self.clock.now()
        # Due times are whole seconds: one just before `same` is that instant,
        # give or take how precisely the set-back was measured. Noticed after
        # that instant (the set-back came in the last nap before the due
        # time, or the loop was blocked), a due time since then is due now:
        # after(now) would skip it and push the run back a whole period.
        nxt = self.plan.after(max(same, now) - 1.0)
        logger.warning(
            "%s: service %r: the clock was set back by %.0fs; the next run of %s comes "
            "in %.0fs, at its due time by the clock as it reads now",
            supervisor_name(self),
            self.name,
            due - same,
            self.plan.describe(),
            nxt - now,
        )
        return nxt

    def _note_missed(self, missed: int, exact: bool, on_time: bool) -> None:
        if not missed:
            return
        self._missed += missed
        catch_up = (
            "; running once now to make up" if not on_time and self.missed == "run_once" else ""
        )
        if exact:
            logger.warning(
                "%s: service %r missed %d run(s) of %s (the program was blocked or asleep)%s",
                supervisor_name(self),
                self.name,
                missed,
                self.plan.describe(),
                catch_up,
            )
            return
        self._missed_exact = False
        logger.warning(
            "%s: service %r missed at least %d run(s) of %s (the program was blocked or "
            "asleep; the count stops there)%s",
            supervisor_name(self),
            self.name,
            missed,
            self.plan.describe(),
            catch_up,
        )

    def _overlapped_run(self) -> None:
        # A job slower than its schedule runs less often than the schedule
        # says, which the status alone would keep quiet about. Said once per
        # streak: a job that is always slower would say it at every due time.
        running = max((time.perf_counter() - r.began for r in self._runs), default=0.0)
        logger.warning(
            "%s: service %r: a run of %s came due while the last one was still running "
            "(for %.1fs); %s. The job is slower than its schedule: this is said again only "
            "after a run starts on time (the count is in the status: schedule.overlapped)",
            supervisor_name(self),
            self.name,
            self.plan.describe(),
            running,
            "it was skipped (overlap='skip')"
            if self.overlap == "skip"
            else "it runs once the last one ends (overlap='queue')",
        )

    # -- one run ---------------------------------------------------------------------------

    def _launch(self, *, on_time: bool) -> None:
        # ``on_time``: at its due time (not late, not a queued run started as
        # the last one ended): only such a run ends a streak of overlaps.
        if self._runs and self.overlap != "allow":
            self._overlapped += 1
            if self.overlap == "queue":
                self._queued = True
            if not self._overlapping:
                self._overlapping = True
                self._overlapped_run()
            return
        if on_time:
            self._overlapping = False
        run = _Run()
        self._runs.add(run)
        loop = asyncio.get_running_loop()
        if self.is_async:
            run.task = loop.create_task(self._run_async(run), name=f"offloop-run-{self.name}")
        else:
            token = self._token
            assert token is not None
            # Each run gets a copy of the schedule's context variables, as each
            # async run's task does and as offloop.to_thread gives each call.
            run.thread = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._run_sync, run, loop, token),
                name=f"offloop-service-{self.name}",
                daemon=True,
            )
            run.thread.start()

    async def _run_async(self, run: _Run) -> None:
        began = time.perf_counter()
        error: BaseException | None = None
        try:
            result = self.fn()
            assert inspect.isawaitable(result)
            await result
        except asyncio.CancelledError:
            run.cancelled = True
            if self._ending is None and not _cancel_requested():
                # Cancelled by the function itself: a crash. A cancel asked
                # from outside before the stop began is the loop's end
                # (asyncio.run cancels every task): the stop follows it.
                error = OffloopError(f"A run of service {self.name!r} was cancelled.")
        except KeyboardInterrupt as e:
            error = ServiceInterrupted(
                f"Service {self.name!r} raised KeyboardInterrupt, so its supervisor stops "
                f"every service, as on Ctrl-C."
            )
            error.__cause__ = e
        except Exception as e:
            error = e
        except BaseException as e:  # SystemExit: a crash of this service only
            error = OffloopError(f"A run of service {self.name!r} raised {e!r}.")
            error.__cause__ = e
        self._run_ended(run, time.perf_counter() - began, error)

    def _run_sync(self, run: _Run, loop: asyncio.AbstractEventLoop, token: StopToken) -> None:
        thread_state.call = WorkerCall(self.fn, loop, token)
        began = time.perf_counter()
        error: BaseException | None = None
        try:
            result = self.fn(token) if self.pass_token else self.fn()
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(
                    f"Service {self.name!r}: {describe(self.fn)} returned a coroutine; define "
                    f"it with 'async def' so that its runs happen on the event loop."
                )
        except Exception as e:
            error = e
        except BaseException as e:  # SystemExit etc.: a crash of this service only
            error = OffloopError(f"A run of service {self.name!r} raised {e!r} in its thread.")
            error.__cause__ = e
        finally:
            thread_state.call = None
        took = time.perf_counter() - began
        # RuntimeError: the loop is closed; the supervisor abandoned this thread.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._thread_ended, run, took, error)

    def _thread_ended(self, run: _Run, took: float, error: BaseException | None) -> None:
        if run.thread is not None:
            # It only has to return from _run_sync: "no thread outlives its service".
            run.thread.join(1.0)
        self._run_ended(run, took, error)

    def _run_ended(self, run: _Run, took: float, error: BaseException | None) -> None:
        if run not in self._runs:
            # Abandoned by kill(): the service's run it belonged to has ended.
            if run.abandoned is not None:
                log_abandoned_end(self, run.abandoned, error, cancelled=run.cancelled)
            return
        self._runs.discard(run)
        self._count += 1
        self._last_duration, self._last_error = took, error
        if error is not None:
            self._failures += 1
        elif not run.cancelled and (run.thread is None or self._ending is None):
            # Not cut short by the stop (a task cancelled, a thread told by
            # its token as the service's run ended): it did its work.
            self._succeeded = True
            self._last_success = time.time()
        if error is not None and self._ending is None:
            self._resume = self._succeeded
            if self._runs:
                # overlap="allow": the supervisor hears of the crash once the
                # service's run ends, after these runs, which a thread deaf to
                # its token may put off for long. Said now, when it happened.
                logger.error(
                    "%s: service %r: a run crashed with %r; the service stops once its %d "
                    "other run(s) end",
                    supervisor_name(self),
                    self.name,
                    error,
                    len(self._runs),
                    exc_info=error,
                )
            self._wind_down(error)
            return
        if self._queued and self._ending is None:
            self._queued = False
            self._launch(on_time=False)
            return
        self._finish_if_idle()


def _cancel_requested() -> bool:
    """Whether someone asked to cancel the current task (Python 3.11+; else unknown: False)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0

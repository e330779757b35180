"""Supervisor: running services side by side, restarts, failure, status, blocking detection."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time

import pytest

import offloop
from offloop import Service, ServiceFailed, StopToken, Supervisor
from tests.helpers import QUICK_WAIT as WAIT
from tests.helpers import await_until, bounded


class Recorder(Service):
    """A hand-written service that records the supervisor's calls in a shared journal."""

    def __init__(self, name: str, journal: list[str], *, start_failures: int = 0) -> None:
        self.name = name
        self.journal = journal
        self.start_failures = start_failures
        self._ended: asyncio.Event | None = None

    async def start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.start_failures:
            self.start_failures -= 1
            raise ConnectionRefusedError(f"{self.name} cannot start")
        self._ended = asyncio.Event()

    async def wait(self) -> None:
        assert self._ended is not None
        await self._ended.wait()

    async def stop(self) -> None:
        self.journal.append(f"stop {self.name}")
        if self._ended is not None:
            self._ended.set()


@bounded(10)
async def test_services_start_in_order_and_stop_in_reverse() -> None:
    journal: list[str] = []
    sv = Supervisor(name="ordered")
    services = [sv.add(Recorder(n, journal)) for n in ("db", "api", "bot")]
    assert sv.services == {s.name: s for s in services}
    assert repr(sv) == "<Supervisor 'ordered' new (3 stopped) grace=5>"
    async with sv:
        assert journal == ["start db", "start api", "start bot"]
        assert {n: st.state for n, st in sv.status().items()} == dict.fromkeys(
            ("db", "api", "bot"), "running"
        )
        assert repr(sv) == "<Supervisor 'ordered' running (3 running) grace=5>"
        assert sv.state is offloop.SupervisorState.RUNNING
    assert journal[3:] == ["stop bot", "stop api", "stop db"]
    assert all(st.state == "stopped" for st in sv.status().values())
    assert repr(sv) == "<Supervisor 'ordered' stopped (3 stopped) grace=5>"


@bounded(10)
async def test_async_thread_and_loop_services_run_side_by_side() -> None:
    sv = Supervisor(name="mixed")
    ticks = 0
    seen: dict[str, object] = {}
    loop_service_blocks = threading.Event()
    release = threading.Event()

    @sv.service
    async def bot() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    @sv.service
    def worker(token: StopToken) -> None:
        seen["worker thread"] = threading.current_thread().name
        seen["worker token is current"] = offloop.current_token() is token
        token.wait()
        seen["worker stopped because"] = token.reason

    @sv.service(isolate="loop")
    async def stubborn_coroutine() -> None:
        seen["loop thread"] = threading.current_thread().name
        # Blocks its event loop outright: only its private loop stalls.
        loop_service_blocks.set()
        release.wait(WAIT)
        await asyncio.sleep(3600)

    main_loop = asyncio.get_running_loop()
    async with sv:
        await await_until(loop_service_blocks.is_set, WAIT, "the loop service to block")
        before = ticks
        await await_until(lambda: ticks > before + 10, WAIT, "the bot to tick meanwhile")
        assert asyncio.get_running_loop() is main_loop
        release.set()
    assert seen == {
        "worker thread": "offloop-service-worker",
        "worker token is current": True,
        "loop thread": "offloop-loop-service-stubborn_coroutine",
        "worker stopped because": "service stopping",
    }


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_isolate_thread_is_the_explicit_spelling_of_a_thread_service() -> None:
    sv = Supervisor(name="explicit")
    seen: list[str] = []

    @sv.service(isolate="thread", name="poller")
    def poll(token: StopToken) -> None:
        seen.append(threading.current_thread().name)
        token.wait()
        seen.append(f"stopped: {token.reason}")

    async with sv:
        await await_until(lambda: bool(seen), WAIT, "the thread service to start")
        assert sv.status()["poller"].state == "running"
    assert seen == ["offloop-service-poller", "stopped: service stopping"]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_thread_service_without_parameter_polls_current_token() -> None:
    sv = Supervisor()
    running = threading.Event()

    @sv.service
    def poller() -> None:
        running.set()
        offloop.current_token().wait()

    async with sv:
        await await_until(running.is_set, WAIT)
    assert sv.status()["poller"].state == "stopped"


@bounded(10)
async def test_crash_is_logged_and_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    sv = Supervisor(name="sv")
    attempts = 0
    steady = threading.Event()

    # retry_startup: crashes at once, inside its start-up window, restarted anyway.
    @sv.service(backoff=0.001, max_backoff=0.002, retry_startup=True)
    def flaky(token: StopToken) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ValueError(f"boom {attempts}")
        steady.set()
        token.wait()

    async with sv:
        await await_until(steady.is_set, WAIT)
        status = sv.status()["flaky"]
        assert status.state == "running"
        assert status.restarts == 2
        assert repr(status.last_error) == "ValueError('boom 2')"
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert [r.getMessage() for r in crashes] == [
        "sv: service 'flaky' crashed: ValueError('boom 1')",
        "sv: service 'flaky' crashed: ValueError('boom 2')",
    ]
    assert all(r.exc_info is not None and r.levelno == logging.ERROR for r in crashes)
    restarts = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert len(restarts) == 2
    assert restarts[0].startswith("sv: restarting service 'flaky' in 0.00")
    assert restarts[1].endswith("(restart #2)")
    messages = [r.getMessage() for r in caplog.records]
    for expected in (
        "sv: starting service 'flaky'",
        "sv: service 'flaky' is ready",
        "sv: stopping service 'flaky'",
        "sv: service 'flaky' stopped",
    ):
        assert expected in messages


@bounded(10)
async def test_too_many_restarts_fail_the_supervisor_with_service_failed() -> None:
    sv = Supervisor(name="sv")
    errors: list[Exception] = []
    other_stopped = threading.Event()

    @sv.service
    def steady(token: StopToken) -> None:
        token.wait()
        other_stopped.set()

    @sv.service(backoff=0, max_backoff=0, max_restarts=2, retry_startup=True)
    async def doomed() -> None:
        errors.append(KeyError(len(errors)))
        raise errors[-1]

    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    assert info.value.service == "doomed"
    assert info.value.__cause__ is errors[-1]
    assert len(errors) == 3  # the first run and two restarts
    assert str(info.value) == (
        "Service 'doomed' failed: it needed more than max_restarts=2 restarts within "
        "restart_window=60s; last error: KeyError(2)."
    )
    assert other_stopped.is_set()
    assert sv.status()["doomed"].state == "failed"
    assert sv.status()["doomed"].restarts == 2
    assert sv.status()["steady"].state == "stopped"
    assert sv.state is offloop.SupervisorState.FAILED


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_restart_no_turns_a_crash_into_failure() -> None:
    sv = Supervisor()

    @sv.service(restart="no", retry_startup=True)
    async def once() -> None:
        raise OSError("disk full")

    with pytest.raises(ServiceFailed, match="its policy is restart='no'") as info:
        await sv.serve()
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_failure_interrupts_the_async_with_body() -> None:
    sv = Supervisor()

    @sv.service(restart="no")
    async def crasher() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("crash")

    body_done = False

    async def body() -> None:
        nonlocal body_done
        async with sv:
            await asyncio.sleep(30)
            body_done = True

    with pytest.raises(ServiceFailed, match="'crasher' failed"):
        await body()
    assert not body_done
    task = asyncio.current_task()
    assert task is not None
    if hasattr(task, "cancelling"):
        assert task.cancelling() == 0  # our cancellation was taken back


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_failure_while_starting_stops_what_started() -> None:
    journal: list[str] = []
    sv = Supervisor()
    sv.add(Recorder("db", journal))
    sv.add(Recorder("api", journal, start_failures=10), restart="no")
    sv.add(Recorder("bot", journal))
    with pytest.raises(ServiceFailed, match="'api' failed") as info:
        async with sv:
            pytest.fail("the body must not run")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert journal == ["start db", "start api", "stop db"]
    assert sv.status()["bot"].state == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_an_interrupt_after_every_service_started_but_before_the_body_stops_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-C under asyncio.run on Python 3.10 raises KeyboardInterrupt
    # wherever the main thread is: in the last steps of start, no body has
    # begun, so no __aexit__ would stop what started.
    journal: list[str] = []
    sv = Supervisor()
    sv.add(Recorder("db", journal))
    sv.add(Recorder("api", journal))

    def interrupted() -> None:
        assert sv.state == "running"  # every service started
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sv, "_check_all_ended", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        async with sv:
            pytest.fail("the body must not run")
    assert journal == ["start db", "start api", "stop api", "stop db"]
    assert sv.state == "stopped"
    assert {s.state for s in sv.status().values()} == {"stopped"}


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_start_failures_are_retried_before_ready_with_retry_startup() -> None:
    journal: list[str] = []
    sv = Supervisor()
    sv.add(Recorder("api", journal, start_failures=2), backoff=0, max_backoff=0, retry_startup=True)
    async with sv:
        assert journal == ["start api"] * 3
        assert sv.status()["api"].restarts == 2


@bounded(10)
async def test_returning_service_ends_stopped_and_the_others_keep_going() -> None:
    sv = Supervisor()
    release = asyncio.Event()

    @sv.service(restart="no")
    async def one_shot() -> None:
        return None

    @sv.service
    async def long_lived() -> None:
        await release.wait()

    @sv.service  # default "on-failure": a normal return is not restarted either
    def migrate() -> None:
        return None

    async with sv:
        await await_until(lambda: sv.status()["migrate"].state == "stopped", WAIT)
        await await_until(lambda: sv.status()["one_shot"].state == "stopped", WAIT)
        assert sv.status()["long_lived"].state == "running"
        assert sv.state == "running"
        # When the last one returns, nothing is left to supervise: serve() returns.
        release.set()
        await asyncio.wait_for(sv.serve(), WAIT)
    assert {st.restarts for st in sv.status().values()} == {0}


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_restart_always_restarts_after_a_normal_return() -> None:
    sv = Supervisor()
    runs = 0
    forever = asyncio.Event()

    @sv.service(restart="always", backoff=0, max_backoff=0)
    async def poll() -> None:
        nonlocal runs
        runs += 1
        if runs >= 4:
            await forever.wait()

    async with sv:
        await await_until(lambda: runs == 4, WAIT)
        assert sv.status()["poll"].restarts == 3
        assert sv.status()["poll"].last_error is None


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_failing_after_normal_returns_still_chains_the_last_crash() -> None:
    sv = Supervisor()
    runs = 0

    @sv.service(restart="always", backoff=0, max_backoff=0, max_restarts=2, retry_startup=True)
    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectionError("database went away")
        # later runs return at once: restart="always" restarts them until the limit

    with pytest.raises(ServiceFailed) as info:
        async with sv:
            await asyncio.wait_for(sv.serve(), WAIT)
    assert runs == 3
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "last error: ConnectionError('database went away')" in str(info.value)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_status_snapshot() -> None:
    sv = Supervisor()

    @sv.service
    async def bot() -> None:
        await asyncio.sleep(3600)

    assert sv.status()["bot"].state == "stopped"
    assert sv.status()["bot"].started_at is None
    before = time.time()
    async with sv:
        st = sv.status()["bot"]
        assert st.started_at is not None
        assert before <= st.started_at <= time.time()
        assert st.uptime is not None
        assert st.uptime >= 0
        data = json.loads(json.dumps(st.to_dict()))
        assert data["name"] == "bot"
        assert data["state"] == "running"
        assert data["restarts"] == 0
        assert data["last_error"] is None
        assert repr(st) == "<ServiceStatus 'bot' running restarts=0>"
    st = sv.status()["bot"]
    assert st.uptime is None
    assert str(st.state) == "stopped"


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_loop_service_cancels_the_tasks_it_spawned() -> None:
    sv = Supervisor()
    spawned_running = threading.Event()
    spawned_cancelled = threading.Event()

    async def background() -> None:
        try:
            spawned_running.set()
            await asyncio.sleep(3600)
        finally:
            spawned_cancelled.set()

    @sv.service(isolate="loop")
    async def parent() -> None:
        keep = asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(3600)
        keep.cancel()

    async with sv:
        await await_until(spawned_running.is_set, WAIT)
        assert not spawned_cancelled.is_set()
    assert spawned_cancelled.is_set()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_detect_blocking_names_the_service_that_blocks_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(detect_blocking=0.05)
    blocked = asyncio.Event()

    @sv.service
    async def hog() -> None:
        # Blocks the supervisor's loop on purpose: the detector must name this line.
        time.sleep(0.4)  # noqa: ASYNC251
        blocked.set()
        await asyncio.sleep(3600)

    async with sv:
        await asyncio.wait_for(blocked.wait(), WAIT)
        detector = sv.detector
        assert detector is not None
        assert detector.threshold == 0.05
        assert " running: threshold 50 ms" in repr(detector)
    assert detector.state.value == "stopped"  # no monitor thread outlives the supervisor
    sites = detector.report()
    # Most total time first; a loaded machine may add short unrelated blocks after it.
    assert sites[0].function.rsplit(".", 1)[-1] == "hog"
    assert sites[0].file.endswith("test_supervisor.py")
    assert sites[0].max_ms >= 200
    # Each block is logged with its site (file:line in function) and the stack.
    lines, first = inspect.getsourcelines(hog)
    line = first + next(n for n, text in enumerate(lines) if "time.sleep(0.4)" in text)
    logged = [r.getMessage() for r in caplog.records if r.name == "offloop.detector"]
    assert any(
        f"test_supervisor.py:{line} in " in text and "hog" in text and "Stack" in text
        for text in logged
    ), logged

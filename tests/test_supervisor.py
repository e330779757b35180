"""Supervisor: running services side by side, restarts, failure, bounded shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest

import offloop
from offloop import Service, ServiceFailed, StopToken, Supervisor
from tests.helpers import await_until, bounded

WAIT = 5.0  # bound on every wait that should end at once; a hang fails loudly


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
    assert repr(sv) == "<Supervisor 'ordered' new (3 pending) grace=5>"
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
        "loop thread": "offloop-service-stubborn_coroutine",
        "worker stopped because": "service stopping",
    }


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

    @sv.service(backoff=0.001, max_backoff=0.002)
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

    @sv.service(backoff=0, max_backoff=0, max_restarts=2)
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

    @sv.service(restart="no")
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
async def test_start_failures_are_retried_before_ready() -> None:
    journal: list[str] = []
    sv = Supervisor()
    sv.add(Recorder("api", journal, start_failures=2), backoff=0, max_backoff=0)
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
async def test_stop_during_restart_backoff_does_not_wait_for_it() -> None:
    sv = Supervisor()

    @sv.service(backoff=3600, max_backoff=3600)
    async def broken() -> None:
        raise ValueError("nope")

    async with sv:
        await await_until(lambda: sv.status()["broken"].state == "restarting", WAIT)
    assert sv.status()["broken"].state == "stopped"


@bounded(10)
async def test_stop_is_thread_safe() -> None:
    sv = Supervisor()
    running = threading.Event()

    @sv.service
    def worker(token: StopToken) -> None:
        running.set()
        token.wait()

    def stop_from_a_thread() -> None:
        assert running.wait(WAIT)
        sv.stop()

    thread = threading.Thread(target=stop_from_a_thread)
    thread.start()
    try:
        await sv.serve()
    finally:
        thread.join(WAIT)
    assert sv.state == "stopped"
    sv.stop()  # stopping a stopped supervisor does nothing


@pytest.mark.loops("asyncio")
@pytest.mark.allow_leaks  # checks the abandoned thread itself, then ends it
@bounded(10)
async def test_shutdown_is_bounded_and_reports_an_abandoned_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offloop")
    sv = Supervisor(grace=0.2, name="sv")
    started = threading.Event()
    release = threading.Event()

    @sv.service
    def deaf() -> None:
        started.set()
        release.wait(WAIT)  # ignores its token on purpose

    @sv.service
    def polite(token: StopToken) -> None:
        token.wait()

    try:
        async with sv:
            await await_until(started.is_set, WAIT)
        abandoned = [t for t in threading.enumerate() if t.name == "offloop-service-deaf"]
        assert len(abandoned) == 1
        assert abandoned[0].is_alive()
        assert abandoned[0].daemon
        assert sv.status()["polite"].state == "stopped"  # still stopped after the grace ran out
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "sv: service 'deaf' did not stop within the grace period; killed it" in warnings
        report = next(w for w in warnings if "abandoned" in w)
        assert report.startswith("sv: service 'deaf' abandoned thread 'offloop-service-deaf'")
        assert "in deaf\n    release.wait(WAIT)" in report  # its current stack
    finally:
        release.set()
    abandoned[0].join(WAIT)
    assert not abandoned[0].is_alive()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_coroutine_that_swallows_cancellation_is_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(grace=0.1)
    swallowed = 0

    @sv.service
    async def sulky() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1
        await asyncio.sleep(3600)  # the second cancellation (kill) ends it

    async with sv:
        pass
    assert swallowed == 1
    assert any("'sulky' did not stop within the grace period" in m for m in caplog.messages)


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_status_snapshot() -> None:
    sv = Supervisor()

    @sv.service
    async def bot() -> None:
        await asyncio.sleep(3600)

    assert sv.status()["bot"].state == "pending"
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


def test_decorator_returns_the_function_and_names_the_service() -> None:
    sv = Supervisor()

    def plain() -> int:
        return 42

    assert sv.service(plain) is plain
    assert sv.service(name="second")(plain) is plain
    assert plain() == 42
    assert list(sv.services) == ["plain", "second"]
    assert repr(sv.services["plain"]).startswith("<ThreadService 'plain' idle fn=function")


async def _never() -> None:
    await asyncio.sleep(3600)


def _two_args(a: int, b: int) -> None:
    pass


@pytest.mark.parametrize(
    ("register", "error", "message"),
    [
        (lambda sv: sv.service(42), TypeError, "needs an 'async def' or plain 'def' function"),
        (lambda sv: sv.service(_two_args), TypeError, "which needs the arguments (a, b)"),
        (
            lambda sv: sv.service(isolate="thread")(_never),
            TypeError,
            "use isolate='loop' to give it its own loop",
        ),
        (
            lambda sv: sv.service(isolate="loop")(_two_args),
            TypeError,
            "isolate='loop', which is for coroutine functions",
        ),
        (lambda sv: sv.service(isolate="gpu")(_never), ValueError, "isolate must be None,"),
        (lambda sv: sv.service(backoff=-1)(_never), ValueError, "backoff must be at least 0"),
        (
            lambda sv: sv.add(_never),
            TypeError,
            "needs an offloop.Service (e.g. offloop.WSGIService(app)), got function '_never'. "
            "To supervise a function, decorate it with @sv.service instead.",
        ),
        (lambda sv: sv.service(name="")(_never), TypeError, "name must be a non-empty str"),
    ],
)
def test_bad_registrations_are_explained(
    register: object, error: type[Exception], message: str
) -> None:
    sv = Supervisor()
    with pytest.raises(error) as info:
        register(sv)  # type: ignore[operator]
    assert message in str(info.value)
    # A rejected registration leaves the supervisor usable.
    sv.service(_never)
    assert list(sv.services) == ["_never"]


def test_coroutine_object_is_rejected_without_a_warning() -> None:
    sv = Supervisor()
    with pytest.raises(TypeError, match="Decorate the 'async def' function itself"):
        sv.service(_never())  # type: ignore[call-overload]


def test_duplicate_names_and_services_are_rejected() -> None:
    sv = Supervisor(name="dup")
    svc = sv.add(Recorder("api", []))
    with pytest.raises(ValueError, match=r"already has a service named 'api'; pass name="):
        sv.add(Recorder("api", []))
    with pytest.raises(ValueError, match=r"<Recorder 'api'> is already supervised by <Supervisor"):
        sv.add(svc)
    with pytest.raises(TypeError, match="grace must be a number of seconds"):
        Supervisor(grace="5")  # type: ignore[arg-type]


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_illegal_transitions_have_their_own_messages() -> None:
    sv = Supervisor(name="once")
    with pytest.raises(RuntimeError) as info:
        sv.stop()
    assert str(info.value) == (
        "Cannot stop <Supervisor 'once' new (no services) grace=5>: it has not started. "
        "Enter it with 'async with', or call serve() or run(), first."
    )
    sv.add(Recorder("api", []))
    async with sv:
        with pytest.raises(RuntimeError, match=r"Cannot enter <Supervisor 'once' running"):
            await sv.__aenter__()
        with pytest.raises(RuntimeError, match="Cannot add the service 'late' to <Supervisor"):
            sv.add(Recorder("late", []))
        with pytest.raises(RuntimeError, match=r"\.run\(\) was called from a running event loop"):
            sv.run()
    with pytest.raises(RuntimeError, match=r"it has already run and stopped\. A supervisor runs"):
        await sv.serve()
    with pytest.raises(RuntimeError, match="Cannot enter <Supervisor 'once' stopped"):
        async with sv:
            pass


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_function_service_lifecycle_errors() -> None:
    sv = Supervisor()

    @sv.service
    def idle(token: StopToken) -> None:
        token.wait()

    svc = sv.services["idle"]
    with pytest.raises(RuntimeError, match=r"Cannot wait <ThreadService 'idle' idle .* start\(\)"):
        await svc.wait()
    await svc.start()
    with pytest.raises(RuntimeError, match="it is already running; stop it before"):
        await svc.start()
    assert repr(svc).startswith("<ThreadService 'idle' running")
    await asyncio.wait_for(svc.stop(), WAIT)
    await svc.wait()
    assert repr(svc).startswith("<ThreadService 'idle' ended")
    # Restartable: a fresh run after the stop.
    await svc.start()
    await asyncio.wait_for(svc.stop(), WAIT)
    assert svc.kill() == []


class SlowStop(Service):
    """Takes its time to stop, so the test can act while the shutdown is under way."""

    name = "slow"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()
        self._ended = asyncio.Event()

    async def start(self) -> None:
        self._ended.clear()

    async def wait(self) -> None:
        await self._ended.wait()

    async def stop(self) -> None:
        self.stopping.set()
        await self.release.wait()
        self._ended.set()


@pytest.mark.loops("asyncio")
@bounded(10)
async def test_a_crash_during_shutdown_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sv = Supervisor(name="sv")
    crash_now = threading.Event()

    @sv.service(backoff=0, max_backoff=0)
    def early(token: StopToken) -> None:
        crash_now.wait(WAIT)
        raise ValueError("late crash")

    slow = sv.add(SlowStop())

    async def run() -> None:
        async with sv:
            pass

    task = asyncio.create_task(run())
    await asyncio.wait_for(slow.stopping.wait(), WAIT)  # the shutdown is stopping 'slow'
    crash_now.set()
    await await_until(lambda: sv.status()["early"].state == "stopped", WAIT)
    slow.release.set()
    await asyncio.wait_for(task, WAIT)
    status = sv.status()["early"]
    assert status.restarts == 0
    assert repr(status.last_error) == "ValueError('late crash')"
    assert "sv: service 'early' crashed while stopping: ValueError('late crash')" in caplog.messages
    assert sv.state == "stopped"


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

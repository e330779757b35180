"""isolate="process": services in real child processes, stopped by SIGTERM, killed if deaf."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offloop import NotPicklableError, ServiceFailed, StopToken, Supervisor, WorkerCrashed
from offloop._process.pickling import RemoteTraceback
from tests.helpers import SPAWN_WAIT, WAIT, await_until, bounded, run_script

pytestmark = pytest.mark.usefixtures("resource_tracker")


# Service functions live at module level: the spawned child imports them by name.


def _mark(path: str, text: str) -> None:
    # Written beside it, then renamed over it: the test waits for the file to
    # exist, and must never read it between its creation and its write.
    # A tiny local write; an async child's loop has nothing else to do meanwhile.
    Path(f"{path}.tmp").write_text(text)
    os.replace(f"{path}.tmp", path)


def polite_child(path: str, token: StopToken) -> None:
    _mark(path, f"running {os.getpid()}")
    token.wait()
    _mark(path, f"stopped because {token.reason}")


def waits_in_short_slices(path: str, token: StopToken) -> None:
    # Its main thread is inside token.wait() nearly all the time, so SIGTERM
    # interrupts it there, in the middle of the token's own code.
    _mark(path, "waiting")
    deadline = time.monotonic() + SPAWN_WAIT
    while not token.wait(0.0005) and time.monotonic() < deadline:
        pass
    _mark(path, f"stopped because {token.reason}")


async def async_child(path: str) -> None:
    _mark(path, f"running {os.getpid()}")
    try:
        await asyncio.sleep(3600)
    finally:
        _mark(path, "cancelled")


def crashing_child() -> None:
    raise ValueError("bad config")


def dying_child() -> None:
    os._exit(3)


def deaf_child(path: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _mark(path, "ignoring SIGTERM")
    time.sleep(3600)


def forking_child(path: str, token: StopToken) -> None:
    # A helper forked by the service (as a fork-started multiprocessing pool
    # does) inherits every descriptor of the child, the ends of its pipes too.
    helper = os.fork()
    if helper == 0:
        time.sleep(SPAWN_WAIT)  # the test kills it long before
        os._exit(0)
    _mark(path, f"{os.getpid()} {helper}")
    token.wait()


def forking_then_returning(path: str) -> None:
    helper = os.fork()
    if helper == 0:
        time.sleep(SPAWN_WAIT)  # the test kills it long before
        os._exit(0)
    _mark(path, f"{os.getpid()} {helper}")


def _pid_from(path: Path) -> int:
    return int(path.read_text().split()[1])


@bounded(30)
async def test_sync_and_async_functions_run_in_child_processes(tmp_path: Path) -> None:
    sv = Supervisor(name="procs")
    sync_file, async_file = tmp_path / "sync", tmp_path / "async"
    sv.service(isolate="process", name="sync")(functools.partial(polite_child, str(sync_file)))
    sv.service(isolate="process", name="async")(functools.partial(async_child, str(async_file)))
    async with sv:
        await await_until(sync_file.exists, WAIT, "the sync child to run")
        await await_until(async_file.exists, WAIT, "the async child to run")
        pids = {_pid_from(sync_file), _pid_from(async_file)}
        assert os.getpid() not in pids
        assert len(pids) == 2
        assert repr(sv.services["sync"]).startswith("<ProcessService 'sync' running pid=")
        assert {st.state for st in sv.status().values()} == {"running"}
    # SIGTERM was the polite stop: the token was set, the coroutine cancelled.
    assert sync_file.read_text() == "stopped because terminated"
    assert async_file.read_text() == "cancelled"
    assert {st.state for st in sv.status().values()} == {"stopped"}


def signals_of_a_program_it_starts(path: str, token: StopToken) -> None:
    # Ctrl-C reaches the child's whole group and passes it by (the parent's
    # stop is its SIGTERM), but a program it starts must get it as usual.
    code = "import signal; print(getattr(signal.getsignal(signal.SIGINT), '__name__', 'ignored'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    _mark(path, done.stdout.strip())
    token.wait()


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_a_program_a_process_service_starts_keeps_ctrl_c(tmp_path: Path) -> None:
    sv = Supervisor(name="procs")
    seen = tmp_path / "seen"
    sv.service(isolate="process", name="starter")(
        functools.partial(signals_of_a_program_it_starts, str(seen))
    )
    async with sv:
        await await_until(seen.exists, WAIT, "the child's program to say")
    assert seen.read_text() == "default_int_handler"


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_child_exception_crosses_back_with_its_traceback() -> None:
    sv = Supervisor()
    sv.service(isolate="process", restart="no")(crashing_child)
    with pytest.raises(ServiceFailed, match="'crashing_child' failed") as info:
        await sv.serve()
    error = info.value.__cause__
    assert isinstance(error, ValueError)
    assert str(error) == "bad config"
    assert isinstance(error.__cause__, RemoteTraceback)  # the same type as ProcessPool's
    assert "(in the service process)" in str(error.__cause__)
    assert 'raise ValueError("bad config")' in str(error.__cause__)


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_child_that_dies_is_restarted_then_fails_with_worker_crashed() -> None:
    sv = Supervisor()
    sv.service(isolate="process", backoff=0, max_backoff=0, max_restarts=1, retry_startup=True)(
        dying_child
    )
    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    error = info.value.__cause__
    assert isinstance(error, WorkerCrashed)
    assert error.exitcode == 3
    assert "died with exit code 3" in str(error)
    assert sv.status()["dying_child"].restarts == 1


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_child_that_ignores_sigterm_is_killed_after_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sv = Supervisor(grace=0.3)
    marker = tmp_path / "deaf"
    sv.service(isolate="process", name="deaf")(functools.partial(deaf_child, str(marker)))
    async with sv:
        await await_until(marker.exists, WAIT, "the child to ignore SIGTERM")
    assert sv.status()["deaf"].state == "stopped"
    assert any("'deaf' did not stop within the grace period" in m for m in caplog.messages)
    # The no-leak fixture checks that the child is gone (SIGKILL cannot be ignored).


def test_unpicklable_function_is_refused_up_front() -> None:
    sv = Supervisor()

    def local() -> None:
        pass

    with pytest.raises(NotPicklableError) as info:
        sv.service(isolate="process")(local)
    assert "Service 'local' uses isolate='process'" in str(info.value)
    assert "Define it at the top level of an importable module" in str(info.value)
    assert sv.services == {}


def exiting_child() -> None:
    raise SystemExit(4)


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_system_exit_in_the_child_is_a_crash_not_an_exit_of_the_parent() -> None:
    sv = Supervisor()
    sv.service(isolate="process", restart="no")(exiting_child)
    with pytest.raises(ServiceFailed) as info:
        await sv.serve()
    error = info.value.__cause__
    assert error is not None
    assert str(error) == "the process of service 'exiting_child' raised SystemExit(4)"
    assert isinstance(error.__cause__, SystemExit)


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_kill_children_kills_every_live_child_for_a_forced_exit(tmp_path: Path) -> None:
    # What the signal handler and the watchdog call just before os._exit.
    from offloop._services.process import kill_children

    sv = Supervisor(name="procs")
    marker = tmp_path / "child"
    # retry_startup: killed at once, inside its start-up window, yet restarted.
    sv.service(isolate="process", name="child", backoff=3600, max_backoff=3600, retry_startup=True)(
        functools.partial(polite_child, str(marker))
    )
    async with sv:
        await await_until(marker.exists, WAIT, "the child to run")
        kill_children()
        # SIGKILL, not the polite SIGTERM: the token was never set.
        await await_until(lambda: sv.status()["child"].state == "restarting", WAIT)
        assert isinstance(sv.status()["child"].last_error, WorkerCrashed)
        assert marker.read_text().startswith("running")
    kill_children()  # nothing left to kill: the reaped pid is forgotten


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_a_service_stopped_while_its_child_starts_no_longer_says_running(
    tmp_path: Path,
) -> None:
    from offloop._services.process import ProcessService

    marker = tmp_path / "child"
    svc = ProcessService(
        functools.partial(polite_child, str(marker)), "slow", is_async=False, pass_token=True
    )
    start = asyncio.create_task(svc.start())
    await await_until(lambda: svc.pid is not None, WAIT, "the child to be spawned")
    # The spawned child is still importing the interpreter: far from ready.
    start.cancel()
    await asyncio.wait({start})
    assert start.cancelled()
    assert repr(svc).startswith("<ProcessService 'slow' ended fn=")
    assert svc._process is None  # reaped: the leak check sees no child either


def quick_child(path: str) -> None:
    _mark(path, "done")


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_kill_children_never_signals_a_child_reaped_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # multiprocessing reaps finished children in active_children() and in any
    # start(); the pid may then name another process, which must not be hit.
    import multiprocessing

    from offloop._services.process import kill_children

    sv = Supervisor(name="reaped")
    marker = tmp_path / "child"
    sv.service(isolate="process", name="child", restart="no")(
        functools.partial(quick_child, str(marker))
    )
    async with sv:
        await await_until(marker.exists, WAIT, "the child to run")
        # The loop stays busy here, as in a forced exit: the supervisor cannot reap it.
        deadline = time.monotonic() + WAIT
        while multiprocessing.active_children():  # reaps it once it exited
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)  # noqa: ASYNC251 - the loop must not run: it would reap the child
        signalled: list[int] = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append(pid))
        kill_children()
        monkeypatch.undo()
        assert signalled == []


_DECORATED_SCRIPT = """\
import asyncio
import os
from pathlib import Path
from typing import Any

import offloop

sv = offloop.Supervisor(grace=2.0)
MARK = Path(__file__).with_name("ran")


@sv.service(isolate="process", oneshot=True)  # the name 'job' is bound only after this returns
def job():
    MARK.write_text(str(os.getpid()))


@sv.service
async def stopper():
    while not MARK.exists():
        await asyncio.sleep(0.01)
    sv.stop()


if __name__ == "__main__":
    sv.run()
    print("ran in", MARK.read_text(), "parent", os.getpid())
"""


def test_the_decorator_form_works_in_a_script(tmp_path: Path) -> None:
    # The documented form: @sv.service(isolate="process") over a top-level def.
    # The decorator runs before the module binds the name, so a pickling check
    # by reference made right then cannot find it yet.
    done = run_script(tmp_path, "app.py", _DECORATED_SCRIPT, timeout=SPAWN_WAIT)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:2] == ["ran", "in"], done.stdout
    assert words[2] != words[4]  # in a child process, not the parent


def test_a_function_that_is_not_the_one_its_module_names_is_refused_at_start(
    tmp_path: Path,
) -> None:
    # Accepted while its name is unbound (a decorator running); if the name is
    # then bound to something else, the child could not find it: start() says so.
    done = run_script(
        tmp_path,
        "app.py",
        "import asyncio\n"
        "import offloop\n"
        "sv = offloop.Supervisor()\n"
        "@sv.service(isolate='process')\n"
        "def job():\n"
        "    pass\n"
        "job = 'something else'\n"
        "try:\n"
        "    sv.run()\n"
        "except offloop.ServiceFailed as e:\n"
        "    print(type(e.__cause__).__name__, e.__cause__)\n",
        timeout=SPAWN_WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "NotPicklableError Service 'job' uses isolate='process', but function 'job' cannot be "
        "sent to a child process"
    ), done.stdout


_DIES_WHILE_STARTING = """\
import asyncio
import os
import signal
import subprocess
import sys

from offloop._services.process import ProcessService


def job():
    pass


async def main():
    svc = ProcessService(job, "doomed", is_async=False, pass_token=False)
    start = asyncio.create_task(svc.start())
    while svc.pid is None:
        await asyncio.sleep(0)
    os.kill(svc.pid, signal.SIGKILL)  # still importing: it never says it is ready
    try:
        await start
    except Exception as exc:
        print("start:", exc)
    print("state:", svc.state.value)


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_child_that_dies_while_starting_fails_the_start_and_nothing_else(
    tmp_path: Path,
) -> None:
    done = run_script(tmp_path, "app.py", _DIES_WHILE_STARTING, timeout=SPAWN_WAIT)
    assert done.returncode == 0, done.stderr
    start, state = done.stdout.splitlines()
    assert re.fullmatch(
        r"start: The process of service 'doomed' \(pid \d+\) died with exit code -9\.", start
    )
    assert state == "state: crashed"
    # The error is start()'s; the run's own future is not reported on top of it.
    assert "never retrieved" not in done.stderr, done.stderr


_UNGUARDED = """\
import offloop

sv = offloop.Supervisor(name="app")


@sv.service(isolate="process")
def child(token):
    token.wait()


sv.run()  # unguarded: the spawned child runs the program again while importing this
"""


def test_a_child_of_an_unguarded_script_fails_with_the_guard_as_the_fix(tmp_path: Path) -> None:
    # The child's own supervisor dies of multiprocessing's "bootstrapping
    # phase" error, on the child's stderr; the parent only sees exit code 1.
    done = run_script(tmp_path, "app.py", _UNGUARDED, timeout=SPAWN_WAIT)
    assert done.returncode == 1, done.stderr
    errors = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("offloop.WorkerCrashed: The process of service 'child'")
    ]
    assert errors, done.stderr
    assert re.search(
        r"\(pid \d+\) died with exit code 1 while starting, before it ran function 'child': "
        r"it failed to import the program again",
        errors[0],
    ), errors[0]
    assert "Guard the script's entry point with 'if __name__ == \"__main__\":'" in errors[0]


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_wait_after_a_start_whose_child_died_is_refused_as_after_any_failed_start(
    tmp_path: Path,
) -> None:
    from offloop._services.process import ProcessService

    svc = ProcessService(
        functools.partial(polite_child, str(tmp_path / "x")),
        "doomed",
        is_async=False,
        pass_token=True,
    )
    start = asyncio.create_task(svc.start())
    await await_until(lambda: svc.pid is not None, WAIT, "the child to be spawned")
    assert svc.pid is not None
    os.kill(svc.pid, signal.SIGKILL)  # still importing: it never says it is ready
    with pytest.raises(WorkerCrashed, match="died with exit code -9"):
        await start
    with pytest.raises(RuntimeError, match=r"its last start\(\) failed; call start\(\) again"):
        await svc.wait()


_MAIN_ONLY = """\
import offloop

sv = offloop.Supervisor()
try:
    @sv.service(isolate="process")
    def job():
        pass
except offloop.NotPicklableError as exc:
    print(exc)
"""


@pytest.mark.parametrize("how", ["-m", "-c"])
def test_a_function_of_a_main_that_children_cannot_import_is_refused_up_front(
    tmp_path: Path, how: str
) -> None:
    # multiprocessing's spawn does not run a package's __main__ nor a -c
    # command in the child: it would die unpickling the function, exit code 1.
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "__main__.py").write_text(_MAIN_ONLY)
    target = "app" if how == "-m" else _MAIN_ONLY
    done = subprocess.run(
        [sys.executable, how, target],
        capture_output=True,
        text=True,
        timeout=SPAWN_WAIT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "Service 'job' uses isolate='process', but function 'job' is defined in __main__, "
        "which a spawned child process cannot import when the program runs as "
        "'python -m package', 'python -c' or interactively. Define it in a module of its "
        "own and import it from there.\n"
    )


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_a_child_killed_while_a_helper_it_forked_lives_is_a_crash(tmp_path: Path) -> None:
    # The OOM killer takes the child; the helper it forked still holds the write
    # ends of the child's pipes, so neither the message pipe nor multiprocessing's
    # sentinel ever reports the death: the service said "running" until the
    # helper ended (a pool's worker: never).
    marker = tmp_path / "pids"
    sv = Supervisor()
    sv.service(isolate="process", restart="no", startup_window=0, name="forker")(
        functools.partial(forking_child, str(marker))
    )
    serving = asyncio.ensure_future(sv.serve())
    try:
        await await_until(marker.exists, SPAWN_WAIT, "the child to fork its helper")
        child, helper = map(int, marker.read_text().split())
        try:
            os.kill(child, signal.SIGKILL)
            with pytest.raises(ServiceFailed) as info:
                await asyncio.wait_for(asyncio.shield(serving), WAIT)
        finally:
            os.kill(helper, signal.SIGKILL)
    finally:
        if not serving.done():
            sv.stop()
            await asyncio.wait({serving})
    error = info.value.__cause__
    assert isinstance(error, WorkerCrashed)
    assert error.exitcode == -signal.SIGKILL


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_a_child_that_returns_while_a_helper_it_forked_lives_ends_its_run(
    tmp_path: Path,
) -> None:
    from offloop._services.process import ProcessService

    marker = tmp_path / "pids"
    svc = ProcessService(
        functools.partial(forking_then_returning, str(marker)),
        "forker",
        is_async=False,
        pass_token=False,
    )
    await svc.start()
    try:
        await asyncio.wait_for(svc.wait(), WAIT)  # not once the helper has ended
        assert svc.state.value == "ended"
    finally:
        await await_until(marker.exists, SPAWN_WAIT, "the child to fork its helper")
        os.kill(int(marker.read_text().split()[1]), signal.SIGKILL)


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_sigterm_while_the_child_is_inside_token_wait_still_stops_it(
    tmp_path: Path,
) -> None:
    # The child's SIGTERM handler sets the token in the main thread, between
    # two of its bytecodes: inside token.wait() here, so set() must not wait
    # for anything that thread holds, or the service never stops.
    marker = tmp_path / "child"
    sv = Supervisor(name="locked", grace=WAIT)
    sv.service(isolate="process", name="locked")(
        functools.partial(waits_in_short_slices, str(marker))
    )
    async with sv:
        await await_until(marker.exists, SPAWN_WAIT, "the child to wait on its token")
    assert marker.read_text() == "stopped because terminated"
    assert sv.status()["locked"].state == "stopped"

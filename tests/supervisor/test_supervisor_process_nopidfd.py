"""isolate="process" where no pidfd can be had (macOS, old kernels, sandboxes).

The child's end is then seen through multiprocessing's sentinel, a pipe the
child holds: it closes with the child's files, a step before the kernel has
an exit code for it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import pytest

from offloop import WorkerCrashed
from offloop._services import process as process_module
from offloop._services.process import ProcessService
from tests.helpers import SPAWN_WAIT, WAIT, await_until, bounded

pytestmark = pytest.mark.usefixtures("resource_tracker")


def waiting_child(path: str, closes_its_files: bool) -> None:
    # Module level: the spawned child imports it by name.
    if closes_its_files:
        # As a program that daemonizes does: every descriptor above stderr,
        # the sentinel's write end and the message pipe among them. The
        # sentinel then fires while the child still runs: the parent sees
        # the same as in the moment between a dying child's files closing
        # and its exit, only for as long as the test wants.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    Path(f"{path}.tmp").write_text(str(os.getpid()))
    os.replace(f"{path}.tmp", path)
    time.sleep(SPAWN_WAIT)  # the test kills it long before


def _reaped(pid: int) -> bool:
    # No zombie left: waitpid() no longer knows the child (WNOHANG: never blocks).
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _no_pidfd(pid: int) -> int:
    raise OSError(38, "Function not implemented")


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("closes_its_files", [False, True], ids=["killed", "files-closed-first"])
@bounded(30)
async def test_without_a_pidfd_a_killed_child_is_reaped_and_its_exit_code_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closes_its_files: bool
) -> None:
    monkeypatch.setattr(os, "pidfd_open", _no_pidfd, raising=False)
    # A child that closed its files is killed by the service after a while:
    # here, the test kills it first, however slow the machine.
    monkeypatch.setattr(process_module, "_EXITING_WAIT", WAIT)
    marker = tmp_path / "pid"
    svc = ProcessService(
        functools.partial(waiting_child, str(marker), closes_its_files),
        "nopidfd",
        is_async=False,
        pass_token=False,
    )
    await svc.start()
    assert svc._pidfd is None  # the sentinel is watched
    process = svc._process
    assert process is not None
    assert process in process_module._live_children
    await await_until(marker.exists, SPAWN_WAIT, "the child to run")
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(svc.wait(), WAIT)
    assert info.value.exitcode == -signal.SIGKILL
    assert str(info.value) == (
        f"The process of service 'nopidfd' (pid {pid}) died with exit code {-signal.SIGKILL}."
    )
    # Reaped: no zombie is left, and kill_children() no longer lists it.
    assert process not in process_module._live_children
    assert svc._process is None
    assert _reaped(pid)


@pytest.mark.loops("asyncio")
@bounded(30)
async def test_without_a_pidfd_a_child_that_closes_its_files_and_lives_on_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With its pipes gone nothing would say when it ends: it is not left
    # running unwatched (nor reported dead while it runs).
    monkeypatch.setattr(os, "pidfd_open", _no_pidfd, raising=False)
    monkeypatch.setattr(process_module, "_EXITING_WAIT", 0.1)
    marker = tmp_path / "pid"
    svc = ProcessService(
        functools.partial(waiting_child, str(marker), True),
        "daemonish",
        is_async=False,
        pass_token=False,
    )
    await svc.start()
    process, pid = svc._process, svc.pid
    assert pid is not None
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(svc.wait(), WAIT)
    assert info.value.exitcode == -signal.SIGKILL
    assert str(info.value) == (
        f"The process of service 'daemonish' (pid {pid}) closed its pipes to the parent but "
        f"did not exit within 0.1s, so it was killed (exit code {-signal.SIGKILL})."
    )
    assert process not in process_module._live_children
    assert _reaped(pid)

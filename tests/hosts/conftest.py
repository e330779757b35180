"""The fake API server every host test shares, and a child process that times its lines."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SPAWN_WAIT, Proc

from .fake_api import FakeAPI

ROOT = Path(__file__).resolve().parents[2]
_tokens = itertools.count(1)


@pytest.fixture(scope="session")
def fake_api() -> Iterator[FakeAPI]:
    """One fake Telegram/Discord API for the session (each test takes its own token)."""
    api = FakeAPI().start()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def token() -> str:
    """A bot token of this test's own on the shared fake API."""
    return f"{next(_tokens)}:TEST-token-{time.monotonic_ns()}"


class HostProc(Proc):
    """A host program (``python -m tests.hosts.<module> ...``) whose lines are timed."""

    def __init__(self, module: str, *args: str) -> None:
        self.times: list[float] = []
        super().__init__(["-m", f"tests.hosts.{module}", *args], ROOT)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()

    def __enter__(self) -> HostProc:
        return self

    def when(self, pattern: str, *, last: bool = False) -> float:
        """When the first (or ``last``) line matching ``pattern`` came; waits for one, bounded."""
        self.wait_for(pattern)
        regex = re.compile(pattern)
        with self._changed:
            times = [
                t for t, line in zip(self.times, self.lines, strict=True) if regex.search(line)
            ]
        return times[-1] if last else times[0]

    def ends_after_failure(self, service: str, host_ended: str) -> tuple[int, float]:
        """Wait for ``service``'s failure and the exit: the exit code, and the seconds from the
        failure to the line saying the host ended (``host_ended``). The interpreter's own
        teardown comes after that line: aiogram's pydantic models take seconds to free on a
        busy machine, and that is not the host's stop."""
        failed = self.when(rf"Service '{service}' failed")
        code = self.exit_code(SPAWN_WAIT)
        return code, self.when(host_ended, last=True) - failed

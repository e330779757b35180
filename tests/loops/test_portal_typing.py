"""The ParamSpec signatures of Portal, from_thread_sync and TaskHandle, checked by mypy.

As in tests/test_typing.py: each ``# type: ignore[code]`` in a ``TYPE_CHECKING``
block marks a call a type checker must refuse, and strict mode reports an
ignore that is not needed, so a signature that loses its types fails the build.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import offloop


async def double(x: int) -> int:
    return x * 2


def triple(x: int) -> int:
    return x * 3


async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


@contextlib.asynccontextmanager
async def opened(name: str) -> AsyncIterator[str]:
    yield name


def test_portal_keeps_parameter_and_return_types() -> None:
    with offloop.LoopThread(name="typed-portal") as lt:
        portal = offloop.Portal(lt, timeout=5)
        number: int = portal.call(double, 2)
        number = portal.call_sync(triple, number)
        number = offloop.from_thread_sync(triple, number)
        future: cf.Future[int] = portal.submit(double, 1)
        handle: offloop.TaskHandle[int] = portal.start_task(double, 3)
        items: list[int] = list(portal.iterate(count, 2))
        with portal.context(opened, "db") as name:
            label: str = name
        assert (number, future.result(5), handle.result(timeout=5), items, label) == (
            36,
            2,
            6,
            [0, 1],
            "db",
        )
        if TYPE_CHECKING:
            portal.call(double, "2")  # type: ignore[arg-type]
            _text: str = portal.call_sync(triple, 1)  # type: ignore[assignment]
            offloop.from_thread_sync(triple, x="1")  # type: ignore[arg-type]
            portal.submit(double, 1, nope=2)  # type: ignore[call-arg]
            _wrong: offloop.TaskHandle[str] = portal.start_task(double, 1)  # type: ignore[arg-type]
            portal.iterate(count, "2")  # type: ignore[arg-type]
            portal.context(opened, 1)  # type: ignore[arg-type]

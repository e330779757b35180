"""The ParamSpec signatures, checked by mypy (strict, over tests) in `make test`.

Each ``# type: ignore[code]`` in the ``TYPE_CHECKING`` blocks marks a call a
type checker must refuse: strict mode reports an ignore that is not needed, so
if a signature loses its parameters or its return type (becomes ``...`` or
``Any``), mypy fails the build. The right calls also run, at runtime.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

import offloop


def scale(x: int, label: str = "") -> tuple[int, str]:
    return x * 2, label


@offloop.threaded
def scale_in_thread(x: int, label: str = "") -> tuple[int, str]:
    return x * 2, label


async def double(x: int) -> int:
    return x * 2


@pytest.mark.loops("asyncio")
async def test_thread_offload_keeps_parameter_and_return_types() -> None:
    pair: tuple[int, str] = await scale_in_thread(3, label="x")
    assert pair == (6, "x")
    pair = await offloop.to_thread(scale, 2, label="y")
    assert pair == (4, "y")
    async with offloop.ThreadPool(1, name="typed") as pool:
        pair = await pool.run(scale, 5)
        assert pair == (10, "")
        if TYPE_CHECKING:
            scale_in_thread("3")  # type: ignore[arg-type]
            scale_in_thread(1, nope=2)  # type: ignore[call-arg]
            _wrong: str = await scale_in_thread(3)  # type: ignore[assignment]
            offloop.to_thread(scale, "2")  # type: ignore[arg-type]
            offloop.to_thread(scale, 1, nope=2)  # type: ignore[call-arg]
            _number: int = await offloop.to_thread(scale, 2)  # type: ignore[arg-type]
            pool.run(scale, 1, label=2)  # type: ignore[arg-type]
            _text: str = await pool.run(scale, 5)  # type: ignore[arg-type]


def test_crossings_keep_parameter_and_return_types() -> None:
    result: int = offloop.from_thread(double, 4)
    assert result == 8
    if TYPE_CHECKING:
        offloop.from_thread(double, "4")  # type: ignore[arg-type]
        _text: str = offloop.from_thread(double, 4)  # type: ignore[assignment]


def test_to_loop_keeps_parameter_and_return_types() -> None:
    async def main() -> None:
        result: int = await offloop.to_loop(double, 3)
        assert result == 6
        if TYPE_CHECKING:
            await offloop.to_loop(double, "3")  # type: ignore[arg-type]
            _text: str = await offloop.to_loop(double, 3)  # type: ignore[arg-type]

    asyncio.run(main())


def test_an_executor_view_keeps_parameter_and_return_types() -> None:
    pool = offloop.ThreadPool(1, name="typed-view")
    try:
        view = pool.executor()
        pair: tuple[int, str] = view.submit(scale, 3, label="x").result(timeout=10)
        assert pair == (6, "x")
        if TYPE_CHECKING:
            view.submit(scale, "3")  # type: ignore[arg-type]
            view.submit(scale, 1, nope=2)  # type: ignore[call-arg]
            _text: str = view.submit(scale, 3).result()  # type: ignore[assignment]
        view.shutdown()
    finally:
        pool.close()

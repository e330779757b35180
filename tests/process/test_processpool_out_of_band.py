"""ProcessPool: big ``bytes`` arguments travel beside the pickled call, not in it.

``run()`` replaces a top-level ``bytes`` argument of ``LARGE_PAYLOAD`` bytes or
more by a placeholder and the writer thread sends the object itself after the
call (``offloop._process.message``): no copy on the event loop's thread.
Mutable buffers are still pickled in ``run()``, which is the call's snapshot.
These tests also check that neither side keeps a call's data alive after it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from typing import Any

import psutil
import pytest

import offloop
from offloop._process import pool as _processpool
from offloop._process.message import Detached
from offloop._process.pool import ProcessPool
from offloop._process.writer import LARGE_PAYLOAD
from tests.helpers import WAIT, await_until
from tests.process.test_processpool_payloads import (
    BIG,
    digest,
    square,
    started_worker,
    stopped,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="out of band on POSIX only")

MB = 1 << 20


# -- functions run in the workers (module level: sent by reference) ----------


def fingerprint(value: object) -> object:
    """Type and content of an argument, as the worker received it."""
    if isinstance(value, (bytes, bytearray)):
        return type(value).__name__, len(value), digest(value)
    if isinstance(value, list):
        return [fingerprint(item) for item in value]
    return type(value).__name__, value


def fingerprints(*args: object, **kwargs: object) -> tuple[object, object]:
    return [fingerprint(arg) for arg in args], {k: fingerprint(v) for k, v in kwargs.items()}


def _refuse_to_load() -> None:
    raise RuntimeError("this argument refuses to be unpickled")


class Unloadable:
    """Pickles fine in the parent; unpickling it in the worker raises."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _refuse_to_load, ()


def make_bytes(size: int) -> bytes:
    return bytes(size)


@pytest.fixture(params=["bytes", "bytearray"])
def blob(request: pytest.FixtureRequest) -> Any:
    data = os.urandom(BIG)
    return data if request.param == "bytes" else bytearray(data)


# -- tests ---------------------------------------------------------------------


@pytest.mark.loops("asyncio")
async def test_big_bytes_arguments_travel_beside_the_call_and_arrive_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pickled: list[tuple[tuple[object, ...], dict[str, object]]] = []
    encode_call = _processpool.encode_call  # type: ignore[attr-defined]

    def spy(fn: Any, args: Any, kwargs: Any, *rest: Any, **options: Any) -> bytes:
        pickled.append((args, kwargs))
        return encode_call(fn, args, kwargs, *rest, **options)

    monkeypatch.setattr(_processpool, "encode_call", spy)
    big, key = os.urandom(3 * LARGE_PAYLOAD), os.urandom(LARGE_PAYLOAD)
    mutable, nested = bytearray(os.urandom(2 * LARGE_PAYLOAD)), [os.urandom(LARGE_PAYLOAD)]
    args = (big, b"small", mutable, nested, big)
    async with ProcessPool(1, name="oob") as pool:
        got = await asyncio.wait_for(pool.run(fingerprints, *args, key=key, flag=7), WAIT)
        assert got == fingerprints(*args, key=key, flag=7)
        # The worker put each buffer back and dropped nothing: the next calls run.
        assert await asyncio.wait_for(pool.run(square, 6), WAIT) == 36
        assert await asyncio.wait_for(pool.run(digest, key), WAIT) == digest(key)
    # run() pickled placeholders for the top-level bytes, not the bytes
    # themselves; what may change (bytearray) or is nested was pickled whole.
    sent_args, sent_kwargs = pickled[0]
    assert [type(a).__name__ for a in sent_args] == [
        "Detached",
        "bytes",
        "bytearray",
        "list",
        "Detached",
    ]
    assert isinstance(sent_kwargs["key"], Detached)
    assert sent_kwargs["flag"] == 7
    # The object passed twice was sent once: both placeholders name buffer 0.
    assert [a.index for a in sent_args if isinstance(a, Detached)] == [0, 0]
    assert sent_kwargs["key"].index == 1


@pytest.mark.loops("asyncio")
async def test_a_buffer_changed_after_run_returns_does_not_reach_the_call() -> None:
    async with ProcessPool(1, name="snapshot") as pool:
        pid = await started_worker(pool)
        buffer = bytearray(BIG)
        expected = digest(bytes(buffer))
        with stopped(pid):
            call = pool.run(digest, buffer)
            buffer[:] = b"\xff" * BIG  # before the worker has read a byte of the call
        assert await asyncio.wait_for(call, WAIT) == expected


@pytest.mark.loops("asyncio")
async def test_a_call_whose_buffers_arrived_but_that_will_not_unpickle_fails_alone(
    blob: bytes,
) -> None:
    async with ProcessPool(1, name="unloadable") as pool:
        pid = await started_worker(pool)
        with pytest.raises(offloop.NotPicklableError, match="refuses to be unpickled"):
            await asyncio.wait_for(pool.run(digest, blob, Unloadable()), WAIT)
        # The worker read the call's buffers before failing: the same worker
        # reads the next calls from the right place in its pipe.
        assert await asyncio.wait_for(pool.run(digest, blob), WAIT) == digest(blob)
        assert await asyncio.wait_for(pool.run(os.getpid), WAIT) == pid


@pytest.mark.loops("asyncio")
async def test_run_does_not_copy_a_big_bytes_argument_nor_the_pickle_beside_it() -> None:
    big, mutable = os.urandom(16 * MB), bytearray(os.urandom(16 * MB))
    async with ProcessPool(1, name="nocopy") as pool:
        await started_worker(pool)
        calls, peaks = [], []
        tracemalloc.start()
        try:
            for args in ((big,), (mutable,), (mutable, big)):
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]  # the earlier calls' pickles
                calls.append(pool.run(digest, *args))
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()
        results = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
        assert results == [digest(big), digest(mutable), digest(mutable)]
    alone, pickled, beside = peaks
    # The bytes object is sent as it is: run() allocates next to nothing.
    assert alone < MB, f"run() allocated {alone} bytes for a 16 MB bytes argument"
    # The bytearray is pickled (a copy: the call's snapshot), and a bytes
    # argument beside it costs no second copy of that pickle.
    assert pickled > 16 * MB
    assert beside < pickled + MB, f"{beside} bytes with a bytes argument, {pickled} without"


@pytest.mark.loops("asyncio")
async def test_the_parent_lets_go_of_a_big_bytes_argument_once_it_is_sent() -> None:
    big = os.urandom(2 * MB)
    alone = sys.getrefcount(big)
    async with ProcessPool(1, name="letgo") as pool:
        pid = await started_worker(pool)
        assert await asyncio.wait_for(pool.run(len, big), WAIT) == len(big)
        # The writer thread, now idle, must not keep the caller's object.
        await await_until(lambda: sys.getrefcount(big) == alone, WAIT, "the writer to let go")
        with stopped(pid):
            busy = pool.run(square, 2)  # the worker is stopped: the next call queues
            queued = pool.run(len, big)
            assert sys.getrefcount(big) > alone
            queued.cancel()
            assert sys.getrefcount(big) == alone, "a cancelled queued call kept its argument"
        assert await asyncio.wait_for(busy, WAIT) == 4


@pytest.mark.loops("asyncio")
async def test_an_idle_worker_keeps_neither_its_last_arguments_nor_its_result() -> None:
    size = 128 * MB

    def worker_rss() -> int:
        return int(psutil.Process(pid).memory_info().rss)

    async with ProcessPool(1, name="idle") as pool:
        pid = await started_worker(pool)
        base = worker_rss()
        for call in (
            lambda: pool.run(len, bytes(size)),  # out of band
            lambda: pool.run(len, bytearray(size)),  # in the pickle
            lambda: pool.run(make_bytes, size),  # a big result
        ):
            await asyncio.wait_for(call(), WAIT)
            await await_until(
                lambda: worker_rss() < base + size // 2, WAIT, "the idle worker to free the call"
            )

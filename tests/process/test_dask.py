"""offloop.DaskPool on a real distributed.LocalCluster (process workers, loopback only).

One cluster serves the whole module: it is started before the first test's
leak snapshot and closed after the last test.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._core.poolbase import PoolState
from offloop._process.daskargs import SCATTER_BYTES
from offloop._process.pickling import RemoteTraceback
from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import (
    await_until,
    collected,
    resource_warnings,
    the_warning,
    wait_for_file,
    warned,
)

distributed = pytest.importorskip("distributed")


pytestmark = pytest.mark.loops("asyncio")


def add(a: int, b: int, *, key: str = "") -> tuple[int, str, int]:
    # ``key`` is also an option of Client.submit: it must reach this function.
    return a + b, key, os.getpid()


class Rejected(LookupError):
    pass


def reject(what: str) -> None:
    raise Rejected(f"no {what}")


def draw(tag: str) -> str:
    # A new value every time it runs: equal results mean one run was shared.
    return f"{tag} {uuid.uuid4()}"


def die_now() -> None:
    os._exit(3)  # the worker process dies in the middle of the call


@pytest.fixture(scope="module")
def offload_thread() -> None:
    # distributed starts a process-wide helper thread on first use and keeps
    # it; start it here, before any test's leak snapshot.
    distributed.utils._offload_executor.submit(int).result(WAIT)


@pytest.fixture(scope="module")
def cluster(offload_thread: None) -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # Its HTTP server (up even without a dashboard) on any free port, not 8787.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    try:
        yield cluster
    finally:
        cluster.close()


def offloop_dask_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("offloop-dask-")]


async def test_run_by_address_returns_results_and_closes_its_client(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every key is drawn on the client's thread, never on the caller's loop,
    # where the blocking detector would blame offloop's frame for the wait.
    drawn_on: list[str] = []
    real_uuid4 = uuid.uuid4

    def uuid4() -> uuid.UUID:
        drawn_on.append(threading.current_thread().name)
        return real_uuid4()

    monkeypatch.setattr(uuid, "uuid4", uuid4)
    pool = offloop.DaskPool(cluster.scheduler_address)
    async with pool:
        call = pool.run(add, 2, 3, key="mine")
        assert isinstance(call, offloop.OffloadFuture)  # queued at once, like the local pools
        total, key, pid = await asyncio.wait_for(call, WAIT)
        assert (total, key) == (5, "mine")
        assert pid != os.getpid()  # a worker process of the cluster
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(add, i, i) for i in range(20))), WAIT
        )
        assert [r[0] for r in results] == [2 * i for i in range(20)]
        offset = 7
        assert await asyncio.wait_for(pool.run(lambda x: x + offset, 1), WAIT) == 8
        client = pool.client
        assert client.status == "running"
        # The client lives on the pool's loop thread, not on the caller's loop.
        [thread] = offloop_dask_threads()
        assert client.loop.asyncio_loop is not asyncio.get_running_loop()
        assert client.loop.asyncio_loop.is_running()
        # (The scheduler of the module's cluster runs in this process too, on
        # its own "IO loop" thread, and draws some of its own.)
        # The pool's key prefix, and Dask's own draws for each message (the
        # 20 calls queued together go in one).
        assert threading.current_thread().name not in drawn_on
        assert drawn_on.count(thread) >= 3
        assert repr(pool) == (
            f"<DaskPool {cluster.scheduler_address!r} open: 0 running, 22 completed, 0 failed>"
        )
    assert client.status == "closed"  # the pool opened it, the pool closed it
    assert offloop_dask_threads() == []  # and its thread is gone
    assert pool.statistics() == {
        "state": "closed",
        "queued": 0,
        "running": 0,
        "completed": 22,
        "failed": 0,
        "cancelled": 0,
    }
    with pytest.raises(offloop.PoolClosedError, match="closed> takes no new calls"):
        pool.run(add, 1, 1)


@pytest.mark.loops("asyncio", "debug", "uvloop")
async def test_any_kind_of_caller_loop_gets_its_results(cluster: Any) -> None:
    # The client's loop is the pool's own; the caller's may be of any kind.
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(add, i, 1) for i in range(5))), WAIT
        )
        assert [r[0] for r in results] == [1, 2, 3, 4, 5]


async def test_a_call_queued_before_aclose_runs_then_the_client_closes(cluster: Any) -> None:
    pool = offloop.DaskPool(cluster.scheduler_address)
    call = pool.run(add, 1, 2)  # queued while the pool has not connected yet
    closing = asyncio.ensure_future(pool.aclose())
    assert (await asyncio.wait_for(call, WAIT))[0] == 3
    await asyncio.wait_for(closing, WAIT)
    assert pool.client.status == "closed"
    assert offloop_dask_threads() == []
    assert pool.statistics()["completed"] == 1


def make_lock() -> threading.Lock:
    return threading.Lock()


async def test_a_result_that_cannot_be_pickled_is_named(cluster: Any) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        with pytest.raises(
            offloop.NotPicklableError, match=r"its result cannot be pickled"
        ) as info:
            await asyncio.wait_for(pool.run(make_lock), WAIT)
        assert "(TypeError: cannot pickle '_thread.lock' object)" in str(info.value)
        assert isinstance(info.value, TypeError)
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2
        assert (pool.statistics()["failed"], pool.statistics()["completed"]) == (1, 1)


async def test_errors_keep_their_type_and_the_pool_keeps_working(cluster: Any) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        with pytest.raises(Rejected, match="no entry"):
            await asyncio.wait_for(pool.run(reject, "entry"), WAIT)
        lock = threading.Lock()
        with pytest.raises(offloop.NotPicklableError, match=r"argument 0 \(lock"):
            pool.run(add, lock, 1)  # type: ignore[arg-type]
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2
        assert pool.statistics()["failed"] == 1


async def test_an_asynchronous_client_is_left_on_its_loop_and_open(cluster: Any) -> None:
    async with distributed.Client(cluster.scheduler_address, asynchronous=True) as client:
        pool = offloop.DaskPool(client=client)
        assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3
        # That client does its work on this loop: the pool's calls go through
        # a client of its own, on its own thread, to the same scheduler.
        own = pool.client
        assert own is not client
        assert own.scheduler.address == client.scheduler.address
        assert own.loop.asyncio_loop is not asyncio.get_running_loop()
        assert distributed.default_client() is client  # the pool's is not the default
        # An object that client scattered belongs to it, not to the pool's:
        # the error says what to do instead.
        theirs = await client.scatter(5)
        with pytest.raises(ValueError, match=r"made by another Dask client.*pool\.scatter"):
            await asyncio.wait_for(pool.run(add, theirs, 1), WAIT)
        await pool.aclose()
        assert client.status == "running"
        assert own.status == "closed"
        assert pool.state is PoolState.CLOSED


async def test_an_asynchronous_client_on_another_threads_loop_is_used_there(
    cluster: Any,
) -> None:
    async def connect() -> Any:
        return await distributed.Client(
            cluster.scheduler_address, asynchronous=True, set_as_default=False
        )

    async with offloop.LoopThread(name="their-client") as thread:
        client = await asyncio.wait_for(thread.run(connect), WAIT)
        try:
            async with offloop.DaskPool(client=client) as pool:
                assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3
                assert pool.client is client
                assert offloop_dask_threads() == []
            assert client.status == "running"
        finally:

            async def close() -> None:
                await client.close()

            await asyncio.wait_for(thread.run(close), WAIT)


def test_a_blocking_client_is_used_on_its_own_loop_thread(cluster: Any) -> None:
    with distributed.Client(cluster.scheduler_address) as client:

        async def use() -> tuple[int, str, int]:
            async with offloop.DaskPool(client=client) as pool:
                result = await asyncio.wait_for(pool.run(add, 1, 2), WAIT)
                assert pool.client is client
                # distributed runs a blocking client on a loop thread of its
                # own: the pool starts none.
                assert offloop_dask_threads() == []
                return result

        assert asyncio.run(use())[0] == 3
        assert client.status == "running"  # left open


async def test_cancelling_the_awaiter_cancels_the_task(cluster: Any, tmp_path: Path) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        gate, started = tmp_path / "gate", tmp_path / "started"
        call = asyncio.ensure_future(pool.run(wait_for_file, str(gate), str(started)))
        deadline = time.monotonic() + WAIT
        while not started.exists():
            assert time.monotonic() < deadline, "the task never started on the cluster"
            await asyncio.sleep(0.005)
        assert pool.statistics()["running"] == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The client let go of the task: the scheduler forgets it.
        deadline = time.monotonic() + WAIT
        while pool.client.futures:
            assert time.monotonic() < deadline, "the cancelled task is still held"
            await asyncio.sleep(0.005)
        gate.touch()
        assert pool.statistics()["cancelled"] == 1
        assert (await asyncio.wait_for(pool.run(add, 2, 2), WAIT))[0] == 4


async def test_bad_construction_is_refused() -> None:
    with pytest.raises(TypeError, match="exactly one of address="):
        offloop.DaskPool()
    with pytest.raises(TypeError, match=r"needs a distributed\.Client"):
        offloop.DaskPool(client=object())


@pytest.mark.loops("asyncio")
async def test_no_scheduler_at_the_address_is_a_clear_error(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # A loopback port nobody listens on: bound, then closed.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = offloop.DaskPool(f"tcp://127.0.0.1:{port}", connect_timeout=0.5)
    try:
        with pytest.raises(
            offloop.PoolConnectionError, match=rf"at 'tcp://127.0.0.1:{port}' within 0.5 s"
        ) as info:
            await asyncio.wait_for(pool.run(add, 1, 2), WAIT)
        assert info.value.__cause__ is not None  # distributed's own error, kept
    finally:
        await pool.aclose()
    # The half-open client was closed, not left with a never-awaited close().
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    with pytest.raises(
        ValueError,
        match=r"^DaskPool\(connect_timeout=\.\.\.\) must be greater than 0 seconds, got 0\.$",
    ):
        offloop.DaskPool("tcp://127.0.0.1:1", connect_timeout=0)
    # Not a number is a TypeError, as for every other duration offloop takes.
    with pytest.raises(TypeError, match=r"connect_timeout=\.\.\.\) must be a number of seconds"):
        offloop.DaskPool("tcp://127.0.0.1:1", connect_timeout="5")  # type: ignore[arg-type]


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    with pytest.raises(offloop.MissingExtraError, match=r"offloop\[dask\]"):
        offloop.DaskPool("tcp://127.0.0.1:1")


async def test_calls_with_equal_arguments_each_run(cluster: Any) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        # Submitted together, while each other's futures are alive: Dask would
        # hand one shared result to all three if their keys were equal.
        drawn = await asyncio.wait_for(
            asyncio.gather(*(pool.run(draw, "x") for _ in range(3))), WAIT
        )
        assert len(set(drawn)) == 3, drawn
        again = await asyncio.wait_for(pool.run(draw, "x"), WAIT)
        assert again not in drawn
        assert pool.statistics()["completed"] == 4


@pytest.fixture
def client_only_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A module that only this process can import.

    The cluster's workers started before its folder was put on sys.path, as
    with code that exists on the client's machine only.
    """
    name = f"client_only_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "def double(x):\n    return 2 * x\n\n\nclass Point:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        del sys.modules[name]


async def test_a_function_the_workers_cannot_import_is_not_picklable_there(
    cluster: Any, client_only_module: Any
) -> None:
    name = client_only_module.__name__
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        # Functions and classes travel by reference, by their module's name.
        with pytest.raises(
            offloop.NotPicklableError,
            match=rf"could not unpickle the call of function 'double' \(ModuleNotFoundError: "
            rf"No module named '{name}'\)",
        ) as info:
            await asyncio.wait_for(pool.run(client_only_module.double, 2), WAIT)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert str(info.value.__cause__).startswith('\n(in the Dask worker)\n"""\nTraceback')
        assert str(info.value).startswith(f"DaskPool {cluster.scheduler_address!r}: the Dask")
        with pytest.raises(offloop.NotPicklableError, match=rf"No module named '{name}'"):
            await asyncio.wait_for(pool.run(repr, client_only_module.Point()), WAIT)
        # The worker was not cut off from the scheduler: the next call runs.
        assert (await asyncio.wait_for(pool.run(add, 2, 2), WAIT))[0] == 4
        assert pool.statistics()["failed"] == 2


async def test_one_pool_serves_calls_from_several_loops(cluster: Any) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3

        async def call() -> Any:
            return await asyncio.wait_for(pool.run(add, 1, 1), WAIT)

        def from_another_loop() -> Any:
            return asyncio.run(call())

        assert (await asyncio.wait_for(asyncio.to_thread(from_another_loop), WAIT))[0] == 2
        assert (await asyncio.wait_for(pool.run(add, 2, 2), WAIT))[0] == 4
        assert pool.statistics()["completed"] == 3


def test_a_pool_whose_first_loop_is_gone_closes_from_another_loop(cluster: Any) -> None:
    pool = offloop.DaskPool(cluster.scheduler_address)

    async def call() -> Any:
        return await asyncio.wait_for(pool.run(add, 1, 2), WAIT)

    assert asyncio.run(call())[0] == 3
    asyncio.run(asyncio.wait_for(pool.aclose(), WAIT))
    assert pool.statistics()["state"] == "closed"
    assert pool.client.status == "closed"


async def test_a_client_closed_under_the_pool_is_pool_closed(cluster: Any) -> None:
    client = await distributed.Client(cluster.scheduler_address, asynchronous=True)
    pool = offloop.DaskPool(client=client)
    assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3
    await client.close()
    with pytest.raises(offloop.PoolClosedError, match=r"its distributed\.Client was closed"):
        pool.run(add, 1, 1)
    assert cluster.scheduler_address in repr(pool)  # not just 'client'
    await pool.aclose()


async def test_a_client_closed_during_a_call_is_pool_closed(cluster: Any, tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    client = await asyncio.to_thread(distributed.Client, cluster.scheduler_address)
    pool = offloop.DaskPool(client=client)
    call = pool.run(wait_for_file, str(gate), str(started))
    try:
        await await_until(started.exists, WAIT, "the call to start on the worker")
        await asyncio.wait_for(asyncio.to_thread(client.close), WAIT)
        # It was Dask's FutureCancelledError, "cancelled for reason: unknown".
        with pytest.raises(offloop.PoolClosedError, match=r"its distributed\.Client was closed"):
            await asyncio.wait_for(call, WAIT)
    finally:
        gate.touch()
    await pool.aclose()


async def test_a_call_cancelled_at_once_counts_as_cancelled(cluster: Any) -> None:
    pool = offloop.DaskPool(cluster.scheduler_address)
    call = pool.run(add, 1, 2)
    call.cancel()  # before the pool connected, or even took the call
    with pytest.raises(asyncio.CancelledError):
        await call
    assert pool.statistics()["cancelled"] == 1
    await asyncio.wait_for(pool.aclose(), WAIT)
    assert pool.statistics() == {
        "state": "closed",
        "queued": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
    }


def measure(prefix: bytes, data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(prefix + data).hexdigest()


async def test_a_big_bytes_argument_sent_to_many_calls_is_scattered_once(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        await asyncio.wait_for(pool.run(add, 0, 0), WAIT)  # connected
        client = pool.client
        scattered: list[int] = []
        real_scatter = client.scatter

        def scatter(data: Any, **options: Any) -> Any:
            scattered.append(sum(len(item) for item in data))
            return real_scatter(data, **options)

        monkeypatch.setattr(client, "scatter", scatter)
        data = os.urandom(SCATTER_BYTES)
        expected = (len(data), hashlib.sha256(b"p" + data).hexdigest())
        calls = [pool.run(measure, b"p", data) for _ in range(10)]
        calls += [pool.run(measure, b"p", data=data) for _ in range(10)]
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [expected] * 20
        assert scattered == [len(data)]  # once, for twenty calls
        # Below the threshold an argument travels inside the call.
        small = data[:-1]
        assert (await asyncio.wait_for(pool.run(measure, b"", small), WAIT))[0] == len(small)
        assert scattered == [len(data)]
        other = os.urandom(SCATTER_BYTES)
        assert (await asyncio.wait_for(pool.run(measure, b"", other), WAIT))[0] == len(other)
        assert scattered == [len(data), len(other)]


def lookup(table: dict[str, int], name: str) -> int:
    return table[name]


async def test_an_object_scattered_by_hand_reaches_every_call(cluster: Any) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        table = {f"k{i}": i for i in range(1000)}
        ref = await asyncio.wait_for(pool.scatter(table), WAIT)
        assert isinstance(ref, distributed.Future)
        found = await asyncio.wait_for(
            asyncio.gather(
                *(pool.run(lookup, ref, f"k{i}") for i in range(5)),
                pool.run(lookup, table=ref, name="k999"),
            ),
            WAIT,
        )
        assert found == [0, 1, 2, 3, 4, 999]
        with pytest.raises(offloop.NotPicklableError, match=r"scatter\(\) cannot send"):
            await asyncio.wait_for(pool.scatter(threading.Lock()), WAIT)
        del ref


async def test_a_pool_dropped_unclosed_closes_its_client_and_ends_its_thread(
    cluster: Any,
) -> None:
    pool = offloop.DaskPool(cluster.scheduler_address)
    assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3
    client = pool.client
    ref = weakref.ref(pool)
    with resource_warnings() as found:
        del pool
        # The client's thread lets go of the pool once its last call's task
        # has ended, which may come after the result reached this loop, and
        # the pool's finalizer may then warn on that thread after the weak
        # reference is dead: wait for the warning itself, as the other
        # dropped-pool tests do.
        await await_until(
            lambda: collected(ref) and warned(found, "DaskPool "),
            WAIT,
            "the dropped pool to be collected and warn",
        )
    # The collection may find other objects that warn (a test's socket): only ours counts.
    ours = [w for w in found if str(w.message).startswith("DaskPool ")]
    assert "was garbage collected without being closed" in the_warning(ours, "DaskPool")
    await await_until(lambda: not offloop_dask_threads(), WAIT, "the pool's thread to end")
    assert client.status == "closed"


async def test_a_pool_whose_scheduler_went_away_connects_again_on_the_next_call(
    offload_thread: None,
) -> None:
    # The pool's own client gives up once the scheduler is gone for
    # connect_timeout; the pool is still open, so its next call must connect
    # again (as after a failed first connection), not fail for good with an
    # error about a client the user never had.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "n_workers": 1,
        "threads_per_worker": 1,
        "processes": False,
        "host": "127.0.0.1",
        "scheduler_port": port,
        "dashboard_address": None,
        "asynchronous": True,
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    }
    address = f"tcp://127.0.0.1:{port}"
    pool = offloop.DaskPool(address, connect_timeout=0.5)
    big = os.urandom(SCATTER_BYTES)  # scattered by the pool, once per cluster
    try:
        async with distributed.LocalCluster(**options):
            assert (await asyncio.wait_for(pool.run(add, 1, 2), WAIT))[0] == 3
            assert await asyncio.wait_for(pool.run(len, big), WAIT) == SCATTER_BYTES
        client = pool._client
        await await_until(lambda: client.status != "running", WAIT, "the client to see it gone")
        # Made while the client tries to reconnect: it gives up, and the call
        # says the connection was lost (not that the user closed a client).
        with pytest.raises(
            offloop.PoolConnectionError, match=r"connection to the Dask scheduler was lost"
        ) as info:
            await asyncio.wait_for(pool.run(add, 1, 2), WAIT)
        # Dask's own error (the closed client or cancelled future) stays as the cause.
        assert isinstance(
            info.value.__cause__,
            (distributed.client.ClosedClientError, distributed.client.FutureCancelledError),
        )
        await await_until(lambda: client.status == "closed", WAIT, "the client to give up")
        with pytest.raises(offloop.PoolConnectionError, match=rf"at '{address}' within 0.5 s"):
            await asyncio.wait_for(pool.run(add, 1, 2), WAIT)
        async with distributed.LocalCluster(**options):
            assert (await asyncio.wait_for(pool.run(add, 2, 2), WAIT))[0] == 4
            # Not the reference scattered to the scheduler that went away.
            assert await asyncio.wait_for(pool.run(len, big), WAIT) == SCATTER_BYTES
            # The closed client is not kept for the finalizer: reconnects do not pile up.
            assert pool._opened == [pool._client]
    finally:
        await asyncio.wait_for(pool.aclose(), WAIT)

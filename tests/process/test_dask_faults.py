"""A Dask worker process killed under load: only its own calls fail, the pool goes on.

A cluster of its own (real ``distributed.LocalCluster``, two worker
processes): the nanny replaces the killed worker with a new child process,
which the leak check would take for one the test leaked; this cluster, and
that process with it, is gone when the test ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import offloop
from offloop._process.daskargs import SCATTER_BYTES
from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import await_until

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.loops("asyncio")

CALLS = 24


def hold(index: int, folder: str) -> int:
    """Say which process took call ``index``, wait for the gate, return this pid."""
    pid = os.getpid()
    Path(folder, f"{index}-{pid}").touch()
    deadline = time.monotonic() + WAIT
    while not os.path.exists(os.path.join(folder, "gate")):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.002)
    return pid


def add(a: int, b: int) -> int:
    return a + b


def started(folder: Path) -> dict[int, int]:
    """Call index -> the pid of the worker that started it."""
    found = {}
    for path in folder.iterdir():
        if path.name != "gate":
            index, pid = path.name.split("-")
            found[int(index)] = int(pid)
    return found


@pytest.fixture(scope="module")
def offload_thread() -> None:
    # distributed starts a process-wide helper thread on first use and keeps it.
    distributed.utils._offload_executor.submit(int).result(WAIT)


async def test_a_worker_killed_under_load_fails_only_its_calls(
    offload_thread: None, tmp_path: Path
) -> None:
    async with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        asynchronous=True,
        # KilledWorker at the first death, as a production cluster reports a
        # task whose workers kept dying; the HTTP server on any free port.
        scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        pool = offloop.DaskPool(cluster.scheduler_address)
        calls = [pool.run(hold, i, str(tmp_path)) for i in range(CALLS)]
        # Both workers run a call: the load is on, and each has one in hand.
        await await_until(
            lambda: len(set(started(tmp_path).values())) == 2, WAIT, "both workers to start"
        )
        victim = next(iter(started(tmp_path).values()))
        os.kill(victim, signal.SIGKILL)
        (tmp_path / "gate").touch()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)

        # Every call resolved exactly once: a pid, or WorkerCrashed.
        errors = {i: o for i, o in enumerate(outcomes) if isinstance(o, offloop.WorkerCrashed)}
        crashed = sorted(errors)
        others = [o for o in outcomes if not isinstance(o, (int, offloop.WorkerCrashed))]
        assert others == []
        assert crashed, "the call running on the killed worker did not fail"
        for error in errors.values():
            assert isinstance(error.__cause__, distributed.KilledWorker)
            assert str(error).startswith(
                f"DaskPool {cluster.scheduler_address!r}: the workers running function 'hold' "
                f"died while running it"
            )
        # Only the killed worker's calls: the one it ran, and at most the one
        # the scheduler had sent it to start next (never started: no marker).
        where = started(tmp_path)
        assert len(crashed) <= 2, crashed
        assert all(where.get(i, victim) == victim for i in crashed), (crashed, where)
        assert all(o != victim for o in outcomes if isinstance(o, int))
        stats = pool.statistics()
        assert stats["completed"] + stats["failed"] == CALLS
        assert (stats["failed"], stats["running"]) == (len(crashed), 0)

        # The pool keeps working, on what is left of the cluster.
        more = await asyncio.wait_for(
            asyncio.gather(*(pool.run(add, i, i) for i in range(8))), WAIT
        )
        assert more == [2 * i for i in range(8)]

        client = pool.client
        await asyncio.wait_for(pool.aclose(), WAIT)
        # Nothing of the pool's own is left: its client and its thread.
        assert client.status == "closed"
        assert not [t for t in threading.enumerate() if t.name.startswith("offloop-dask-")]


async def test_scattering_while_the_client_reconnects_is_a_lost_connection(
    offload_thread: None,
) -> None:
    # A big bytes argument is scattered before its call is submitted, and
    # pool.scatter() scatters: while the pool's client tries to reconnect to a
    # scheduler that went away, both fail with the comm's error (a connect
    # timeout, CommClosedError), which must reach the caller as the
    # PoolConnectionError the other calls get, not as a bare OSError.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = offloop.DaskPool(f"tcp://127.0.0.1:{port}", connect_timeout=3.0)
    try:
        async with distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            host="127.0.0.1",
            scheduler_port=port,
            dashboard_address=None,
            asynchronous=True,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ):
            assert await asyncio.wait_for(pool.run(add, 1, 2), WAIT) == 3
        client = pool.client
        await await_until(lambda: client.status != "running", WAIT, "the client to see it gone")
        big = os.urandom(SCATTER_BYTES)
        with pytest.raises(
            offloop.PoolConnectionError, match="connection to the Dask scheduler was lost"
        ) as info:
            await asyncio.wait_for(pool.run(len, big), WAIT)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(
            offloop.PoolConnectionError, match=r"\.scatter\(\).*connection .* was lost"
        ) as info:
            await asyncio.wait_for(pool.scatter(big), WAIT)
        assert isinstance(info.value.__cause__, OSError)
        assert pool.statistics()["failed"] == 1
    finally:
        await asyncio.wait_for(pool.aclose(), WAIT)

"""DaskPool hands the calls queued together to the scheduler together (``dasksubmit.py``).

The cluster fixtures are test_dask.py's: one cluster for this module. A
scheduler plugin on the in-process scheduler sees every ``update-graph``
message, so the tests count messages rather than time anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import offloop
from offloop._process.daskargs import PickledOnce, make_runner
from offloop._process.dasksubmit import MAX_BATCH, Submitter
from offloop._process.pickling import OK, encode_call
from tests.helpers import SPAWN_WAIT as WAIT
from tests.helpers import wait_for_file
from tests.process.test_dask import add, cluster, draw, offload_thread

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.loops("asyncio")

__all__ = ["cluster", "offload_thread"]  # fixtures, used by name


SchedulerPlugin: Any = distributed.diagnostics.plugin.SchedulerPlugin


class GraphMessages(SchedulerPlugin):  # type: ignore[misc]
    """The keys of every ``update-graph`` message the scheduler handles, one list per message."""

    def __init__(self) -> None:
        self.messages: list[list[str]] = []

    def update_graph(self, scheduler: Any, *, keys: Any = (), **kwargs: Any) -> None:
        self.messages.append(sorted(keys))


@pytest.fixture
def graph_messages(cluster: Any) -> Iterator[GraphMessages]:
    plugin = GraphMessages()
    cluster.scheduler.add_plugin(plugin, name="offloop-graph-messages")
    try:
        yield plugin
    finally:
        cluster.scheduler.remove_plugin(name="offloop-graph-messages")


@contextlib.contextmanager
def client_loop_held(pool: offloop.DaskPool) -> Iterator[None]:
    """Hold the pool's client loop meanwhile: the calls queued meanwhile are drained at once."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        assert release.wait(WAIT), "the test never released the client's loop"

    pool.client.loop.asyncio_loop.call_soon_threadsafe(hold)
    assert held.wait(WAIT), "the client's loop never ran the hold"
    try:
        yield
    finally:
        release.set()


async def test_equal_calls_queued_together_go_in_few_messages_and_each_runs(
    cluster: Any, graph_messages: GraphMessages
) -> None:
    calls = MAX_BATCH + 6
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2  # connected
        graph_messages.messages.clear()
        with client_loop_held(pool):
            futures = [pool.run(draw, "same") for _ in range(calls)]
        results = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        # Equal calls each ran: no two share a result (nor a key).
        assert len(set(results)) == calls
        assert all(result.startswith("same ") for result in results)
        # One message per group of at most MAX_BATCH calls, one key per call.
        assert [len(keys) for keys in graph_messages.messages] == [MAX_BATCH, 6]
        keys = [key for message in graph_messages.messages for key in message]
        assert len(set(keys)) == calls
        assert all(key.startswith("draw-") for key in keys)
        assert pool.statistics() == {
            "state": "open",
            "queued": 0,
            "running": 0,
            "completed": calls + 1,
            "failed": 0,
            "cancelled": 0,
        }


async def test_cancelling_one_call_of_a_batch_cancels_only_it(
    cluster: Any, graph_messages: GraphMessages, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2  # connected
        graph_messages.messages.clear()
        started = [tmp_path / f"started{index}" for index in range(4)]
        with client_loop_held(pool):
            calls = [pool.run(wait_for_file, str(gate), str(path)) for path in started]
        # The cluster's one worker runs two at a time: wait for two to start.
        deadline = time.monotonic() + WAIT
        while sum(path.exists() for path in started) < 2:
            assert time.monotonic() < deadline, "the calls never started on the cluster"
            await asyncio.sleep(0.005)
        assert [len(keys) for keys in graph_messages.messages] == [4]
        running = next(index for index, path in enumerate(started) if path.exists())
        calls[running].cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls[running]
        gate.touch()
        others = [call for index, call in enumerate(calls) if index != running]
        pids = await asyncio.wait_for(asyncio.gather(*others), WAIT)
        assert len(pids) == 3
        stats = pool.statistics()
        assert (stats["completed"], stats["cancelled"], stats["running"]) == (4, 1, 0)
        # The client let go of the cancelled task and of the others' results.
        deadline = time.monotonic() + WAIT
        while pool.client.futures:
            assert time.monotonic() < deadline, "a task is still held"
            await asyncio.sleep(0.005)


async def test_a_call_cancelled_before_its_batch_is_sent_never_reaches_the_cluster(
    cluster: Any, graph_messages: GraphMessages
) -> None:
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2  # connected
        graph_messages.messages.clear()
        with client_loop_held(pool):
            calls = [pool.run(add, index, 0) for index in range(3)]
            calls[1].cancel()  # still queued: skipped, never submitted
        with pytest.raises(asyncio.CancelledError):
            await calls[1]
        results = await asyncio.wait_for(asyncio.gather(calls[0], calls[2]), WAIT)
        assert [result[0] for result in results] == [0, 2]
        assert [len(keys) for keys in graph_messages.messages] == [2]
        stats = pool.statistics()
        assert (stats["completed"], stats["cancelled"], stats["queued"]) == (3, 1, 0)


async def test_a_call_cancelled_while_waiting_for_its_batch_is_left_out(
    cluster: Any, graph_messages: GraphMessages
) -> None:
    # Its task took it (RUNNING) but was cancelled before the batch went:
    # the Submitter drops it and sends the others.
    async with offloop.DaskPool(cluster.scheduler_address) as pool:
        assert (await asyncio.wait_for(pool.run(add, 1, 1), WAIT))[0] == 2  # connected
        graph_messages.messages.clear()
        client = pool.client
        submitter = Submitter(PickledOnce(make_runner()))

        async def submit_three() -> list[Any]:
            waiters = [
                submitter.submit(
                    client, f"add-batch-{index}", encode_call(add, (index, 1), {}, "test"), (), []
                )
                for index in range(3)
            ]
            waiters[1].cancel()
            await asyncio.sleep(0)  # the batch goes
            assert waiters[1].cancelled()
            futures = [await asyncio.wait_for(waiters[index], WAIT) for index in (0, 2)]
            # Dask futures are awaited on their client's loop.
            return [await asyncio.wait_for(future, WAIT) for future in futures]

        replies = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(submit_three(), client.loop.asyncio_loop)
        )
        assert graph_messages.messages == [["add-batch-0", "add-batch-2"]]
        assert [(status, value[0]) for status, value in replies] == [(OK, 1), (OK, 3)]

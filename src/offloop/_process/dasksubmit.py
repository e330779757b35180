"""How a DaskPool hands its calls to the client: those ready together, in one message.

Each ``client.submit`` is one ``update-graph`` message, and the scheduler
handles every such message in full: it unpickles the graph, hands its
materialisation to a thread of its own and back, culls it, opens a span,
logs an event, runs its plugins and transitions the tasks. With a
``LocalCluster`` that scheduler is a thread of the caller's process, so a
burst of 200 calls is 200 of those turns taking the GIL from the caller's
loop. :class:`Submitter` instead gathers the calls that become ready in the
same turn of the client's loop (a burst drained at once, the calls that
waited for the connection or for the same scatter) and sends them with one
``client.map`` per group: one message per group, each call under its own key
(``map`` with a list of keys, ``pure=False``).

A group holds calls with the same number of task dependencies (``map`` takes
one iterable per argument) and at most :data:`MAX_BATCH` of them, so that
the client's thread still comes up for air between groups (``GILPacer``).
Nothing in a group can fail one call alone at this point (each call is
pickled bytes already, its dependencies this client's own futures), so
should ``map`` raise (a client closing), every call of the group gets that
error.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, NamedTuple

from .clientloop import GILPacer

__all__ = ["MAX_BATCH", "Submitter"]

#: The most calls in one ``client.map``: one group's serialisation on the
#: client's thread and its turn in the scheduler stay short, and the pacer
#: gets a say between groups.
MAX_BATCH: Final = 64


class _Ready(NamedTuple):
    # A call waiting for its turn: what it submits, and where its Dask future goes.
    waiter: asyncio.Future[Any]
    key: str
    data: bytes
    slots: tuple[int | str, ...]
    deps: list[Any]


class Submitter:
    """Submits the calls ready in one turn of the client's loop together (on that loop only)."""

    __slots__ = ("_pacer", "_ready", "_run_call")

    def __init__(self, run_call: Any) -> None:
        self._run_call = run_call
        self._pacer = GILPacer()
        self._ready: list[_Ready] = []

    def submit(
        self,
        client: Any,
        key: str,
        data: bytes,
        slots: tuple[int | str, ...],
        deps: list[Any],
    ) -> asyncio.Future[Any]:
        """Queue ``run_call(data, slots, *deps)`` under ``key``; the future gets its Dask future.

        The calls queued in this turn of the loop go to ``client`` at the
        start of the next. Cancelling the returned future before then drops
        the call; it never reaches the cluster.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        if not self._ready:
            loop.call_soon(self._flush, client)
        self._ready.append(_Ready(waiter, key, data, slots, deps))
        return waiter

    def _flush(self, client: Any) -> None:
        ready, self._ready = self._ready, []
        groups: dict[int, list[_Ready]] = {}
        for item in ready:
            if not item.waiter.done():  # else cancelled while it waited
                groups.setdefault(len(item.deps), []).append(item)
        for group in groups.values():
            for start in range(0, len(group), MAX_BATCH):
                self._send(client, group[start : start + MAX_BATCH])

    def _send(self, client: Any, group: list[_Ready]) -> None:
        self._pacer.pace()
        try:
            futures = client.map(
                self._run_call,
                [item.data for item in group],
                [item.slots for item in group],
                *zip(*(item.deps for item in group), strict=True),
                key=[item.key for item in group],
                pure=False,
            )
        except Exception as exc:  # a closed client: every call of the group meets it
            for item in group:
                item.waiter.set_exception(exc)
        else:
            for item, future in zip(group, futures, strict=True):
                item.waiter.set_result(future)

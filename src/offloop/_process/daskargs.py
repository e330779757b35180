"""What travels beside a DaskPool call: scattered arguments, and the task that runs it.

A call is pickled whole, in ``run()``, into one ``bytes`` object: Dask sends
it inside the task, through the scheduler, to a worker. For a large argument
that many calls share (the same 1 MB buffer for 200 calls) that is 200 copies
through the scheduler. Scattered instead, the object goes to a worker once,
the workers copy it among themselves at most once each, and every task names
it by its key.

So ``run()`` takes out of the pickle every top-level argument that is a
Dask ``Future`` (scattered by hand with ``DaskPool.scatter``) or a ``bytes``
object of :data:`SCATTER_BYTES` or more, leaving ``None`` in its place, and
passes them to ``client.submit`` as the task's dependencies: the worker gets
the objects themselves and puts them back. ``bytes`` objects are scattered on
the client's loop, once per object (by identity: a ``bytes`` object cannot
change), and the references are kept for the next calls by a small cache
bounded in bytes (:data:`CACHE_BYTES`). Only ``bytes``: any other object may
be changed between two calls, and only the caller knows whether it was.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any, Final

from .pickling import LOAD_FAILED, OK, cloudpickle

__all__ = [
    "CACHE_BYTES",
    "SCATTER_BYTES",
    "PickledOnce",
    "ScatterCache",
    "make_runner",
    "split_arguments",
]

#: A top-level ``bytes`` argument this large or larger is scattered, not pickled into the call.
SCATTER_BYTES: Final = 256 * 1024

#: The most bytes of scattered arguments the pool keeps referenced for later calls
#: (the cluster keeps them in memory while referenced). Calls in flight keep
#: theirs on top of this.
CACHE_BYTES: Final = 64 << 20


class PickledOnce:
    """A function that is pickled by value once, then sent as those bytes.

    Every task carries its function, and both the client (``submit``) and the
    scheduler (sending the task to a worker) pickle it again. A function
    pickled by value is a walk over its code object in cloudpickle's Python
    code, on threads that share the GIL with the caller's loop when the
    cluster is a ``LocalCluster``; this object instead pickles as a reference
    to ``pickle.loads`` and bytes made on first use, which the C pickler copies.
    The worker gets the plain function back.
    """

    __slots__ = ("_fn", "_pickled")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._pickled: bytes | None = None

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        pickled = self._pickled
        if pickled is None:
            # Two threads may both get here first; they make the same bytes.
            cp = cloudpickle()
            assert cp is not None  # distributed needs cloudpickle
            pickled = self._pickled = cp.dumps(self._fn)
        return (pickle.loads, (pickled,))


def make_runner() -> Callable[..., tuple[Any, ...]]:
    """The function every DaskPool task runs on a worker (wrapped in :class:`PickledOnce`)."""
    # Defined in a function so that Dask pickles it by value: the workers need
    # not have offloop installed, only what the call itself needs.
    ok, load_failed = OK, LOAD_FAILED

    def offloop_dask_call(data: bytes, slots: tuple[int | str, ...], *deps: Any) -> tuple[Any, ...]:
        # The call is unpickled here, inside the task, rather than by Dask's
        # message layer: there a function the worker cannot import broke the
        # worker's stream to the scheduler, and the call waited forever.
        import pickle
        import traceback

        try:
            fn, args, kwargs = pickle.loads(data)
        except BaseException as exc:
            return (load_failed, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if slots:
            args = list(args)
            for slot, value in zip(slots, deps, strict=True):
                if type(slot) is int:
                    args[slot] = value
                else:
                    kwargs[slot] = value
        return (ok, fn(*args, **kwargs))

    return offloop_dask_call


def split_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], future_type: type
) -> tuple[tuple[int | str, ...], list[Any] | None, tuple[Any, ...], dict[str, Any]]:
    """Take out the arguments that travel as task dependencies.

    Returns their places (an ``int`` for a position, a ``str`` for a keyword),
    the objects (``None`` when there are none, the common case) and the
    arguments to pickle, with ``None`` in those places.
    """
    for value in args:
        if _travels_apart(value, future_type):
            break
    else:
        for value in kwargs.values():
            if _travels_apart(value, future_type):
                break
        else:
            return (), None, args, kwargs
    slots: list[int | str] = []
    deps: list[Any] = []
    new_args = list(args)
    for index, value in enumerate(args):
        if _travels_apart(value, future_type):
            slots.append(index)
            deps.append(value)
            new_args[index] = None
    new_kwargs = dict(kwargs)
    for name, value in kwargs.items():
        if _travels_apart(value, future_type):
            slots.append(name)
            deps.append(value)
            new_kwargs[name] = None
    return tuple(slots), deps, tuple(new_args), new_kwargs


def _travels_apart(value: Any, future_type: type) -> bool:
    return (type(value) is bytes and len(value) >= SCATTER_BYTES) or isinstance(value, future_type)


class ScatterCache:
    """The references of the ``bytes`` arguments scattered so far (the client's loop only).

    Keyed by the object's ``id``, which is the object's own while the cache
    holds the object.
    """

    def __init__(self, future_type: Any) -> None:
        self._future_type: Any = future_type
        # id -> (object, its scatter); oldest use first.
        self._entries: dict[int, tuple[bytes, asyncio.Future[Any]]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, client: Any, deps: list[Any]) -> list[Any]:
        """The task dependencies for ``deps``: ``bytes`` scattered (once), references as they are.

        Raises:
            ValueError: a reference was made by another client than ``client``.
        """
        out: list[Any] = []
        value: Any
        for value in deps:
            if isinstance(value, self._future_type):
                if value.client is not client:
                    raise ValueError(
                        f"DaskPool.run() got {value!r}, a reference made by another Dask "
                        f"client than the pool's ({value.client!r}). Send the object with "
                        f"the pool's own 'await pool.scatter(obj)' instead (again, if it came "
                        f"from pool.scatter() before the pool reconnected to its scheduler: "
                        f"the scheduler's copy is gone)."
                    )
                out.append(value)
                continue
            entry = self._entries.pop(id(value), None)
            if entry is not None and _lost(entry[1], client):
                # Scattered by a client since closed, or lost by the cluster
                # (a scheduler that restarted): a task naming it would fail.
                self._bytes -= len(value)
                entry = None
            if entry is None:
                entry = (value, asyncio.ensure_future(_scatter(client, value)))
                self._bytes += len(value)
            self._entries[id(value)] = entry  # now the latest use
            self._evict()
            try:
                # Shielded: a call cancelled while the object is on its way
                # must not cancel the scatter the other calls await.
                out.append(await asyncio.shield(entry[1]))
            except asyncio.CancelledError:
                raise
            except BaseException:
                if self._entries.get(id(value)) is entry:
                    del self._entries[id(value)]  # the next call tries again
                    self._bytes -= len(value)
                raise
        return out

    def clear(self) -> None:
        """Drop every reference: the cluster may forget those objects."""
        for _, scatter in self._entries.values():
            if not scatter.done():
                scatter.cancel()
        self._entries.clear()
        self._bytes = 0

    def _evict(self) -> None:
        entries = self._entries
        while self._bytes > CACHE_BYTES and len(entries) > 1:
            key = next(iter(entries))
            value, _ = entries.pop(key)
            self._bytes -= len(value)


def _lost(scatter: asyncio.Future[Any], client: Any) -> bool:
    # Whether a finished scatter's reference is no use to ``client`` any more.
    if not scatter.done() or scatter.cancelled() or scatter.exception() is not None:
        return False
    reference = scatter.result()
    return reference.client is not client or reference.status != "finished"


async def _scatter(client: Any, value: bytes) -> Any:
    # hash=False: a key of its own, without hashing megabytes to make one.
    [reference] = await client.scatter([value], hash=False)
    return reference

"""``DaskPool``: the same ``run()`` as the local pools, on a Dask cluster.

It talks to the cluster through ``distributed``'s asyncio client
(``asynchronous=True``): awaiting a call awaits the client's future on the
event loop, so no thread is blocked waiting for the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypedDict, TypeVar, final

from .._core.errors import NotPicklableError, PoolClosedError, WorkerCrashed
from .._core.extras import require
from .._core.poolbase import PoolContext, PoolState
from .._core.validate import check_seconds, check_sync_callable, describe
from .pickling import LOAD_FAILED, OK, RemoteTraceback, encode_call

__all__ = ["DaskPool"]

P = ParamSpec("P")
R = TypeVar("R")

_FEATURE: Final = "DaskPool"


def _make_runner() -> Callable[[bytes], tuple[Any, ...]]:
    # Defined in a function so that Dask pickles it by value: the workers need
    # not have offloop installed, only what the call itself needs.
    ok, load_failed = OK, LOAD_FAILED

    def offloop_dask_call(data: bytes) -> tuple[Any, ...]:
        # The call is unpickled here, inside the task, rather than by Dask's
        # message layer: there a function the worker cannot import broke the
        # worker's stream to the scheduler, and the call waited forever.
        import pickle
        import traceback

        try:
            fn, args, kwargs = pickle.loads(data)
        except BaseException as exc:
            return (load_failed, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return (ok, fn(*args, **kwargs))

    return offloop_dask_call


_run_call: Final = _make_runner()


class DaskPoolStatistics(TypedDict):
    """What :meth:`DaskPool.statistics` returns."""

    state: str
    running: int
    completed: int
    failed: int
    cancelled: int


@final
class DaskPool(PoolContext):
    """Run blocking or CPU-bound functions on a Dask ``distributed`` cluster.

    ``await pool.run(fn, *args, **kwargs)`` submits ``fn(*args, **kwargs)`` to
    the cluster and returns its result; exceptions keep their type and the
    worker's traceback. Functions and arguments travel with cloudpickle, so
    lambdas and closures work; an argument that cannot be pickled raises
    :class:`NotPicklableError` naming it before anything is sent.

    Two ways to connect; neither starts a cluster behind your back:

    - ``DaskPool("tcp://scheduler:8786")``: the pool opens an asynchronous
      ``distributed.Client`` on first use and closes it in :meth:`aclose`.
    - ``DaskPool(client=client)``: use a client you created with
      ``asynchronous=True`` (e.g. on a ``LocalCluster``); you close it.

    The pool belongs to the event loop its client runs on.

    Raises:
        MissingExtraError: ``distributed`` is not installed (``offloop[dask]``).
        TypeError: neither or both of ``address`` and ``client`` were given, or
            the client is not asynchronous.
        TypeError, ValueError: ``connect_timeout`` is not a number of seconds > 0.

    The first :meth:`run` raises ``ConnectionError`` naming the address when
    no scheduler answers there within ``connect_timeout`` seconds.
    """

    def __init__(
        self, address: str | None = None, *, client: Any = None, connect_timeout: float = 30.0
    ) -> None:
        distributed = require("distributed", "dask", feature=_FEATURE)
        if (address is None) == (client is None):
            raise TypeError(
                "DaskPool() needs exactly one of address= (a scheduler address such as "
                "'tcp://127.0.0.1:8786') or client= (a distributed.Client created with "
                f"asynchronous=True); got address={address!r} and client={client!r}. "
                "It never starts a cluster itself: for one machine, start a "
                "distributed.LocalCluster and pass its scheduler_address."
            )
        if client is not None:
            if not isinstance(client, distributed.Client):
                raise TypeError(
                    f"DaskPool(client=...) needs a distributed.Client, got {describe(client)}."
                )
            if not client.asynchronous:
                raise TypeError(
                    f"DaskPool(client=...) needs a client created with asynchronous=True, "
                    f"got the blocking client {client!r}; a blocking client would stall the "
                    f"event loop on every call."
                )
        elif not isinstance(address, str):
            raise TypeError(f"DaskPool(address=...) must be a str, got {describe(address)}.")
        self._connect_timeout = check_seconds(
            connect_timeout, "DaskPool(connect_timeout=...)", positive=True
        )
        self._distributed = distributed
        dask_utils = require("dask.utils", "dask", feature=_FEATURE)
        self._funcname: Callable[[Any], str] = dask_utils.funcname
        self._address = address
        self._client = client
        self._owns_client = client is None
        self._connecting: asyncio.Future[Any] | None = None
        self._state = PoolState.OPEN
        self._running = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._idle: asyncio.Event | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        # The loop of the first call: an asynchronous Client lives on one loop.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (``None`` until the first call connects)."""
        return self._client

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` on a cluster worker and return its result.

        ``fn``'s keyword arguments are passed through untouched (none of them
        is taken as a Dask option). Cancelling the awaiting task cancels the
        task on the cluster.

        Raises:
            TypeError: ``fn`` is not callable, or is a coroutine or generator function.
            NotPicklableError: the function or an argument cannot be pickled,
                or cannot be unpickled on the worker (its module is not
                importable there), or the result cannot be pickled.
            WorkerCrashed: the task's workers kept dying (Dask's ``KilledWorker``).
            PoolClosedError: the pool is closing or closed, or its client was closed.
            RuntimeError: called on another event loop than the pool's first call.
        """
        check_sync_callable(fn, "DaskPool.run()", "offloop.to_loop()")
        self._check_open()
        self._check_loop("run()")
        # Pickled here, where the culprit can be named (Dask would only log the
        # whole task graph as unserializable), and sent as bytes: the user's
        # kwargs stay out of submit()'s own options (key=, workers=, ...).
        data = encode_call(fn, args, kwargs, "DaskPool.run()")
        client = self._client
        if client is None:
            try:
                client = await self._connect()
            except asyncio.CancelledError:
                self._cancelled += 1  # cancelled before it was sent: counted like the others
                raise
        self._check_open()
        self._running += 1
        future = None
        try:
            # A key of its own per call, named after the function as Dask
            # names tasks: equal calls each run, none shares another's result.
            key = f"{self._funcname(fn)}-{uuid.uuid4()}"
            future = client.submit(_run_call, data, key=key)
            try:
                reply = await future
            except TypeError as exc:
                # A task that finished but whose result would not come back:
                # it cannot be pickled (Dask says so in a TypeError).
                if future.status != "finished":
                    raise
                raise NotPicklableError(
                    f"{self._named()}: {describe(fn)} ran on a Dask worker, but its result "
                    f"cannot be pickled to send it back ({_last_line(exc)}). Return plain data "
                    f"instead (e.g. a path instead of an open file)."
                ) from exc
            if reply[0] != OK:
                raise self._load_failed(fn, reply)
            result: R = reply[1]
        except asyncio.CancelledError:
            self._cancelled += 1
            if future is not None:
                self._chore(client.cancel([future]))
            raise
        except (
            self._distributed.client.ClosedClientError,
            self._distributed.client.FutureCancelledError,
        ) as exc:
            self._failed += 1
            if isinstance(exc, self._distributed.client.FutureCancelledError) and (
                client.status not in ("closing", "closed")
            ):
                raise  # cancelled on the cluster by someone else: Dask's own error says so
            raise PoolClosedError(
                f"{self._named()}: its distributed.Client was closed, so {describe(fn)} cannot "
                f"run or finish. Close the pool before its client, or create a new DaskPool "
                f"with an open client."
            ) from exc
        except self._distributed.KilledWorker as exc:
            self._failed += 1
            raise WorkerCrashed(
                f"{self._named()}: the workers running {describe(fn)} died while running it, "
                f"as many times as the scheduler allows ({exc}). Look at the workers' logs for "
                f"what killed them (memory limit, segfault)."
            ) from exc
        except BaseException:
            self._failed += 1
            raise
        else:
            self._completed += 1
            return result
        finally:
            self._running -= 1
            if self._running == 0 and self._idle is not None:
                self._idle.set()

    def statistics(self) -> DaskPoolStatistics:
        """Counters of this pool's calls.

        Keys: ``state``, ``running``, ``completed``, ``failed``, ``cancelled``.
        """
        return {
            "state": self._state.value,
            "running": self._running,
            "completed": self._completed,
            "failed": self._failed,
            "cancelled": self._cancelled,
        }

    async def aclose(self) -> None:
        """Refuse new calls, wait for running ones, and close the client if the pool opened it.

        A client passed as ``client=`` is left open. Closing twice is allowed.
        """
        home = self._loop
        if home is not None and home.is_closed():
            # The client's connections ended with its loop: nothing is left to close.
            self._state = PoolState.CLOSED
            self._client = None
            return
        self._check_loop("aclose()")
        if self._state is PoolState.OPEN:
            self._state = PoolState.CLOSING
        if self._running:
            self._idle = asyncio.Event()
            while self._running:
                await self._idle.wait()
                self._idle.clear()
        while self._chores:
            await asyncio.gather(*self._chores, return_exceptions=True)
        if self._connecting is not None and not self._connecting.done():
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.close()
        self._state = PoolState.CLOSED

    def __repr__(self) -> str:
        return (
            f"<DaskPool {self._where()!r} {self._state.value}: {self._running} running, "
            f"{self._completed} completed, {self._failed} failed>"
        )

    def _where(self) -> str | None:
        where = self._address
        if where is None and self._client is not None:
            where = getattr(self._client.scheduler, "address", None)
            if where is None:
                return "client"
            self._address = where  # kept: a closed client forgets it
        return where

    def _named(self) -> str:
        # For errors about one call: the counters would still count it as running.
        return f"DaskPool {self._where()!r}"

    def _load_failed(self, fn: Callable[..., Any], reply: tuple[Any, ...]) -> NotPicklableError:
        error = NotPicklableError(
            f"{self._named()}: the Dask worker could not unpickle the call of {describe(fn)} "
            f"({reply[1]}). Functions and classes are sent by reference: their module must be "
            f"importable on the workers (install it there, or send it with "
            f"client.upload_file())."
        )
        error.__cause__ = RemoteTraceback(reply[2], "the Dask worker")
        return error

    def _check_loop(self, what: str) -> None:
        loop = asyncio.get_running_loop()
        home = self._loop
        if home is None:
            self._loop = loop
            self._where()  # a client given as client= forgets its address once closed
        elif home is not loop:
            closed = " (closed now)" if home.is_closed() else ""
            raise RuntimeError(
                f"{self._named()}.{what} was called on another event loop ({loop!r}) than the "
                f"one the pool was first used on ({home!r}{closed}). A Dask asynchronous "
                f"client lives on one loop: create one DaskPool per loop, e.g. inside the "
                f"coroutine you pass to asyncio.run()."
            )

    def _check_open(self) -> None:
        if self._state is not PoolState.OPEN:
            raise PoolClosedError(
                f"{self!r} is {self._state.value} and takes no new calls; create a new DaskPool."
            )

    async def _connect(self) -> Any:
        # One connection for concurrent first calls: they all await the same future.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_client())
        try:
            return await asyncio.shield(self._connecting)
        except Exception:
            self._connecting = None  # the next call tries again
            raise

    async def _open_client(self) -> Any:
        client = self._distributed.Client(
            self._address, asynchronous=True, timeout=self._connect_timeout
        )
        try:
            await client
        except Exception as exc:
            with contextlib.suppress(Exception):
                await client.close()  # the half-open client, or its close is never awaited
            raise ConnectionError(
                f"DaskPool could not connect to a Dask scheduler at {self._address!r} within "
                f"{self._connect_timeout:g} s ({type(exc).__name__}: {exc}). Check that a "
                f"scheduler listens there: for one machine start a distributed.LocalCluster "
                f"and pass its scheduler_address; the next call tries again."
            ) from exc
        # Stored here, not by the run() that awaits this: an aclose() that
        # awaited the connection must find the client to close it.
        self._client = client
        return client

    def _chore(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


def _last_line(exc: BaseException) -> str:
    # Dask's message ends with the pickler's own error, after a traceback.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__

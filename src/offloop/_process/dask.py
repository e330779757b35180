"""``DaskPool``: the same ``run()`` as the local pools, on a Dask cluster.

The caller's loop does as little as a local pool asks of it: ``run()``
pickles the call (where a culprit can still be named), queues it and returns
an :class:`~offloop.OffloadFuture`. Everything the Dask client does (task
keys, serialisation, the messages to and from the scheduler, scattering)
runs on the client's own loop, in another thread (``clientloop.py``); results
come back to the caller's loop batched, through the loop's ``Channel``, as
from every other pool.

Which loop the client lives on:

- a client the pool opens (``DaskPool(address)``): on the pool's own loop
  thread, ``offloop-dask-<n>``;
- a blocking client (``Client(address)``): on the loop thread distributed
  started for it, which the pool uses as it is;
- an asynchronous client (``asynchronous=True``): on the loop that created
  it, mostly the caller's. The pool leaves it to its owner and opens a second
  client to the same scheduler, with the same security, on its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Final, ParamSpec, TypeVar, final

from .._core.errors import NotPicklableError, PoolClosedError, PoolConnectionError
from .._core.extras import require
from .._core.offload import (
    ABANDONED,
    DONE,
    QUEUED,
    RUNNING,
    SKIPPED,
    OffloadFuture,
    new_call,
    running_loop,
)
from .._core.poolbase import PoolContext, PoolState
from .._core.registry import register
from .._core.validate import check_seconds, check_sync_callable, check_thread_name, describe
from .clientloop import ClientLoop
from .daskargs import PickledOnce, ScatterCache, make_runner, split_arguments
from .daskcounts import DaskCounters
from .daskerrors import client_closed, connection_lost, last_line, load_failed, translate
from .dasksubmit import Submitter
from .pickling import OK, encode_call

__all__ = ["DaskPool"]

P = ParamSpec("P")
R = TypeVar("R")

_FEATURE: Final = "DaskPool"
_RUN: Final = "DaskPool.run()"

_run_call: Final = PickledOnce(make_runner())
_pool_numbers: Final = itertools.count(1)
#: Seconds a dropped pool's client gets to close before its loop stops anyway.
_DROP_CLOSE: Final = 5.0


class DaskCall(OffloadFuture[Any]):
    # The future of one cluster call: the pickled call and what travels beside it.
    __slots__ = ("_data", "_deps", "_slots")

    _data: bytes | None
    _slots: tuple[int | str, ...]
    _deps: list[Any] | None


@final
class DaskPool(DaskCounters, PoolContext):
    """Run blocking or CPU-bound functions on a Dask ``distributed`` cluster.

    ``await pool.run(fn, *args, **kwargs)`` submits ``fn(*args, **kwargs)`` to
    the cluster and returns its result; exceptions keep their type and the
    worker's traceback. Functions and arguments travel with cloudpickle, so
    lambdas and closures work; an argument that cannot be pickled raises
    :class:`NotPicklableError` naming it before anything is sent.

    The Dask client never runs on the caller's event loop: its serialisation
    and messaging run on a loop thread (see the module docs of
    ``docs/processes.md``), so one pool serves calls from any loop. Three ways
    to connect; none starts a cluster behind your back:

    - ``DaskPool("tcp://scheduler:8786")``: the pool opens a client on its own
      loop thread on first use, and closes both in :meth:`aclose`.
    - ``DaskPool(client=client)`` with a blocking client
      (``distributed.Client(address)``): the pool uses it on the loop thread
      distributed runs it on; you close it.
    - ``DaskPool(client=client)`` with a client created with
      ``asynchronous=True``: that client lives on your loop, so the pool opens
      a second client to the same scheduler (same security settings) on its
      own loop thread, and closes it in :meth:`aclose`; you close yours.

    A top-level ``bytes`` argument of 256 KiB or more is scattered to the
    cluster once and sent by reference: passing the same object to many calls
    sends it once. Send any other large object once with :meth:`scatter`.

    ``name`` is the pool's ``pool`` label in the supervisor's ``/metrics``
    (where its ``kind`` is ``dask``); default ``dask<n>``.

    Raises:
        MissingExtraError: ``distributed`` is not installed (``offloop[dask]``).
        TypeError: neither or both of ``address`` and ``client`` were given.
        TypeError, ValueError: ``connect_timeout`` is not a number of seconds > 0.
        TypeError, ValueError: ``name`` is not a non-empty str.

    The first :meth:`run` fails with :class:`PoolConnectionError` (a
    ``ConnectionError``) naming the address when no scheduler answers there
    within ``connect_timeout`` seconds; so do the calls running when the
    connection is lost, saying so. A later call connects again.
    """

    _kind = "dask"  # the kind label of its /metrics series

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        connect_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        distributed = require("distributed", "dask", feature=_FEATURE)
        if (address is None) == (client is None):
            raise TypeError(
                "DaskPool() needs exactly one of address= (a scheduler address such as "
                "'tcp://127.0.0.1:8786') or client= (a distributed.Client); got "
                f"address={address!r} and client={client!r}. It never starts a cluster "
                "itself: for one machine, start a distributed.LocalCluster and pass its "
                "scheduler_address."
            )
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(
                f"DaskPool(client=...) needs a distributed.Client, got {describe(client)}."
            )
        if address is not None and not isinstance(address, str):
            raise TypeError(f"DaskPool(address=...) must be a str, got {describe(address)}.")
        self._connect_timeout = check_seconds(
            connect_timeout, "DaskPool(connect_timeout=...)", positive=True
        )
        check_thread_name(name, "DaskPool", names="its /metrics series")
        self._distributed = distributed
        dask_utils = require("dask.utils", "dask", feature=_FEATURE)
        self._funcname: Callable[[Any], str] = dask_utils.funcname
        self._address = address
        self._given = client
        #: The client the calls go through (the given one, or one the pool opened).
        self._client: Any = None
        self._owns_client = False
        self._lock = threading.Lock()
        self._state = PoolState.OPEN
        self._init_counters()
        self._number = next(_pool_numbers)
        self._name = name or f"dask{self._number}"
        self._thread = ClientLoop(f"offloop-dask-{self._number}")
        #: The loop the client lives on; set by the first call.
        self._home: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[DaskCall] = deque()
        self._kicked = False
        self._closing: concurrent.futures.Future[None] | None = None
        self._finalizer: weakref.finalize[..., Any] | None = None
        #: The client the pool opened, for the finalizer of a pool dropped unclosed.
        self._opened: list[Any] = []
        # Touched on the client's loop only.
        self._tasks: dict[OffloadFuture[Any], asyncio.Task[None]] = {}
        self._connecting: asyncio.Future[Any] | None = None
        self._idle: asyncio.Event | None = None
        self._scattered = ScatterCache(distributed.Future)
        self._submitter = Submitter(_run_call)
        # Task keys: this pool's random part, drawn once on the client's
        # thread, and a counter. A uuid4 per call would be a system call per
        # submission (see GILPacer).
        self._key_prefix: str | None = None
        self._key_numbers = itertools.count()
        register(self)

    @property
    def name(self) -> str:
        """The pool's name, its ``pool`` label in ``/metrics``."""
        return self._name

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` the calls go through (``None`` until the first call).

        It lives on another thread's loop: use it from there, or for what
        distributed lets any thread do (a blocking client's methods).
        """
        return self._client

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> OffloadFuture[R]:
        """Run ``fn(*args, **kwargs)`` on a cluster worker; await the result.

        The call is pickled and queued at once. ``fn``'s keyword arguments
        are passed through untouched (none of them is taken as a Dask option).
        Cancelling the future (or the task awaiting it) cancels the task on
        the cluster.

        Raises:
            TypeError: ``fn`` is not callable, or is a coroutine or generator function.
            NotPicklableError: the function or an argument cannot be pickled
                (raised here), or cannot be unpickled on the worker (its module is
                not importable there), or the result cannot be pickled.
            WorkerCrashed: (by the await) the task's workers kept dying (Dask's
                ``KilledWorker``).
            PoolClosedError: the pool is closing or closed, or its client was closed.
            RuntimeError: no event loop is running in this thread.
        """
        check_sync_callable(fn, _RUN, "offloop.to_loop()")
        loop = running_loop(_RUN)
        self._check_open()
        slots, deps, send_args, send_kwargs = split_arguments(
            args, kwargs, self._distributed.Future
        )
        # Pickled here, where the culprit can be named (Dask would only log the
        # whole task graph as unserializable), and sent as bytes: the user's
        # kwargs stay out of submit()'s own options (key=, workers=, ...).
        data = encode_call(fn, send_args, send_kwargs, _RUN)
        call = new_call(self, fn, (), {}, loop, DaskCall, carry_context=False)
        call._data = data
        call._slots = slots
        call._deps = deps
        with self._lock:
            self._check_open()
            home = self._home
            if home is None:
                home = self._start()
            self._running += 1
            self._outbox.append(call)
            kick = not self._kicked
            self._kicked = True
        if kick:
            # One wake-up of the client's loop per burst of calls.
            home.call_soon_threadsafe(self._drain)
        return call

    async def scatter(self, obj: Any) -> Any:
        """Send ``obj`` to the cluster once; pass what this returns to :meth:`run` in its place.

        For a large object that many calls take (a model, a table, an array):
        each call then sends a reference, and the workers fetch the object
        from each other at most once each. Pass the reference as a top-level
        argument (``pool.run(fn, ref)``, ``pool.run(fn, data=ref)``); the
        function gets the object. The cluster keeps it while you hold the
        reference. ``bytes`` arguments of 256 KiB or more need none of this:
        the pool scatters them itself.

        Raises:
            PoolClosedError: the pool is closing or closed.
            NotPicklableError: ``obj`` cannot be pickled.
        """
        with self._lock:
            self._check_open()
            if self._home is None:
                self._start()
        return await asyncio.wrap_future(self._on_home(lambda: self._scatter_now(obj)))

    async def aclose(self) -> None:
        """Refuse new calls, wait for running ones, close what the pool opened, end its thread.

        A client passed as ``client=`` is left open. Closing twice is allowed;
        the second call waits like the first. It may be awaited on any loop.
        """
        with self._lock:
            if self._state is PoolState.OPEN:
                self._state = PoolState.CLOSING
            if self._home is None or self._home.is_closed():
                # Never used, or a blocking client's loop ended with its
                # client, which failed the calls it had.
                self._state = PoolState.CLOSED
                return
            if self._closing is None:
                self._closing = self._on_home(self._close)
            closing = self._closing
        try:
            await asyncio.wrap_future(closing)
        finally:
            if closing.done():
                self._thread.stop()
                with self._lock:
                    self._state = PoolState.CLOSED
                if self._finalizer is not None:
                    self._finalizer.detach()

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"<DaskPool {self._where()!r} {self._state.value}: {self._running} running, "
                f"{self._completed} completed, {self._failed} failed>"
            )

    # -- the caller's side ------------------------------------------------------

    def _start(self) -> asyncio.AbstractEventLoop:
        # Under _lock, on the first call: find or start the client's loop.
        given = self._given
        if given is not None and given.status in ("closing", "closed"):
            raise client_closed(self._named(), None)
        theirs: Any = None if given is None else given.loop.asyncio_loop
        # distributed's "asynchronous" is true on the client's own loop: here,
        # false for a client whose loop runs in another thread (a blocking
        # client's, or any other thread's), which the pool can use as it is.
        if given is not None and not given.asynchronous and theirs.is_running():
            home: asyncio.AbstractEventLoop = theirs
            self._client = given
        else:
            home = self._thread.start()
            # Dropped unclosed: the thread must not live on with its client.
            self._finalizer = weakref.finalize(
                self, _dropped, self._thread, self._opened, repr(self._where())
            )
        self._home = home
        return home

    def _on_home(self, coro_fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        home = self._home
        assert home is not None
        if self._thread.loop is home:
            return self._thread.run(coro_fn)
        coro = _call(coro_fn)
        try:
            return asyncio.run_coroutine_threadsafe(coro, home)
        except RuntimeError:
            coro.close()  # a blocking client's loop, closed with its client
            raise

    def _cancel(self, call: OffloadFuture[Any]) -> bool:
        """The call's future was cancelled: skip it, or cancel its task on the cluster."""
        with self._lock:
            if call._phase is QUEUED:
                call._phase = SKIPPED  # _serve drops it
                self._skipped += 1
            elif call._phase is RUNNING:
                call._phase = ABANDONED
            else:
                return True
            self._cancelled += 1
            home = self._home if call._phase is ABANDONED else None
        if home is not None:
            with contextlib.suppress(RuntimeError):  # its loop is gone, and the task with it
                home.call_soon_threadsafe(self._cancel_task, call)
        return True

    def _check_open(self) -> None:
        if self._state is not PoolState.OPEN:
            raise PoolClosedError(
                f"<DaskPool {self._where()!r} {self._state.value}> takes no new calls; "
                f"create a new DaskPool."
            )
        given = self._given
        if given is not None and given.status in ("closing", "closed"):
            raise client_closed(self._named(), None)

    def _where(self) -> str | None:
        where = self._address
        client = self._client if self._client is not None else self._given
        if where is None and client is not None:
            where = getattr(client.scheduler, "address", None)
            if where is None:
                return "client"
            self._address = where  # kept: a closed client forgets it
        return where

    def _named(self) -> str:
        return f"DaskPool {self._where()!r}"

    # -- the client's loop -------------------------------------------------------

    def _drain(self) -> None:
        with self._lock:
            self._kicked = False
            calls, self._outbox = self._outbox, deque()
        loop = asyncio.get_running_loop()
        for call in calls:
            self._tasks[call] = loop.create_task(self._serve(call))

    def _cancel_task(self, call: OffloadFuture[Any]) -> None:
        task = self._tasks.get(call)
        if task is not None:
            task.cancel()

    async def _serve(self, call: DaskCall) -> None:
        with self._lock:
            skipped = call._phase is not QUEUED
            if not skipped:
                call._phase = RUNNING
        ok = False
        value: Any = None
        cancelled = skipped
        future = None
        client = None
        sent = -1.0  # monotonic, when handed to the client; -1: never
        try:
            if not skipped:
                client = await self._connected()
                deps = await self._scattered.resolve(client, call._deps or [])
                fn = call.fn
                # A key of its own per call: equal calls each run, none shares
                # another's result.
                if self._key_prefix is None:
                    self._key_prefix = uuid.uuid4().hex
                key = f"{self._funcname(fn)}-{self._key_prefix}-{next(self._key_numbers)}"
                assert call._data is not None
                waiter = self._submitter.submit(client, key, call._data, call._slots, deps)
                del deps
                try:
                    future = await waiter
                except asyncio.CancelledError:
                    # Cancelled once its turn came: the task exists.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        future = waiter.result()
                    raise
                with self._lock:
                    sent = monotonic()
                    self._on_cluster += 1
                call._data = call._deps = None
                reply = await future
                # Not raised here: translate() would take it for Dask's error.
                ok = reply[0] == OK
                value = reply[1] if ok else load_failed(self._named(), fn, reply)
        except asyncio.CancelledError:
            cancelled = True
            if future is not None and client is not None:
                # A client that is closing drops the task anyway.
                with contextlib.suppress(Exception):
                    await client.cancel([future])
        except BaseException as exc:  # the call's outcome, whatever it is
            value = translate(
                self._named(),
                self._distributed,
                call.fn,
                exc,
                future,
                client,
                own_client=self._owns_client,
            )
        finally:
            call._data = call._deps = None
            self._tasks.pop(call, None)
            del future
        with self._lock:
            abandoned = call._phase is not RUNNING
            call._phase = DONE
            self._running -= 1
            if skipped:
                self._skipped -= 1
            if sent >= 0:
                self._on_cluster -= 1
            if not (cancelled or abandoned):
                if ok:
                    self._completed += 1
                else:
                    self._failed += 1
                if sent >= 0:
                    self._record(call, sent)
            idle = self._running == 0
        if idle and self._idle is not None:
            self._idle.set()
        if not (cancelled or abandoned):
            if ok:
                call._value = value
            else:
                call._error = value
            call._channel.post(call)

    async def _connected(self) -> Any:
        client = self._client
        if client is not None:
            if not (self._owns_client and client.status in ("closing", "closed")):
                return client
            # The pool's own client gave up on a scheduler that went away
            # (distributed closes it after failing to reconnect for its
            # timeout). The pool is open: connect again, as after a first
            # connection that failed; a PoolConnectionError names the address if
            # no scheduler answers there. What it scattered went with it, and
            # the finalizer has nothing left to close in it.
            self._client = self._connecting = None
            self._scattered.clear()
            with contextlib.suppress(ValueError):
                self._opened.remove(client)
        # One connection for concurrent first calls: they all await the same future.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_client())
        try:
            return await asyncio.shield(self._connecting)
        except Exception:
            self._connecting = None  # the next call tries again
            raise

    async def _open_client(self) -> Any:
        given = self._given
        address = self._where() if given is not None else self._address
        options: dict[str, Any] = {}
        if given is not None:
            options["security"] = given.security
        client = self._distributed.Client(
            address,
            asynchronous=True,
            timeout=self._connect_timeout,
            # Not the process's default client: that one is the user's to choose.
            set_as_default=False,
            **options,
        )
        try:
            await client
        except Exception as exc:
            with contextlib.suppress(Exception):
                await client.close()  # the half-open client, or its close is never awaited
            raise PoolConnectionError(
                f"DaskPool could not connect to a Dask scheduler at {address!r} within "
                f"{self._connect_timeout:g} s ({type(exc).__name__}: {exc}). Check that a "
                f"scheduler listens there: for one machine start a distributed.LocalCluster "
                f"and pass its scheduler_address; the next call tries again."
            ) from exc
        self._owns_client = True
        self._client = client
        self._opened.append(client)
        return client

    async def _scatter_now(self, obj: Any) -> Any:
        client = await self._connected()
        try:
            [reference] = await client.scatter([obj], hash=False)
        except Exception as exc:
            if isinstance(exc, TypeError) or "pickle" in str(exc).lower():
                raise NotPicklableError(
                    f"{self._named()}.scatter() cannot send {describe(obj)}: it cannot be "
                    f"pickled ({last_line(exc)})."
                ) from exc
            if isinstance(exc, OSError) and self._owns_client and client.status != "running":
                # The comm's error (a connect timeout, CommClosedError) while the
                # pool's client reconnects: what the calls get then, too.
                raise connection_lost(
                    f"{self._named()}.scatter(): the connection to the Dask scheduler was "
                    f"lost, so {describe(obj)} was not sent."
                ) from exc
            raise
        return reference

    async def _close(self) -> None:
        while True:
            with self._lock:
                if self._running == 0:
                    break
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._scattered.clear()
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            with contextlib.suppress(Exception):  # the failed first call reported it
                await connecting
        if self._owns_client and self._client is not None:
            await self._client.close()


async def _call(coro_fn: Callable[[], Any]) -> Any:
    return await coro_fn()


def _dropped(thread: ClientLoop, opened: list[Any], where: str) -> None:
    # The finalizer of an open pool that was garbage collected (it had no call
    # in flight: a call's task holds its pool): close the client it opened and
    # end its loop thread. It runs on whichever thread dropped the pool, so it
    # takes no lock and waits for nothing.
    loop = thread.loop
    if loop is not None and not loop.is_closed():

        async def close_then_stop() -> None:
            try:
                for client in opened:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.close(), _DROP_CLOSE)
            finally:
                asyncio.get_running_loop().stop()

        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(close_then_stop()))
        except RuntimeError:
            return
        warnings.warn(
            f"DaskPool {where} was garbage collected without being closed; its loop thread "
            f"is being stopped now. Close a pool when done with it: 'async with "
            f"DaskPool(...) as pool:' or 'await pool.aclose()'.",
            ResourceWarning,
            stacklevel=2,
        )

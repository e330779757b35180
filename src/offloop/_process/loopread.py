"""Replies read by the caller's event loop: a round trip with one thread wake-up fewer.

Without this, a worker's reply travels worker -> manager thread -> the
caller's loop: two wake-ups. Here the loop of a call handed to an idle worker
watches that worker's pipe itself (``loop.add_reader`` on a second descriptor
of it, ``ProcessWorker.lsock``) and reads the reply when it comes, as anyio's
loop reads its workers' stdout. The manager thread stays the owner of
everything else: starting workers, their deaths, kills on cancel, closing.

Who reads a worker's reply is ``ProcessWorker.reader`` (under the pool's lock):
the loop, ``MANAGER``, or None when the worker runs no call. Only the reader
takes bytes from the pipe. The loop reads once, without blocking, under the
lock, and if that was the whole reply it detaches the call from the worker in
the same step; so a reply is read once, and a call resolved once, whoever
races. Otherwise (the reply is over :data:`READ_MAX` bytes, not all written
yet, or the pipe ended because the worker died) it hands the worker to the
manager thread (reader ``MANAGER``, ``_adopt``) with the bytes it read
(``ProcessWorker.prefix``): the manager reads the rest (:func:`read_rest`) and
unpickles it off the loop, or sees the death in ``_on_exit``. The manager takes
over by itself when the worker dies, the call is cancelled (a cancelled call is
awaited by no one, so its loop may stop or close before the reply), or the
loop closed.

A loop keeps watching a worker between calls, so that its next call to that
worker costs no registration. Only that loop can remove its registration: it
does so when its callback finds it is not the reader any more, which happens
at the latest when the worker's pipe ends.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Final

from .._core.offload import deliverable, release
from .pickling import decode_reply
from .records import MANAGER, ProcessCall, ProcessWorker, ask_to_exit, close_lsock

__all__ = ["READ_MAX", "LoopReplies", "read_rest"]

#: Largest reply (pickled, with its 4-byte header) a loop reads itself. Of a
#: larger one the loop reads this much; the manager thread reads the rest
#: and unpickles it, off the loop.
READ_MAX: Final = 64 * 1024

#: Loops without add_reader (Windows' proactor): their calls' replies go
#: through the manager thread.
_NO_READER: Final[weakref.WeakSet[asyncio.AbstractEventLoop]] = weakref.WeakSet()

# multiprocessing.Connection's framing: a signed 4-byte size, -1 then an
# 8-byte size for a message over 2 GiB.
_HEADER: Final = struct.Struct("!i")
_HUGE: Final = struct.Struct("!Q")

#: Read without blocking (Windows has no MSG_DONTWAIT; its loops have no add_reader).
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)


class LoopReplies:
    """The part of the pool that lets a call's loop read its reply (mixed into WorkerSet)."""

    if TYPE_CHECKING:
        _lock: threading.Lock
        _idle: list[ProcessWorker]
        _adopt: list[ProcessWorker]
        _run_name: str
        _max_tasks: int | None
        _scratch: bytearray

        def _free(self, worker: ProcessWorker) -> tuple[ProcessCall | None, bool]: ...
        def _settle(self, call: ProcessCall, assigned: float, *, ok: bool) -> None: ...
        def _send(self, worker: ProcessWorker, call: ProcessCall) -> None: ...
        def _wake(self) -> None: ...

    def _read_on_loop(self, worker: ProcessWorker, loop: asyncio.AbstractEventLoop) -> bool:
        """Under _lock, on ``loop``'s thread: make ``loop`` read the reply to the call just
        assigned to ``worker``. Returns True if the manager must be woken (it reads it).
        """
        watcher = worker.watcher
        if watcher is loop:
            worker.reader = loop
            return False
        if watcher is not None and watcher.is_closed():
            # Its selector, and the registration with it, are gone.
            watcher = worker.watcher = None
        sock = worker.lsock
        if watcher is None and sock is not None and loop not in _NO_READER:
            try:
                # The loop holds the pool only weakly: an idle worker it
                # watches must not keep a pool its user dropped alive.
                loop.add_reader(sock.fileno(), _readable, weakref.ref(self), worker, loop)
            except NotImplementedError:
                _NO_READER.add(loop)
            else:
                # uvloop (libuv's uv_poll_init) makes the descriptor
                # non-blocking, and with it the pipe's other descriptors:
                # the manager's reads and the writer's writes expect blocking.
                # This loop reads without blocking either way.
                os.set_blocking(sock.fileno(), True)
                worker.watcher = loop
                worker.reader = loop
                return False
        # Another loop still watches it (it lets go on its next callback), or
        # this loop cannot watch descriptors.
        return self._to_manager(worker)

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> ProcessWorker:
        """Under _lock: the idle worker to give a call of ``loop`` (there is one).

        The last one that loop watched (most recently used first): it costs
        no registration. Else one no loop watches.
        """
        idle = self._idle
        for index in range(len(idle) - 1, -1, -1):
            if idle[index].watcher is loop:
                return idle.pop(index)
        for index in range(len(idle) - 1, -1, -1):
            if idle[index].watcher is None:
                return idle.pop(index)
        return idle.pop()

    def _to_manager(self, worker: ProcessWorker) -> bool:
        """Under _lock: the manager thread reads the worker's replies from now on.

        Returns True if the manager must be woken to start watching the pipe.
        """
        if worker.reader is MANAGER:
            return False
        worker.reader = MANAGER
        self._adopt.append(worker)
        return True

    def _unwatch(self, worker: ProcessWorker, loop: asyncio.AbstractEventLoop) -> None:
        """Under _lock, on ``loop``'s thread: stop watching the worker's pipe from ``loop``."""
        if worker.watcher is not loop:
            return
        worker.watcher = None
        sock = worker.lsock
        if sock is not None:
            loop.remove_reader(sock.fileno())
            if worker.dead:  # the manager left it to this loop to close
                close_lsock(worker)

    def _on_loop_reply(self, worker: ProcessWorker, loop: asyncio.AbstractEventLoop) -> None:
        """``loop``'s reader callback: the worker's pipe is readable."""
        with self._lock:
            if worker.reader is not loop:
                # The manager took over, or the worker runs no call and its
                # pipe ended (it died): this loop lets go of it.
                self._unwatch(worker, loop)
                return
            call = worker.call
            taken = _take_reply(worker.lsock, self._scratch)
            if taken is None:
                return  # woken for nothing (another callback of this loop read it)
            whole, data = taken
            if not whole:  # the manager reads the rest, or sees the worker die
                worker.prefix = data
                self._unwatch(worker, loop)
                wake = self._to_manager(worker)
            else:
                wake = False
                assigned = worker.assigned
                # Detached in the same step as the read: the manager, seeing
                # the worker die from now on, has no call of it to fail.
                worker.call = None
                if call is not None:
                    call._worker = None
        if wake:
            self._wake()
            return
        if call is None:
            return  # cannot happen: a worker only speaks when spoken to
        ok, outcome = decode_reply(data, call.fn, self._run_name)
        if ok:
            call._value = outcome
        else:
            call._error = outcome
        wake = False
        with self._lock:
            self._settle(call, assigned, ok=ok)
            worker.tasks += 1
            if self._max_tasks is not None and worker.tasks >= self._max_tasks:
                worker.doomed = True  # exits on its own after this reply
            following, stop = self._free(worker)
            if following is not None and following.loop is loop and following._sink is None:
                worker.reader = loop  # and this loop keeps watching
            else:
                worker.reader = None
                if following is not None:
                    self._unwatch(worker, loop)
                    wake = self._to_manager(worker)
                elif worker.doomed:
                    self._unwatch(worker, loop)
            if following is not None:
                self._send(worker, following)
            elif stop:
                ask_to_exit(worker)
        if wake:
            self._wake()
        _deliver(call)


def _readable(
    pool_ref: weakref.ref[LoopReplies], worker: ProcessWorker, loop: asyncio.AbstractEventLoop
) -> None:
    pool = pool_ref()
    if pool is not None:
        pool._on_loop_reply(worker, loop)
    elif worker.watcher is loop:
        # Dropped unclosed: its manager thread asked the worker to exit, and
        # left this descriptor to the loop that watches it. Removed from the
        # loop before watcher is cleared: the manager closes it only then.
        sock = worker.lsock
        if sock is not None:
            loop.remove_reader(sock.fileno())
        worker.watcher = None
        close_lsock(worker)


def _take_reply(sock: socket.socket | None, buf: bytearray) -> tuple[bool, bytes] | None:
    """Read what the worker wrote: ``(True, the reply's pickle)`` if it is the whole reply.

    One read, of at most :data:`READ_MAX` bytes. Returns None when there is
    nothing to read, and ``(False, bytes read)`` when the reply cannot be
    read at once: the pipe ended (no bytes), the reply is not all there yet,
    or it is over :data:`READ_MAX` bytes. The manager reads the rest of those.
    """
    if sock is None:
        return False, b""
    try:
        got = sock.recv_into(buf, READ_MAX, _DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False, b""
    if got >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buf)
        if _HEADER.size + size == got:  # size is -1 for a reply over 2 GiB
            return True, bytes(buf[_HEADER.size : got])
    return False, bytes(buf[:got])


def read_rest(conn: Connection, prefix: bytes) -> bytes:
    """The reply whose first bytes (``prefix``, maybe none) a loop read: the rest, blocking.

    On the manager thread. Raises EOFError if the pipe ends first (the
    worker died while it wrote).
    """
    fd = conn.fileno()
    buf = bytearray(prefix)

    def fill(size: int) -> None:
        while len(buf) < size:
            chunk = os.read(fd, size - len(buf))
            if not chunk:
                raise EOFError("the worker's pipe ended within a reply")
            buf.extend(chunk)

    fill(_HEADER.size)
    (size,) = _HEADER.unpack_from(buf)
    start = _HEADER.size
    if size == -1:  # over 2 GiB: the real size follows
        fill(_HEADER.size + _HUGE.size)
        (size,) = _HUGE.unpack_from(buf, _HEADER.size)
        start += _HUGE.size
    if len(buf) > start + size:
        raise OSError("a worker wrote more than one reply")  # cannot happen
    fill(start + size)
    return bytes(memoryview(buf)[start:])


def _deliver(call: ProcessCall) -> None:
    """Complete a call's future now, on its loop's thread (what Channel.drain does).

    Never a call with a ``_sink``: the manager thread reads those.
    """
    if not call.done():
        error = call._error
        if error is None:
            call.set_result(call._value)
        else:
            call.set_exception(deliverable(call, error))
    release(call)

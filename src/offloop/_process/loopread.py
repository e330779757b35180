"""Replies read by the caller's event loop: a round trip with one thread wake-up fewer.

A worker's reply used to travel worker -> manager thread -> the caller's loop:
two wake-ups. Here the loop of a call handed to an idle worker watches that
worker's pipe itself (``loop.add_reader`` on a second descriptor of it,
``ProcessWorker.lsock``) and reads the reply when it comes, as anyio's loop
reads its workers' stdout. The manager thread stays the owner of everything
else: starting workers, their deaths, kills on cancel, closing.

Who reads a worker's reply is ``ProcessWorker.reader`` (under the pool's lock):
the loop, ``MANAGER``, or None when the worker runs no call. Only the reader
takes bytes from the pipe, and the loop takes a reply whole, under the lock,
and detaches the call from the worker in the same step; so a reply is read
once, and a call resolved once, whoever races. The loop hands the worker to
the manager thread (reader ``MANAGER``, ``_adopt``) when it cannot read a reply
at once without blocking: it is over :data:`PEEK` bytes (read and unpickled on
the manager thread, as before), not all there yet, or the pipe is at its end
(the worker died: the manager's ``_on_exit`` decides). The manager takes over
by itself when the worker dies, the call is cancelled (a cancelled call is
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
from typing import TYPE_CHECKING, Final

from .._core.offload import deliverable, release
from .pickling import decode_reply
from .records import MANAGER, ProcessCall, ProcessWorker, ask_to_exit, close_lsock

__all__ = ["PEEK", "LoopReplies"]

#: Largest reply (pickled, with its 4-byte header) a loop reads itself. A
#: larger one is read and unpickled by the manager thread, off the loop.
PEEK: Final = 64 * 1024

#: Loops without add_reader (Windows' proactor): their calls' replies go
#: through the manager thread.
_NO_READER: Final[weakref.WeakSet[asyncio.AbstractEventLoop]] = weakref.WeakSet()

_HEADER: Final = struct.Struct("!i")

#: Peek without blocking (Windows has no MSG_DONTWAIT; its loops have no add_reader).
_PEEK_FLAGS: Final = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


class LoopReplies:
    """The part of the pool that lets a call's loop read its reply (mixed into WorkerSet)."""

    if TYPE_CHECKING:
        _lock: threading.Lock
        _idle: list[ProcessWorker]
        _adopt: list[ProcessWorker]
        _run_name: str
        _max_tasks: int | None
        _peek: bytearray

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
                # This loop peeks and reads without blocking either way.
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
            data = _take_reply(worker.lsock, self._peek)
            if data is None:
                return  # woken for nothing (another callback of this loop read it)
            if not data:  # the manager reads it, or sees the worker die
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
        ok, outcome = decode_reply(data[_HEADER.size :], call.fn, self._run_name)
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
        if stop:
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
        # left this descriptor to the loop that watches it.
        worker.watcher = None
        if worker.lsock is not None:
            loop.remove_reader(worker.lsock.fileno())
            close_lsock(worker)


def _take_reply(sock: socket.socket | None, peek: bytearray) -> bytes | None:
    """The whole next message on ``sock`` with its header, if it is all there.

    Returns None when there is nothing to read, and ``b""`` when the message
    cannot be read at once: the pipe ended, the message is not all there
    yet, or it is over :data:`PEEK` bytes (the manager reads those).
    """
    if sock is None:
        return b""
    try:
        got = sock.recv_into(peek, PEEK, _PEEK_FLAGS)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    if got < _HEADER.size:
        return b""
    (size,) = _HEADER.unpack_from(peek)
    total = _HEADER.size + size
    if size < 0 or total > got:
        return b""
    data = sock.recv(total, socket.MSG_WAITALL)
    if len(data) != total:  # cannot happen: those bytes were there
        raise OSError(f"read {len(data)} of the {total} bytes of a worker's reply")
    return data


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

"""The thread that writes large calls to a process pool's workers.

A worker's pipe (a Unix socket pair) takes a few hundred KiB at most before a
write blocks until the worker reads. A worker reads its next call only when it
is ready: a slow ``initializer``, or just the time it takes to copy 50 MB, can
keep a writer waiting for as long as that lasts. Writing a large call from the
event loop's thread would stall the loop; writing it from the manager thread
would stall every other worker's replies and crash handling.

So a call above :data:`LARGE_PAYLOAD` goes to this pool's writer thread,
``offloop-process-<pool>-writer``. It writes every pending call at once
without blocking on any of them (``MSG_DONTWAIT``, waiting on writability with
one selector), so a worker that is slow to read delays only its own call.
Small calls keep the direct write: they fit in the pipe, and a round trip
through another thread would cost more than the write itself. A call with
big ``bytes`` arguments sent out of band (``message.py``) is always
large: the writer sends the call's message and then those objects themselves.

The writer works on its own duplicate of each pipe's descriptor. The manager
thread closes a dead worker's pipe whenever it sees the death, and a write in
progress must neither fail on a closed descriptor nor land on a reused one. A
write to a worker that died fails with ``EPIPE``; the writer drops it, and the
manager reports the death to the call's awaiter.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import sys
import threading
from multiprocessing.connection import Connection
from typing import Final, TypeAlias, TypeGuard

from .message import OutOfBandCall

__all__ = ["LARGE_PAYLOAD", "Payload", "PayloadWriter", "is_small", "send_small", "write_small"]

#: A call as written to a worker: one pickled message, or one with buffers after it.
Payload: TypeAlias = bytes | OutOfBandCall

#: Calls larger than this (bytes) are written by the writer thread. A Linux
#: pipe holds 64 KiB, and a worker's socket pair at least that much, so a
#: smaller call written to a worker that is waiting for it never blocks.
#: Windows pipes are not sockets: there every call keeps the direct write.
LARGE_PAYLOAD: Final = 64 * 1024 if os.name == "posix" else sys.maxsize


def is_small(payload: Payload) -> TypeGuard[bytes]:
    """Whether ``payload`` is written directly, not by the writer thread.

    A call with buffers beside it never is.
    """
    return type(payload) is bytes and len(payload) <= LARGE_PAYLOAD


# Never block (the thread serves every worker), and get EPIPE rather than a
# SIGPIPE that kills the program if it reset SIGPIPE to its default.
_SEND_FLAGS: Final = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)

# Bytes written to one worker before the others get a turn: a worker that
# reads as fast as it is written to must not hold up the rest for a whole call.
_TURN: Final = 1 << 20

# multiprocessing.connection frames a message with its size; messages over
# 2 GiB carry -1 and then the real size. The worker reads with recv_bytes().
_MAX_SHORT: Final = 0x7FFFFFFF


def write_small(conn: Connection, message: bytes) -> None:
    """Write a small message (at most :data:`LARGE_PAYLOAD` bytes) to ``conn``, blocking.

    What ``conn.send_bytes(message)`` does, framed the same way, with one
    write of header and message together (``send_bytes`` makes two above
    16 KiB, and costs several Python calls more). A worker writes its small
    replies so; the pool writes to its workers with :func:`send_small`.

    Raises:
        OSError: the pipe is closed, or its other end is gone (``EPIPE``).
    """
    if _NOT_SOCKET:
        conn.send_bytes(message)
        return
    fd = conn.fileno()
    data = _SHORT.pack(len(message)) + message
    written = os.write(fd, data)
    while written < len(data):  # a signal cut the write short: write the rest
        written += os.write(fd, memoryview(data)[written:])


def send_small(sock: socket.socket, message: bytes) -> None:
    """Write a small message (at most :data:`LARGE_PAYLOAD` bytes) to a worker, blocking.

    The parent's :func:`write_small`, through a socket of the worker's pipe
    with ``MSG_NOSIGNAL``: to a worker that died unnoticed it fails with
    ``EPIPE`` rather than raising SIGPIPE, which kills a program that
    restored that signal's default action (command-line tools do, for
    ``| head``).

    Raises:
        OSError: the socket is closed, or the worker is gone (``EPIPE``).
    """
    sock.sendall(_SHORT.pack(len(message)) + message, _NO_SIGNAL)


_NO_SIGNAL: Final = getattr(socket, "MSG_NOSIGNAL", 0)

#: Windows pipes are not file descriptors: their Connection writes them.
_NOT_SOCKET: Final = os.name != "posix"
_SHORT: Final = struct.Struct("!i")


def _header(size: int) -> bytes:
    if size > _MAX_SHORT:
        return struct.pack("!iQ", -1, size)
    return struct.pack("!i", size)


def _open(fd: int) -> socket.socket | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket: multiprocessing's pipes on POSIX always are
        os.close(fd)
        return None
    try:
        # A socket object made while socket.setdefaulttimeout() is in force
        # has a timeout, which would make send() wait instead of returning.
        sock.setblocking(True)
    except OSError:
        sock.close()
        return None
    return sock


class _Write:
    """One message on its way to one worker."""

    __slots__ = ("parts", "sock")

    def __init__(self, sock: socket.socket, payload: Payload) -> None:
        self.sock = sock
        messages = payload.messages() if isinstance(payload, OutOfBandCall) else [(payload,)]
        self.parts = []
        for message in messages:
            self.parts.append(memoryview(_header(sum(map(len, message)))))
            self.parts.extend(map(memoryview, message))

    def advance(self) -> bool:
        """Write what the pipe takes now. True when finished: written, or the worker is gone."""
        parts = self.parts
        turn = _TURN
        try:
            while parts:
                if turn <= 0:
                    return False  # the selector reports it writable again at once
                sent = self.sock.send(parts[0][:turn], _SEND_FLAGS)
                turn -= sent
                if sent < len(parts[0]):
                    parts[0] = parts[0][sent:]
                else:
                    parts.pop(0)
        except BlockingIOError:
            return False
        except OSError:
            pass  # the worker died; the manager thread fails its call
        return True

    def close(self) -> None:
        self.parts = []
        self.sock.close()


def _start(new: list[tuple[int, Payload]], selector: selectors.BaseSelector) -> None:
    # Write what each new call's pipe takes now; wait for the rest.
    for fd, payload in new:
        sock = _open(fd)
        if sock is None:
            continue
        write = _Write(sock, payload)
        if write.advance():
            write.close()
        else:
            selector.register(write.sock, selectors.EVENT_WRITE, write)


class PayloadWriter:
    """Writes large calls to worker pipes on one thread, never blocking on any of them."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._incoming: list[tuple[int, Payload]] = []
        self._thread: threading.Thread | None = None
        self._wake_fds: tuple[int, int] | None = None
        self._stopped = False

    def submit(self, fd: int, payload: Payload) -> None:
        """Write ``payload`` to ``fd``, which this writer now owns and closes.

        A ``bytes`` payload is one message; an :class:`OutOfBandCall` is the
        call's message and then one per buffer, written back to back.

        ``fd`` must be a duplicate of a worker pipe's descriptor, taken while
        that pipe was known to be open. Once stopped, the writer drops it.
        """
        with self._lock:
            if not self._stopped:
                self._incoming.append((fd, payload))
                if self._thread is None:
                    self._start()
                else:
                    self._wake()
                return
        os.close(fd)

    def stop(self) -> None:
        """Drop pending writes and end the thread; later submits are dropped too.

        Called once the pool's workers are gone, so nobody waits for those
        writes. Returns when the thread has exited (promptly: it never blocks).
        """
        with self._lock:
            self._stopped = True
            thread = self._thread
            self._wake()
        if thread is None or thread is threading.current_thread():
            return
        thread.join()
        with self._lock:
            fds, self._wake_fds = self._wake_fds, None
        for fd in fds or ():
            os.close(fd)

    def _start(self) -> None:
        # Under _lock, on the first large call.
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wake_fds = (read_fd, write_fd)
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        # Under _lock, which stop() holds to drop the pipe once the thread has
        # exited: a write to a closed (maybe reused) descriptor must not happen.
        if self._wake_fds is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_fds[1], b"\0")

    def _run(self) -> None:
        assert self._wake_fds is not None
        wake_fd = self._wake_fds[0]
        selector = selectors.DefaultSelector()
        selector.register(wake_fd, selectors.EVENT_READ, None)
        try:
            while True:
                with self._lock:
                    new, self._incoming = self._incoming, []
                    stopped = self._stopped
                if stopped:
                    for fd, _ in new:
                        os.close(fd)
                    for key in list(selector.get_map().values()):
                        if key.data is not None:
                            key.data.close()
                    return
                _start(new, selector)
                # While it waits, the thread must hold no call's data: big
                # bytes arguments are the caller's own objects.
                new = []
                for key, _ in selector.select():
                    write = key.data
                    if write is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_fd, 4096)
                    elif write.advance():
                        selector.unregister(key.fileobj)
                        write.close()
        finally:
            selector.close()

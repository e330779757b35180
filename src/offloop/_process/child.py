"""The code that runs inside a :class:`~offloop.ProcessPool` worker process.

A worker serves one call at a time over its own pipe: it reads a pickled
``(fn, args, kwargs)``, runs it, and writes one reply (see ``pickling.py``). An
empty message, or the pipe closing, tells it to exit. Its first message, once
started (and initialized), is an empty one saying it is ready; the pool sends
its first call only then, so a call cancelled meanwhile never starts. If the
initializer fails, that failure is its first message instead.

A worker must not outlive the pool's process, even one killed with SIGKILL that
had no chance to clean up. On Linux the kernel sends the worker SIGKILL when the
parent's thread that started it dies (``prctl(PR_SET_PDEATHSIG)``; the pool
starts workers from its manager thread, which lives as long as the pool).
Elsewhere, or if ``prctl`` is unavailable, a daemon thread polls
``os.getppid()``: a reparented worker sees another parent pid and exits.

With the "forkserver" start method the worker's parent is the fork server, not
the pool's process, and the server can outlive it (any process that inherited
its "alive" pipe keeps it running). Such a worker watches the pool's process
itself: a pidfd that becomes readable when it exits, or else polling its pid.

SIGINT and SIGTERM sent to the whole process group (Ctrl-C, systemd, an init
in a container) pass a worker by: its parent decides its end (see
:func:`outlive_group_signals`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import CoroutineType
from typing import Any, Final

from .._core.token import StopToken, WorkerCall, thread_state
from .._core.validate import describe
from .message import HEAD, MARK, attach, read_count
from .pickling import encode_error, encode_init_failure, encode_load_failure, encode_result
from .writer import write_small

__all__ = ["outlive_group_signals", "worker_main"]

_PR_SET_PDEATHSIG: Final = 1
#: Seconds between two checks of the parent pid by the fallback watcher.
PARENT_POLL: Final = 0.2


def worker_main(
    conn: Connection,
    parent_pid: int,
    init: bytes | None,
    max_tasks: int | None,
    pdeathsig: bool,
    received: Any,
) -> None:
    """Serve calls from ``conn`` until told to stop (the target of every worker process).

    ``received`` (a shared ``c_uint64``) counts the calls taken from the pipe:
    if this process dies, the pool sends again a call it never took.
    """
    _die_with_parent(parent_pid, pdeathsig)
    outlive_group_signals(signal.SIGINT, signal.SIGTERM)
    if init is not None and not _initialize(conn, init):
        return
    try:
        # Tell the pool that start-up is over: a death from now on happens
        # while running a call, not while importing or initializing.
        conn.send_bytes(b"")
    except OSError:
        return  # the parent is gone
    recv, send = _framing(conn)
    done = 0
    while True:
        buffers: list[bytes] | None = None
        try:
            data = recv()
            received.value += 1
            if data[:1] == MARK:
                buffers = [recv() for _ in range(read_count(data))]
        except (EOFError, OSError):
            return  # the parent closed the pipe, or is gone
        if not data:
            return  # the parent's "stop"
        reply = _serve(data, buffers)
        # An idle worker keeps neither the last call's arguments nor its result.
        data = b""
        buffers = None
        send(reply)
        del reply
        done += 1
        if max_tasks is not None and done >= max_tasks:
            return


def _framing(conn: Connection) -> tuple[Callable[[], bytes], Callable[[bytes], None]]:
    """The worker's receive and send: ``conn``'s framing, with fewer system calls.

    ``Connection.recv_bytes`` reads a message's header and its body in two
    reads, and ``send_bytes`` writes a message over 16 KiB in two writes
    (the loop reading the reply then gets its header alone, and hands the
    rest to the pool's manager thread: see ``loopread.py``). A call is
    mostly one read here, and a reply up to ``READ_MAX`` one write.
    """
    if os.name != "posix":  # Windows pipes are not file descriptors
        return conn.recv_bytes, conn.send_bytes
    reader = _Reader(conn.fileno())
    send_bytes = conn.send_bytes

    def send(message: bytes) -> None:
        if len(message) > _ONE_WRITE:
            send_bytes(message)
        else:
            write_small(conn, message)  # the pool's own one-write framing

    return reader.recv, send


#: Largest reply written in one write (header and pickle): what a loop reads at once.
_ONE_WRITE: Final = 64 * 1024 - 4
#: Bytes asked of the pipe per read when the size of what comes is not known yet.
_CHUNK: Final = 64 * 1024
_SHORT: Final = struct.Struct("!i")
_HUGE: Final = struct.Struct("!Q")


class _Reader:
    """Reads the messages of ``multiprocessing.connection`` framing from a descriptor.

    One read takes a whole small message, header and body, and maybe the
    start of the next (the out-of-band buffers that follow a call): kept
    for the next :meth:`recv`. A larger message's rest is read exactly.
    """

    __slots__ = ("fd", "pending")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def _more(self, size: int) -> bytes:
        chunk = os.read(self.fd, size)
        if not chunk:
            raise EOFError("the pool's end of the pipe closed")
        return chunk

    def recv(self) -> bytes:
        buf = self.pending
        while len(buf) < _SHORT.size:
            buf += self._more(_CHUNK)
        (size,) = _SHORT.unpack_from(buf)
        start = _SHORT.size
        if size == -1:  # over 2 GiB: the real size follows
            while len(buf) < _SHORT.size + _HUGE.size:
                buf += self._more(_CHUNK)
            (size,) = _HUGE.unpack_from(buf, _SHORT.size)
            start += _HUGE.size
        end = start + size
        have = len(buf)
        if have >= end:
            self.pending = buf[end:]
            return buf[start:end]
        self.pending = b""
        parts: list[bytes | memoryview] = [memoryview(buf)[start:]]
        while have < end:
            chunk = self._more(end - have)
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)


def _serve(data: bytes, buffers: list[bytes] | None) -> bytes:
    try:
        if buffers is None:
            fn, args, kwargs = pickle.loads(data)
        else:  # the pickle follows the mark and the count; a view does not copy it
            fn, args, kwargs = pickle.loads(memoryview(data)[HEAD:])
            args, kwargs = attach(args, kwargs, buffers)
    except BaseException as exc:
        return encode_load_failure(exc, traceback.format_exc())
    # current_token() works in the worker too; nothing sets this token yet,
    # since cancellation either abandons the call or kills the process.
    thread_state.call = WorkerCall(fn, None, StopToken())
    try:
        result = fn(*args, **kwargs)
        if type(result) is CoroutineType:
            result.close()
            raise TypeError(
                f"{describe(fn)} returned a coroutine instead of a result, so it is async "
                f"code: 'await' it directly or use offloop.to_loop()."
            )
    except BaseException as exc:  # delivered to the awaiter, like any result
        # Drop this frame from the text: the user wants their function's lines.
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))  # type: ignore[union-attr]
        return encode_error(exc, tb)
    finally:
        thread_state.call = None
    return encode_result(result, fn)


def outlive_group_signals(*signums: signal.Signals) -> None:
    """Let ``signums`` sent to the whole process group pass this process by.

    Ctrl-C in a terminal, systemd (``KillMode=control-group``), an init in a
    container forwarding signals and ``kill -TERM -- -PGID`` signal every
    process of the group at once. A worker dying then would fail its running
    call with ``WorkerCrashed`` (and print a traceback) while the parent is
    still stopping gracefully, cancelling or finishing its calls. The parent
    decides a worker's end: ``close()`` asks it to exit or kills it (SIGKILL,
    never SIGTERM), and the parent's death kills it (``_die_with_parent``).

    A handler that does nothing rather than ``SIG_IGN``: an ignored signal
    stays ignored across ``exec``, so a program the user's function starts
    would ignore Ctrl-C and SIGTERM too (its ``terminate()`` would do
    nothing), while a handler is reset to the default there.
    ``siginterrupt(False)`` restarts the system calls the signal interrupts,
    so C code that does not retry after ``EINTR`` sees no difference either.
    """
    if os.name != "posix":
        return  # Windows: no process group signals, and SIGTERM is TerminateProcess
    for signum in signums:
        signal.signal(signum, _ignore_signal)
        signal.siginterrupt(signum, False)


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def _initialize(conn: Connection, init: bytes) -> bool:
    fn = None
    try:
        fn, args, kwargs = pickle.loads(init)
        fn(*args, **kwargs)
    except BaseException as exc:
        data = encode_init_failure(
            exc, describe(fn) if fn else "the initializer", traceback.format_exc()
        )
        with contextlib.suppress(OSError):
            # Instead of "ready": the parent fails the call it started this worker for.
            conn.send_bytes(data)
        return False
    return True


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    armed = pdeathsig and _set_pdeathsig()
    if os.getppid() == parent_pid:
        if not armed:
            _start_watch(_watch_parent, parent_pid)
        return
    # Started by a fork server, or the pool's process died before the signal
    # was armed (the worker was reparented): only the pool's process tells.
    pidfd = _open_pidfd(parent_pid)
    if pidfd is None and not _alive(parent_pid):
        os._exit(1)
    _start_watch(_watch_pool, parent_pid, pidfd)


def _start_watch(target: Callable[..., None], *args: object) -> None:
    threading.Thread(target=target, args=args, name="offloop-parent-watch", daemon=True).start()


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    wait = threading.Event().wait
    while os.getppid() == parent_pid:
        wait(PARENT_POLL)
    os._exit(1)


def _open_pidfd(pid: int) -> int | None:
    # A pidfd names one process for good (a pid can be reused once it is
    # reaped); it becomes readable when that process exits.
    try:
        return os.pidfd_open(pid)  # Linux 5.3+, Python 3.9+
    except ProcessLookupError:
        os._exit(1)  # the pool's process is gone already
    except (AttributeError, OSError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user: not ours, but not gone
    return True


def _watch_pool(pool_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        wait = threading.Event().wait
        while _alive(pool_pid):
            wait(PARENT_POLL)
    os._exit(1)

"""The framing of a ProcessPool's pipes, without multiprocessing's Connection on the hot path.

The pool writes a small call in one write (``writer.send_small``); a worker
reads its messages with few reads (``child._Reader``) and writes a reply up
to 64 KiB in one write (``writer.write_small``). Each must frame messages exactly as
``Connection.send_bytes`` and ``recv_bytes`` do, on real socket pairs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection, Pipe

import pytest

from offloop._process.child import _framing, _Reader
from offloop._process.pool import ProcessPool
from offloop._process.writer import send_small, write_small
from tests.helpers import WAIT

pytestmark = pytest.mark.skipif(os.name != "posix", reason="descriptor framing is POSIX's")


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    ours, theirs = Pipe(duplex=True)
    yield ours, theirs
    ours.close()
    theirs.close()


def in_thread(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_the_reader_takes_messages_however_the_bytes_arrive(
    pipe: tuple[Connection, Connection],
) -> None:
    ours, theirs = pipe
    big = os.urandom(300_000)  # more than one read, and more than the pipe holds
    messages = [b"call", b"", big, b"x" * 70_000, b"last"]
    header = struct.pack("!i", 5)

    def write() -> None:
        # Joined in one write: a call and the buffers that follow it.
        ours.send_bytes(messages[0])
        ours.send_bytes(messages[1])
        ours.send_bytes(messages[2])
        ours.send_bytes(messages[3])
        # A header split across writes, then its body.
        sock = socket.socket(fileno=os.dup(ours.fileno()))
        try:
            sock.sendall(header[:2])
            sock.sendall(header[2:] + b"split")
        finally:
            sock.close()
        ours.send_bytes(messages[4])

    writer = in_thread(write)
    reader = _Reader(theirs.fileno())
    got = [reader.recv() for _ in range(6)]
    writer.join(WAIT)
    assert got == [*messages[:4], b"split", messages[4]]
    ours.close()
    with pytest.raises(EOFError):
        reader.recv()


def test_the_reader_reads_the_size_of_a_message_over_2_gib_from_its_long_header(
    pipe: tuple[Connection, Connection],
) -> None:
    # Connection frames a message over 2 GiB as -1 then an 8-byte size; a
    # short body under that header is enough to check that the reader uses it.
    ours, theirs = pipe
    os.write(ours.fileno(), struct.pack("!iQ", -1, 3) + b"abc" + struct.pack("!i", 2) + b"de")
    reader = _Reader(theirs.fileno())
    assert reader.recv() == b"abc"
    assert reader.recv() == b"de"


def test_the_reader_fails_with_eof_when_the_pipe_ends_within_a_message(
    pipe: tuple[Connection, Connection],
) -> None:
    ours, theirs = pipe
    os.write(ours.fileno(), struct.pack("!i", 10) + b"half")
    ours.close()
    with pytest.raises(EOFError):
        _Reader(theirs.fileno()).recv()


@pytest.mark.parametrize("size", [0, 100, 20_000, 64 * 1024 - 4, 200_000])
def test_what_the_worker_and_the_pool_write_reads_back_with_recv_bytes(
    pipe: tuple[Connection, Connection], size: int
) -> None:
    ours, theirs = pipe
    message = os.urandom(size)
    _, send = _framing(theirs)
    writer = in_thread(send, message)  # over the pipe's size, it blocks until read
    assert ours.recv_bytes() == message
    writer.join(WAIT)
    if size <= 64 * 1024:  # the pool's small calls
        with socket.socket(fileno=os.dup(ours.fileno())) as sock:
            send_small(sock, message)
        assert theirs.recv_bytes() == message


def test_write_small_to_a_closed_connection_raises_oserror(
    pipe: tuple[Connection, Connection],
) -> None:
    ours, _ = pipe
    ours.close()
    with pytest.raises(OSError, match="handle is closed"):
        write_small(ours, b"call")


def sized(size: int) -> bytes:
    return bytes(size)


async def test_a_reply_over_16_kib_is_read_by_the_loop_in_one_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Connection.send_bytes writes a message over 16 KiB as its header,
    # then its body: a loop woken by the header alone hands the reply to
    # the manager thread. The worker writes it in one piece instead.
    async with ProcessPool(1, name="mid-reply") as pool:
        assert await asyncio.wait_for(pool.run(sized, 1), WAIT) == bytes(1)  # started
        batches = [0]
        on_events = pool._on_events

        def counted(*args: object) -> bool:
            batches[0] += 1
            return on_events(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(pool, "_on_events", counted)
        for _ in range(10):
            assert await asyncio.wait_for(pool.run(sized, 20_000), WAIT) == bytes(20_000)
        assert batches[0] == 0
        assert pool.statistics()["completed"] == 11


def reply_in_pieces(size: int) -> bytes:
    # In the worker: from now on its replies over 64 KiB are written in
    # pieces with a pause between them, so whoever reads one finds the pipe
    # empty before the reply's end.
    import time
    from multiprocessing.connection import Connection

    send = Connection._send  # type: ignore[attr-defined]

    def in_pieces(self: Connection, buf: bytes) -> None:
        view = memoryview(buf)
        for start in range(0, len(view), 16384):
            send(self, view[start : start + 16384])
            time.sleep(0.002)

    Connection._send = in_pieces  # type: ignore[attr-defined]
    return bytes(size)


async def test_a_reply_that_comes_in_pieces_is_read_whole_under_a_default_socket_timeout() -> None:
    # socket.setdefaulttimeout() makes every socket object created later
    # non-blocking, its descriptor too: the pool's second descriptor of a
    # worker's pipe must not turn the manager's blocking reads of that pipe
    # (a first call's reply, and every large one) into reads that fail
    # half-way, which dropped the pipe of a live worker: the call never ended.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60.0)  # in force while the pool starts its worker
    pool = ProcessPool(1, name="default-timeout")
    size = 1 << 20
    try:
        # A new worker's first reply is the manager thread's to read.
        assert await asyncio.wait_for(pool.run(reply_in_pieces, size), WAIT) == bytes(size)
        assert await asyncio.wait_for(pool.run(sized, size), WAIT) == bytes(size)
        assert pool.statistics()["crashed"] == 0
    finally:
        socket.setdefaulttimeout(previous)
        await asyncio.wait_for(pool.aclose(timeout=WAIT), 2 * WAIT)

"""Big ``bytes`` arguments travel to a process worker beside the pickled call.

Pickling copies a ``bytes`` argument into the pickle, on the event loop's
thread in ``run()``: a 10 MB argument is a 10 MB copy, and twenty such
calls sent at once (``asyncio.gather``) stall the loop for their sum. A
``bytes`` object cannot change, so the call needs no copy of it to be a
snapshot: ``run()`` puts a :class:`Detached` placeholder in its place, pickles
the rest, and the pool's writer thread sends the object itself, as messages of
their own right after the call's. The worker reads them before it unpickles the
call and puts them back in place.

Only top-level positional and keyword arguments of type ``bytes`` go this way.
Mutable buffers (``bytearray``, numpy arrays) are still pickled in ``run()``:
that copy is the snapshot the call is promised, whatever the caller does to the
buffer afterwards.
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = ["MARK", "Detached", "OutOfBandCall", "attach", "detach", "read_count"]

#: First byte of a call message followed by out-of-band buffers. A pickle
#: (protocol 2 and up, cloudpickle's too) starts with b"\x80" instead.
MARK: Final = b"B"

_COUNT: Final = struct.Struct("!I")

#: Bytes in a call message before its pickle: MARK and the buffer count.
HEAD: Final = len(MARK) + _COUNT.size


class Detached:
    """Stands, inside a pickled call, for the ``index``-th buffer sent after it."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[type[Detached], tuple[int]]:
        return Detached, (self.index,)

    def __repr__(self) -> str:
        return f"Detached({self.index})"


class OutOfBandCall:
    """A pickled call and the ``bytes`` sent after it.

    The call's message is ``prefix`` (:data:`MARK` and the buffer count) then
    ``pickled``, kept apart so that no one copies the pickle to join them: it
    can be big too, when it holds a mutable buffer.
    """

    __slots__ = ("buffers", "pickled", "prefix")

    def __init__(self, pickled: bytes, buffers: list[bytes]) -> None:
        self.prefix = MARK + _COUNT.pack(len(buffers))
        self.pickled = pickled
        self.buffers = buffers

    def messages(self) -> list[tuple[bytes, ...]]:
        """The messages to write, in order, each as its parts: the call, then each buffer."""
        return [(self.prefix, self.pickled), *((buffer,) for buffer in self.buffers)]


def detach(
    args: tuple[Any, ...], kwargs: dict[str, Any], threshold: int
) -> tuple[tuple[Any, ...], dict[str, Any], list[bytes]] | None:
    """Replace top-level ``bytes`` arguments of ``threshold`` bytes or more by placeholders.

    Returns the new ``args``, ``kwargs`` and the detached objects, or ``None``
    when there are none (the common case, kept cheap).
    """
    for value in args:
        if type(value) is bytes and len(value) >= threshold:
            break
    else:
        for value in kwargs.values():
            if type(value) is bytes and len(value) >= threshold:
                break
        else:
            return None
    buffers: list[bytes] = []
    placeholders: dict[int, Detached] = {}  # the same object passed twice is sent once

    def swap(value: Any) -> Any:
        if type(value) is bytes and len(value) >= threshold:
            placeholder = placeholders.get(id(value))
            if placeholder is None:
                placeholder = placeholders[id(value)] = Detached(len(buffers))
                buffers.append(value)
            return placeholder
        return value

    new_args = tuple(swap(value) for value in args)
    new_kwargs = {key: swap(value) for key, value in kwargs.items()}
    return new_args, new_kwargs, buffers


def attach(
    args: tuple[Any, ...], kwargs: dict[str, Any], buffers: list[bytes]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Put the buffers back where :func:`detach` left placeholders (in the worker)."""

    def put(value: Any) -> Any:
        return buffers[value.index] if type(value) is Detached else value

    return tuple(put(value) for value in args), {key: put(value) for key, value in kwargs.items()}


def read_count(message: bytes) -> int:
    """How many buffers follow a call message that starts with :data:`MARK`."""
    return int(_COUNT.unpack_from(message, len(MARK))[0])

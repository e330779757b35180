"""Attach a blocking detector to every event loop that starts, for a while.

``offloop check`` and the pytest plugin do not create the loops they watch:
the script or the test runner does (``asyncio.run``, ``asyncio.Runner``,
``uvloop.run``, pytest-asyncio, anyio...). Every one of those ends up in the
loop's ``run_forever``, so while a :class:`LoopWatch` is active,
``run_forever`` of asyncio's ``BaseEventLoop`` and of ``uvloop.Loop`` is
wrapped to attach a detector to the loop first, on the loop's own thread. A
profiler hook (``sys.setprofile``) would see every loop too, but would slow
every call of the program.

One detector per loop, kept across its runs (``asyncio.run`` runs a loop three
times); it stops when the loop is closed or when the watch ends. The wrapper
is removed when the last watch ends, and costs one attribute read when no
watch is active.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from .._core.validate import describe
from .detector import BlockingDetector, DetectorState, OnBlock
from .report import BlockEvent, BlockSite, SiteTable, logger
from .thresholds import check_interval, check_threshold

__all__ = ["LoopWatch"]

_lock: Final = threading.Lock()
_watches: tuple[LoopWatch, ...] = ()
# Per wrapped class: its own run_forever, or None if it inherited it (uvloop.Loop).
_originals: dict[type, Callable[[Any], None] | None] = {}


class LoopWatch:
    """While active (``with``), a detector watches every event loop that runs.

    Blocks from every loop are aggregated in one :meth:`report`.

    Raises:
        TypeError, ValueError: bad ``threshold``, ``interval`` or ``on_block``.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.1,
        interval: float | None = None,
        on_block: OnBlock | None = None,
    ) -> None:
        self.threshold = check_threshold(threshold, "LoopWatch()")
        self.interval = (
            None if interval is None else check_interval(interval, self.threshold, "LoopWatch()")
        )
        if on_block is not None and not callable(on_block):
            raise TypeError(f"LoopWatch() needs on_block to be callable, got {describe(on_block)}.")
        self._on_block = on_block
        self._lock = threading.Lock()
        self._detectors: dict[int, BlockingDetector] = {}
        self._table = SiteTable()
        self._events: list[BlockEvent] = []
        self._active = False
        #: How many distinct event loops started while the watch was active.
        self.loops = 0

    def report(self) -> list[BlockSite]:
        """The blocking sites seen on every loop, most total time first."""
        return self._table.report()

    @property
    def events(self) -> list[BlockEvent]:
        """Every finished block, in the order they ended."""
        with self._lock:
            return list(self._events)

    def __enter__(self) -> LoopWatch:
        with self._lock:
            if self._active:
                raise RuntimeError(f"{self!r} is already active; a LoopWatch is entered once.")
            self._active = True
        _install(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _uninstall(self)
        with self._lock:
            self._active = False
            detectors = list(self._detectors.values())
            self._detectors.clear()
        for det in detectors:
            det.stop()

    def __repr__(self) -> str:
        return (
            f"<LoopWatch threshold {self.threshold * 1e3:g} ms: {self.loops} loop(s), "
            f"{self._table.blocks} block(s) at {len(self._table)} site(s)>"
        )

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        # Runs in run_forever on the loop's thread, before the loop starts.
        with self._lock:
            if not self._active:
                return
            det = self._detectors.get(id(loop))
            if det is None or det.loop is not loop or det.state is not DetectorState.RUNNING:
                for key, old in list(self._detectors.items()):
                    if old.state is DetectorState.STOPPED:
                        del self._detectors[key]
                det = BlockingDetector(
                    loop, threshold=self.threshold, interval=self.interval, on_block=self._record
                )
                det.start()
                self._detectors[id(loop)] = det
                self.loops += 1
            det._ran_on(threading.get_ident())

    def _record(self, event: BlockEvent) -> None:
        if not event.ongoing:
            self._table.add(event)
            with self._lock:
                self._events.append(event)
        if self._on_block is not None:
            self._on_block(event)


def _loop_classes() -> list[type]:
    classes: list[type] = [asyncio.BaseEventLoop]
    # Import uvloop now if it is installed: a script that imports it later must
    # still get the wrapped run_forever.
    if "uvloop" in sys.modules or importlib.util.find_spec("uvloop") is not None:
        try:
            import uvloop
        except ImportError:  # installed but broken: nothing to watch there
            pass
        else:
            classes.append(uvloop.Loop)
    return classes


def _wrap(original: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(original)
    def run_forever(self: asyncio.AbstractEventLoop) -> None:
        for watch in _watches:
            try:
                watch._attach(self)
            except Exception:  # never break the user's loop for the sake of watching it
                logger.exception("offloop could not attach a blocking detector to %r", self)
        return original(self)

    run_forever.__offloop_original__ = original  # type: ignore[attr-defined]
    return run_forever


def _install(watch: LoopWatch) -> None:
    global _watches
    with _lock:
        if not _watches:
            for cls in _loop_classes():
                _originals[cls] = cls.__dict__.get("run_forever")
                cls.run_forever = _wrap(cls.run_forever)  # type: ignore[attr-defined]
        _watches = (*_watches, watch)


def _uninstall(watch: LoopWatch) -> None:
    global _watches
    with _lock:
        _watches = tuple(w for w in _watches if w is not watch)
        if not _watches:
            for cls, original in _originals.items():
                if original is None:
                    del cls.run_forever  # type: ignore[attr-defined]
                else:
                    cls.run_forever = original  # type: ignore[attr-defined]
            _originals.clear()

"""What the blocking detector records: stack samples, block events, and sites.

A *sample* is the loop thread's stack at one instant, taken from the monitor
thread with ``sys._current_frames()``. Its *site* is the innermost frame of the
user's own code: library frames (the standard library, site-packages, and
offloop itself) are skipped, because "blocked in selectors.py" or "blocked in
requests/sessions.py" does not tell anyone which line of theirs to fix. A
stack with no frame of the user's own names its innermost frame outside offloop.
"""

from __future__ import annotations

import functools
import linecache
import logging
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import CodeType
from typing import Any, Final

__all__ = [
    "MAX_SITES_PER_BLOCK",
    "BlockEvent",
    "BlockSite",
    "Dispatch",
    "Sample",
    "SampleTally",
    "SiteTable",
    "is_library_file",
    "is_offloop_file",
    "log_block",
    "sample_thread",
]

logger: Final = logging.getLogger("offloop.detector")

#: One frame: (file, line, function), outermost first in a stack.
Frame = tuple[str, int, str]

#: Where a loop runs its callbacks: the code of the frame a callback is called
#: from, and that frame's current instruction (-1: any instruction). A thread
#: is running one of the loop's callbacks while this frame is on its stack
#: with frames above it.
Dispatch = tuple[CodeType, int]

_UNKNOWN: Final[Frame] = ("<unknown>", 0, "<unknown>")


#: The ``offloop`` package's folder (this module is in its ``_detect`` subpackage).
_PACKAGE_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_roots() -> tuple[str, ...]:
    paths = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            paths.add(path)
    paths.update(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE and site.USER_SITE:
        paths.add(site.USER_SITE)
    # offloop's own frames (the monitor, the pytest plugin, `offloop check`)
    # are never what the user has to fix.
    paths.add(_PACKAGE_ROOT)
    roots = set()
    for path in paths:
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            roots.add(os.path.normcase(variant).rstrip(os.sep) + os.sep)
    return tuple(sorted(roots))


_ROOTS: Final = _library_roots()
_PACKAGE_PREFIXES: Final = tuple(
    {
        os.path.normcase(variant).rstrip(os.sep) + os.sep
        for variant in (_PACKAGE_ROOT, os.path.realpath(_PACKAGE_ROOT))
    }
)
# The run_forever wrapper of `offloop check` and the pytest plugin sits in
# every watched loop's stack; it is noise in a stack shown to the user.
_HIDDEN_FILES: Final = frozenset(
    {os.path.join(os.path.dirname(os.path.abspath(__file__)), "hook.py")}
)
_PACKAGE_DIRS: Final = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


@functools.lru_cache(maxsize=4096)
def is_library_file(filename: str) -> bool:
    """True if ``filename`` belongs to the stdlib, an installed package, or offloop.

    Pseudo-files count as user code (``<string>`` from ``exec``), except the
    frozen import machinery.
    """
    if filename.startswith("<"):
        return filename.startswith("<frozen ")
    path = os.path.normcase(os.path.abspath(filename))
    if any(part in path for part in _PACKAGE_DIRS):
        return True
    if path.startswith(_ROOTS):
        return True
    return os.path.normcase(os.path.realpath(filename)).startswith(_ROOTS)


@functools.lru_cache(maxsize=4096)
def is_offloop_file(filename: str) -> bool:
    """True if ``filename`` is one of offloop's own modules."""
    if filename.startswith("<"):
        return False
    return any(
        os.path.normcase(variant).startswith(_PACKAGE_PREFIXES)
        for variant in (os.path.abspath(filename), os.path.realpath(filename))
    )


@dataclass(frozen=True)
class Sample:
    """One look at the loop thread: its stack (outermost first) and its site.

    ``busy`` is False when the thread was idle in the loop itself (waiting for
    I/O) rather than running one of its callbacks; True when that is unknown.
    """

    site: Frame
    frames: tuple[Frame, ...]
    busy: bool = True


def sample_thread(
    ident: int | None, dispatch: Dispatch | None = None, *, verify: bool = False
) -> Sample | None:
    """The current stack of the thread ``ident``, or None if it is not running.

    With ``dispatch`` (see :data:`Dispatch`), the sample says whether the
    thread is running one of the loop's callbacks; with ``verify`` too, there
    is no sample unless the dispatch frame is on the thread's stack (the
    thread no longer runs the loop: its stack would blame unrelated code). The
    frames are copied into tuples at once: holding frame objects would keep
    the user's locals alive.
    """
    if ident is None:
        return None
    frame = sys._current_frames().get(ident)
    frames: list[Frame] = []
    loop_code, loop_lasti = dispatch if dispatch is not None else (None, -1)
    found = busy = dispatch is None
    depth = 0
    while frame is not None:
        code = frame.f_code
        if not found and code is loop_code and loop_lasti in (-1, frame.f_lasti):
            found, busy = True, depth > 0
        if code.co_filename not in _HIDDEN_FILES:
            name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
            frames.append((code.co_filename, frame.f_lineno or 0, name))
        frame = frame.f_back
        depth += 1
    del frame
    if not frames or (verify and not found):
        return None
    site_frame = next((f for f in frames if not is_library_file(f[0])), None)
    if site_frame is None:
        # No frame of the user's own by path (their code may be an installed
        # package): the innermost frame outside offloop, which is never the
        # one to fix, even when it waits in offloop (on a lock another thread holds).
        site_frame = next((f for f in frames if not is_offloop_file(f[0])), frames[0])
    frames.reverse()
    return Sample(site_frame, tuple(frames), busy)


def format_frame(frame: Frame) -> str:
    """``path:line in function: source`` (the source when it can be read)."""
    file, line, function = frame
    code = linecache.getline(file, line).strip() if line else ""
    text = f"{file}:{line} in {function}"
    return f"{text}: {code}" if code else text


@dataclass(frozen=True)
class BlockEvent:
    """One stretch of time during which the event loop did not come back.

    Attributes:
        file: the file of the blocking site (the innermost frame of user code).
        line: its line number (0 if the loop thread could not be sampled).
        function: its function (qualified name; the bare name on Python 3.10,
            whose code objects have none).
        duration_ms: how long the loop was blocked, measured from when the
            monitor's heartbeat was posted until it ran, or for a block that
            held the GIL from when the monitor was due to wake until it could
            (so it can be short by up to one ``interval``).
        stack: the loop thread's stack at the site, outermost frame first, each
            ``"path:line in function: source"``.
        samples: how many stack samples were taken during the block; the site
            is the one seen most often (among the first
            :data:`MAX_SITES_PER_BLOCK` sites seen, each kept with one stack,
            so a block that never ends does not use more and more memory).
        ongoing: True for the early notice of a block still going on after
            ten times the threshold (its ``duration_ms`` is the time so far); a
            final event with ``ongoing=False`` follows when the loop comes back.
    """

    file: str
    line: int
    function: str
    duration_ms: float
    stack: tuple[str, ...]
    samples: int = 0
    ongoing: bool = False

    def __str__(self) -> str:
        state = "has been blocked" if self.ongoing else "was blocked"
        still = " (still blocked)" if self.ongoing else ""
        return (
            f"the event loop {state} for {self.duration_ms:.0f} ms at "
            f"{self.file}:{self.line} in {self.function}{still}"
        )

    def format(self) -> str:
        """The one-line summary followed by the stack, like a traceback."""
        lines = [str(self), "Stack of the loop thread (most recent call last):"]
        lines.extend(f"  {entry}" for entry in self.stack)
        return "\n".join(lines)


@dataclass(frozen=True)
class BlockSite:
    """One line of code that blocked the loop, with every block it caused.

    Attributes:
        file, line, function: where (see :class:`BlockEvent`).
        count: how many separate blocks were seen here.
        total_ms: their summed duration.
        max_ms: the longest one.
        stack: the stack of the longest one, outermost frame first.
    """

    file: str
    line: int
    function: str
    count: int
    total_ms: float
    max_ms: float
    stack: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``file, line, function, count, total_ms, max_ms, stack``."""
        return {
            "file": self.file,
            "line": self.line,
            "function": self.function,
            "count": self.count,
            "total_ms": round(self.total_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "stack": list(self.stack),
        }

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line} in {self.function}: {self.count} block(s), "
            f"{self.total_ms:.0f} ms in total, longest {self.max_ms:.0f} ms"
        )


#: Sites one block keeps a stack for. A block that never ends (a server run on
#: the loop's thread) is sampled every interval for as long as it lasts, so
#: its samples are kept as a count per site plus the first stack seen there;
#: samples at sites beyond this many are counted, but cannot name the block.
MAX_SITES_PER_BLOCK: Final = 64


class SampleTally:
    """The samples of one block, in memory that does not grow with its length."""

    __slots__ = ("counts", "stacks", "total")

    def __init__(self, samples: Iterable[Sample] = ()) -> None:
        self.total = 0
        self.counts: dict[Frame, int] = {}  # insertion order: first seen first
        self.stacks: dict[Frame, tuple[Frame, ...]] = {}
        for sample in samples:
            self.add(sample)

    def add(self, sample: Sample) -> None:
        """Count one sample; keep its stack if it is the first at its site."""
        self.total += 1
        site = sample.site
        count = self.counts.get(site)
        if count is None:
            if len(self.counts) >= MAX_SITES_PER_BLOCK:
                return
            self.stacks[site] = sample.frames
            count = 0
        self.counts[site] = count + 1


def make_event(
    samples: SampleTally | Iterable[Sample], duration: float, *, ongoing: bool
) -> BlockEvent:
    """The event for a block from its samples: the site seen most often wins.

    A block is usually one call, but a coroutine that sleeps and then loops
    spends its time at several lines; naming the one where most of the time
    went is what a sampling profiler would do. Ties go to the first seen.
    """
    tally = samples if isinstance(samples, SampleTally) else SampleTally(samples)
    if not tally.counts:
        file, line, function = _UNKNOWN
        return BlockEvent(file, line, function, duration * 1e3, (), tally.total, ongoing)
    counts = tally.counts
    best = max(counts, key=lambda key: counts[key])  # max keeps the first of equals
    file, line, function = best
    stack = tuple(format_frame(f) for f in tally.stacks[best])
    return BlockEvent(file, line, function, duration * 1e3, stack, tally.total, ongoing)


class _Site:
    __slots__ = ("count", "max_ms", "stack", "total_ms")

    def __init__(self) -> None:
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.stack: tuple[str, ...] = ()


class SiteTable:
    """Finished blocks aggregated by site; safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sites: dict[Frame, _Site] = {}
        self.blocks = 0

    def add(self, event: BlockEvent) -> None:
        """Count one finished block (ongoing notices are not counted)."""
        if event.ongoing:
            return
        with self._lock:
            entry = self._sites.setdefault((event.file, event.line, event.function), _Site())
            entry.count += 1
            entry.total_ms += event.duration_ms
            if event.duration_ms >= entry.max_ms:
                entry.max_ms = event.duration_ms
                entry.stack = event.stack
            self.blocks += 1

    def report(self) -> list[BlockSite]:
        """Every site, most total time first."""
        with self._lock:
            items = list(self._sites.items())
        sites = [
            BlockSite(file, line, fn, e.count, e.total_ms, e.max_ms, e.stack)
            for (file, line, fn), e in items
        ]
        sites.sort(key=lambda s: (-s.total_ms, s.file, s.line))
        return sites

    def __len__(self) -> int:
        with self._lock:
            return len(self._sites)


def log_block(event: BlockEvent) -> None:
    """Log ``event`` with its site and stack on the ``offloop.detector`` logger.

    The default ``on_block`` of :class:`~offloop.BlockingDetector`: a WARNING for
    each finished block and for the early notice of a block still going on.
    """
    # The fields are for offloop's JSON log lines (--log-format json).
    fields = {
        "event": "block",
        "file": event.file,
        "line": event.line,
        "function": event.function,
        "duration_ms": round(event.duration_ms, 3),
        "ongoing": event.ongoing,
    }
    logger.warning("%s", event.format(), extra={"offloop_fields": fields})

"""pytest plugin: fail tests whose event loop blocks (registered as ``pytest11``).

Mark a test, or request the fixture, and any event loop the test runs
(``asyncio.run``, pytest-asyncio, anyio, uvloop) is watched by a blocking
detector while the test function runs. If a loop blocked for longer than the
threshold, the test fails with :class:`offloop.LoopBlockedError` naming the
line::

    @pytest.mark.no_blocking(threshold=0.05)
    async def test_handler(): ...

    def test_app(no_blocking): ...   # default threshold 0.1 s

The plugin is loaded into every pytest run once offloop is installed (the
``pytest11`` entry point is named after this module, so
``-p offloop.pytest_plugin`` or ``pytest_plugins = ["offloop.pytest_plugin"]``
load it when autoloading is disabled, and name the same plugin when it is on).
For tests that use neither the marker nor the fixture it does nothing but look
for the marker: no patching, no thread (the loop hook is imported only when a
test asks for it).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._detect.hook import LoopWatch

__all__ = ["no_blocking"]

MARKER = "no_blocking"
DEFAULT_THRESHOLD = 0.1
#: How many sites the failure message lists.
SITES_SHOWN = 5

_WATCH: pytest.StashKey[LoopWatch] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(threshold={DEFAULT_THRESHOLD}): fail the test if an event loop it runs "
        f"blocks for longer than threshold seconds (offloop)",
    )


@pytest.fixture
def no_blocking(request: pytest.FixtureRequest) -> LoopWatch:
    """Fail the test if an event loop it runs blocks longer than the threshold.

    The threshold is 0.1 s, or the one given by ``@pytest.mark.no_blocking``.
    The value is the watch: ``no_blocking.report()`` lists the sites so far.

    Raises:
        LoopBlockedError: (as the test's failure) a loop blocked too long.
    """
    return _watch_for(request.node)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    watch = item.stash.get(_WATCH, None)
    if watch is None and item.get_closest_marker(MARKER) is not None:
        watch = _watch_for(item)
    if watch is None:
        return (yield)
    with watch:
        result = yield
    sites = watch.report()
    if sites:
        from ._core.errors import LoopBlockedError

        __tracebackhide__ = True  # the message says it all; the plugin's frame does not

        raise LoopBlockedError(_message(watch, sites, str(item.path)))
    return result


def _watch_for(item: pytest.Item) -> LoopWatch:
    watch = item.stash.get(_WATCH, None)
    if watch is None:
        from ._detect.hook import LoopWatch

        watch = LoopWatch(threshold=_threshold(item), on_block=_ignore)
        item.stash[_WATCH] = watch
    return watch


def _threshold(item: pytest.Item) -> float:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return DEFAULT_THRESHOLD
    where = f"@pytest.mark.{MARKER}"
    if len(marker.args) > 1 or set(marker.kwargs) - {"threshold"}:
        raise TypeError(
            f"{where} takes one argument, threshold (seconds), got "
            f"args={marker.args!r} kwargs={marker.kwargs!r}; write {where}(threshold=0.05)."
        )
    if marker.args and "threshold" in marker.kwargs:
        raise TypeError(
            f"{where} was given threshold twice, as {marker.args[0]!r} and as "
            f"threshold={marker.kwargs['threshold']!r}; write {where}(threshold=0.05)."
        )
    value: Any = marker.kwargs.get("threshold", marker.args[0] if marker.args else None)
    if value is None:
        return DEFAULT_THRESHOLD
    from ._detect.thresholds import check_threshold

    return check_threshold(value, where)


def _ignore(_event: object) -> None:
    # The failure message reports the blocks; logging each one would only
    # repeat it in the captured log.
    return None


def _message(watch: LoopWatch, sites: list[Any], test_file: str) -> str:
    worst = max(sites, key=lambda s: s.max_ms)
    blocks = sum(s.count for s in sites)
    lines = [
        f"the event loop blocked for {worst.max_ms:.0f} ms (threshold "
        f"{watch.threshold * 1e3:g} ms) at {worst.file}:{worst.line} in {worst.function}; "
        f"{blocks} block(s) at {len(sites)} site(s):",
    ]
    lines += [f"  {site}" for site in sites[:SITES_SHOWN]]
    if len(sites) > SITES_SHOWN:
        lines.append(f"  ... and {len(sites) - SITES_SHOWN} more site(s)")
    lines.append("Stack of the longest block (most recent call last):")
    stack = list(worst.stack)
    # Frames above the test file's first one are pytest's and pluggy's.
    starts = [n for n, entry in enumerate(stack) if entry.startswith(f"{test_file}:")]
    lines += [f"  {entry}" for entry in stack[starts[0] if starts else 0 :]]
    lines.append(
        "Move the blocking call off the loop (await offloop.to_thread(fn, ...)), or raise "
        f"the threshold with @pytest.mark.{MARKER}(threshold=...)."
    )
    return "\n".join(lines)

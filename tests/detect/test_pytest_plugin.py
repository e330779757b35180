"""The pytest plugin, run on small test files with ``pytester``.

The inner runs load the plugin the way users get it: through the ``pytest11``
entry point of the installed package. Async tests there run with anyio's
pytest plugin (asyncio and uvloop) or with a plain ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from tests.helpers import line_of

pytest_plugins = ["pytester"]

BLOCKING_TESTS = textwrap.dedent(
    """\
    import asyncio
    import time

    import pytest


    @pytest.fixture(
        params=["asyncio", ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
    )
    def anyio_backend(request):
        return request.param


    @pytest.mark.no_blocking(threshold=0.05)
    def test_marked_sync_test_running_a_loop():
        async def main():
            time.sleep(0.3)  # BLOCK:marked
        asyncio.run(main())


    @pytest.mark.anyio
    @pytest.mark.no_blocking(threshold=0.05)
    async def test_marked_anyio_test():
        time.sleep(0.3)  # BLOCK:anyio


    def test_fixture(no_blocking):
        async def main():
            time.sleep(0.3)  # BLOCK:fixture
        asyncio.run(main())
        assert no_blocking.threshold == 0.1


    @pytest.mark.no_blocking(threshold=0.05)
    def test_clean():
        async def main():
            await asyncio.to_thread(time.sleep, 0.3)
        asyncio.run(main())


    @pytest.mark.no_blocking(threshold=5)
    def test_under_its_threshold():
        async def main():
            time.sleep(0.3)
        asyncio.run(main())


    def test_unmarked_tests_may_block():
        async def main():
            time.sleep(0.3)
        asyncio.run(main())


    @pytest.mark.no_blocking(threshold=0.05)
    def test_own_failure_wins():
        async def main():
            time.sleep(0.3)
        asyncio.run(main())
        assert 1 == 2, "the test's own failure"
    """
)


def test_marked_tests_and_the_fixture_fail_with_the_blocking_line(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(test_blocking=BLOCKING_TESTS)
    reprec = pytester.inline_run("-p", "no:cacheprovider")
    reprec.assertoutcome(passed=3, failed=5)
    _, _, failed = reprec.listoutcomes()
    failures = {r.nodeid.split("::")[1]: r.longreprtext for r in failed}
    assert set(failures) == {
        "test_marked_sync_test_running_a_loop",
        "test_marked_anyio_test[asyncio]",
        "test_marked_anyio_test[uvloop]",
        "test_fixture",
        "test_own_failure_wins",
    }
    for test, marker, threshold in [
        ("test_marked_sync_test_running_a_loop", "marked", 50),
        ("test_marked_anyio_test[asyncio]", "anyio", 50),
        ("test_marked_anyio_test[uvloop]", "anyio", 50),
        ("test_fixture", "fixture", 100),
    ]:
        text = failures[test]
        first = next(x for x in text.splitlines() if "LoopBlockedError" in x)
        assert "LoopBlockedError: the event loop blocked for " in first
        assert (
            f"(threshold {threshold} ms) at {path}:{line_of('BLOCK:' + marker, path)} in " in first
        )
        # The stack starts at the test file and ends at the blocking line.
        section = text.split("Stack of the longest block (most recent call last):")[1]
        stack = section.split("Move the blocking call")[0].strip().splitlines()
        assert stack[0].strip().startswith(f"{path}:")
        assert stack[-1].strip().startswith(f"{path}:{line_of('BLOCK:' + marker, path)} in ")
        assert "await offloop.to_thread(fn, ...)" in text
        assert "pytest_plugin.py" not in text  # the plugin's own frame is hidden
    assert "the test's own failure" in failures["test_own_failure_wins"]
    assert "LoopBlockedError" not in failures["test_own_failure_wins"]


def test_the_plugin_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    original = asyncio.BaseEventLoop.run_forever
    pytester.makepyfile(test_blocking=BLOCKING_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", "-k", "marked_sync or unmarked")
    result.assert_outcomes(passed=1, failed=1)
    assert asyncio.BaseEventLoop.run_forever is original
    assert not hasattr(asyncio.BaseEventLoop.run_forever, "__offloop_original__")


ONE_BLOCKING_TEST = textwrap.dedent(
    """\
    import asyncio
    import time

    import pytest


    @pytest.mark.no_blocking(threshold=0.05)
    def test_blocks():
        async def main():
            time.sleep(0.2)
        asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("autoload", "conftest", "args"),
    [
        (True, False, []),
        (True, True, []),
        (True, False, ["-p", "offloop.pytest_plugin"]),
        (False, True, []),
        (False, False, ["-p", "offloop.pytest_plugin"]),
    ],
    ids=["autoload", "conftest", "-p", "conftest-no-autoload", "-p-no-autoload"],
)
def test_every_documented_way_of_loading_the_plugin_works(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    autoload: bool,
    conftest: bool,
    args: list[str],
) -> None:
    # Naming the module used to stop pytest with "Plugin already registered
    # under a different name" when the entry point had loaded it as "offloop".
    if not autoload:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    if conftest:
        pytester.makeconftest('pytest_plugins = ["offloop.pytest_plugin"]')
    pytester.makepyfile(test_one=ONE_BLOCKING_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", *args)
    result.assert_outcomes(failed=1)
    assert "LoopBlockedError: the event loop blocked for " in result.stdout.str()


def test_the_plugin_can_be_switched_off_by_its_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one=ONE_BLOCKING_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", "-p", "no:offloop.pytest_plugin")
    result.assert_outcomes(passed=1)
    assert "LoopBlockedError" not in result.stdout.str()


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.no_blocking(threshold=0.1): fail the test if *"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("no_blocking(threshold=-1)", "threshold to be a positive number of seconds, got -1"),
        (
            "no_blocking('fast')",
            "TypeError: @pytest.mark.no_blocking needs threshold as a number of seconds "
            "(e.g. threshold=0.1), got str 'fast'",
        ),
        (
            "no_blocking(threshold='0.1')",
            "TypeError: @pytest.mark.no_blocking needs threshold as a number of seconds",
        ),
        (
            "no_blocking(0.05, threshold=0.2)",
            "TypeError: @pytest.mark.no_blocking was given threshold twice, as 0.05 and as "
            "threshold=0.2",
        ),
        ("no_blocking(threshold=1e-6)", "needs threshold to be at least 0.01 seconds"),
        ("no_blocking(threshold=float('nan'))", "threshold to be a positive number"),
        ("no_blocking(0.1, 0.2)", "takes one argument, threshold (seconds)"),
        ("no_blocking(limit=0.1)", "takes one argument, threshold (seconds)"),
    ],
)
def test_a_bad_marker_fails_the_test_with_a_message(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.{marker}
        def test_it():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    assert message in result.stdout.str()

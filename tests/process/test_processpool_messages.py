"""ProcessPool error messages: they name the call, the argument, and the fix."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

import offloop
from offloop._process import pickling as _pickling
from offloop._process.pool import ProcessPool
from offloop._process.toprocess import default_process_pool
from tests.helpers import WAIT

pytestmark = pytest.mark.usefixtures("resource_tracker")


def make_lock() -> threading.Lock:
    return threading.Lock()


class HoldsALock(Exception):
    """Its __init__ takes its .args, but an attribute cannot be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def fail(kind: str) -> None:
    raise HoldsALock("query failed") if kind == "lock" else NeedsTwoArgs("x", "y")


class NoRepr:
    """Cannot be pickled (it holds a lock), and its repr() raises."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def make_no_repr() -> NoRepr:
    return NoRepr()


def ignore(value: object) -> None:
    pass


class NoStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def load_in_worker() -> None:
    # Unpickling the argument runs this; in a worker process, it fails oddly.
    if multiprocessing.parent_process() is not None:
        raise NoStr


class FailsToLoadOddly:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return load_in_worker, ()


def init_fails_oddly(kind: str) -> None:
    if kind == "str":
        raise NoStr
    fail(kind)


async def async_gen_init() -> AsyncIterator[None]:
    yield None


async def async_init() -> None:
    pass


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPool]:
    pool = ProcessPool(1, name="p")

    async def start() -> None:  # its worker predates the leak snapshots
        await asyncio.wait_for(pool.run(int), WAIT)

    asyncio.run(start())
    yield pool
    pool.close(timeout=WAIT)


@pytest.mark.loops("asyncio")
async def test_errors_made_from_a_reply_name_the_call_as_the_user_wrote_it(
    pool: ProcessPool,
) -> None:
    with pytest.raises(offloop.NotPicklableError, match=r"^ProcessPool 'p'\.run\(\): "):
        await asyncio.wait_for(pool.run(make_lock), WAIT)
    try:
        with pytest.raises(offloop.NotPicklableError, match=r"^offloop\.to_process\(\): "):
            await asyncio.wait_for(offloop.to_process(make_lock), WAIT)
    finally:
        await asyncio.wait_for(default_process_pool().aclose(), WAIT)


@pytest.mark.loops("asyncio")
async def test_an_exception_that_cannot_cross_is_reported_with_the_real_reason(
    pool: ProcessPool,
) -> None:
    with pytest.raises(offloop.NotPicklableError) as info:
        await asyncio.wait_for(pool.run(fail, "lock"), WAIT)
    text = str(info.value)
    assert "HoldsALock: query failed" in text
    assert "could not be pickled (TypeError: cannot pickle '_thread.lock' object)" in text
    assert "__init__" not in text  # its __init__ is fine: that advice would mislead
    with pytest.raises(offloop.NotPicklableError) as info:
        await asyncio.wait_for(pool.run(fail, "args"), WAIT)
    text = str(info.value)
    assert "NeedsTwoArgs: x/y" in text
    assert "could not be rebuilt from its pickle (TypeError: " in text
    assert "an __init__ that accepts its .args" in text


@pytest.mark.loops("asyncio")
@pytest.mark.parametrize("kind", ["lock", "args", "str"])
async def test_an_initializer_exception_that_cannot_cross_still_fails_only_its_call(
    kind: str,
) -> None:
    # The worker exits after its initializer failed, whatever that exception
    # is: the call it was started for fails naming the initializer, and the
    # next call starts a worker of its own instead of being handed to the
    # one that is exiting (which failed it as "died while starting").
    async with ProcessPool(
        1, name="oddinit", initializer=init_fails_oddly, initargs=(kind,)
    ) as pool:
        for _ in range(2):
            with pytest.raises(offloop.WorkerCrashed) as info:
                await asyncio.wait_for(pool.run(int), WAIT)
            text = str(info.value)
            assert "could not start: its initializer function 'init_fails_oddly' raised" in text
            said = {"lock": "HoldsALock: query failed", "args": "NeedsTwoArgs: x/y", "str": "NoStr"}
            assert said[kind] in text
        results = await asyncio.wait_for(
            asyncio.gather(pool.run(int), pool.run(int), return_exceptions=True), WAIT
        )
        assert all("its initializer function" in str(error) for error in results), results
        assert pool.statistics()["crashed"] == 0


@pytest.mark.loops("asyncio")
async def test_an_unpicklable_object_whose_repr_raises_is_still_named(pool: ProcessPool) -> None:
    # The message names the object by its type instead; the repr's own error
    # must neither replace the NotPicklableError nor kill the worker.
    with pytest.raises(offloop.NotPicklableError, match=r"argument 0 \(NoRepr <.*repr"):
        pool.run(ignore, NoRepr())
    with pytest.raises(offloop.NotPicklableError, match=r"its result \(NoRepr <.*repr"):
        await asyncio.wait_for(pool.run(make_no_repr), WAIT)
    assert pool.statistics()["crashed"] == 0
    assert await asyncio.wait_for(pool.run(int, "7"), WAIT) == 7


@pytest.mark.loops("asyncio")
async def test_an_argument_that_fails_to_load_with_an_unprintable_error_is_named(
    pool: ProcessPool,
) -> None:
    with pytest.raises(offloop.NotPicklableError, match=r"could not unpickle the call .*NoStr"):
        await asyncio.wait_for(pool.run(ignore, FailsToLoadOddly()), WAIT)
    assert pool.statistics()["crashed"] == 0  # reported, not a dead worker


@pytest.mark.loops("asyncio")
async def test_an_unpicklable_function_is_named_once(
    pool: ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pickling, "_cloudpickle", None)  # a lambda then cannot be pickled
    with pytest.raises(offloop.NotPicklableError) as info:
        pool.run(lambda: 1)
    message = str(info.value)
    assert message.startswith(f"ProcessPool {pool.name!r}.run() cannot send the call"), message
    assert (
        " to a worker process: its function (function "
        "'test_an_unpicklable_function_is_named_once.<locals>.<lambda>') cannot be pickled ("
    ) in message


def test_a_class_of_the_main_script_is_named_as_in_the_script() -> None:
    # A spawned worker imports the main script as __mp_main__.
    cls = type("DbError", (Exception,), {"__module__": "__mp_main__"})
    assert _pickling._qualname(cls) == "__main__.DbError"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"initargs": 5}, r"^ProcessPool\(initargs=\.\.\.\) must be a tuple .* got int 5; .*"),
        ({"initargs": "ab"}, r"^ProcessPool\(initargs=\.\.\.\) must be a tuple"),
        ({"initializer": 5}, r"^ProcessPool\(initializer=\.\.\.\) must be a function, .*int 5\.$"),
        ({"initializer": async_init}, r"'async_init', a coroutine function, .*Pass a plain"),
        ({"initializer": async_gen_init}, r"'async_gen_init', an async generator function"),
        ({"initargs": {"a": 1}}, r"^ProcessPool\(initargs=\.\.\.\) must be a tuple .*dict"),
    ],
)
def test_bad_initializer_options_are_named(options: dict[str, object], error: str) -> None:
    with pytest.raises(TypeError, match=error):
        ProcessPool(1, **options)  # type: ignore[arg-type]


@pytest.mark.loops("asyncio")
async def test_a_bad_aclose_timeout_is_refused_before_the_pool_closes() -> None:
    pool = ProcessPool(1, name="timeouts")
    for timeout, error in [("2", TypeError), (-1, ValueError), (float("nan"), ValueError)]:
        with pytest.raises(error, match=r"^ProcessPool\.aclose\(timeout=\.\.\.\) must be"):
            await pool.aclose(timeout=timeout)  # type: ignore[arg-type]
        assert pool.statistics()["state"] == "open"
    assert await asyncio.wait_for(pool.run(abs, -2), WAIT) == 2
    await asyncio.wait_for(pool.aclose(timeout=float("inf")), WAIT)
    assert pool.statistics()["state"] == "closed"


def test_a_bad_close_timeout_is_refused_before_the_pool_closes() -> None:
    pool = ProcessPool(1, name="synctimeouts")
    with pytest.raises(TypeError, match=r"^ProcessPool\.close\(timeout=\.\.\.\) must be"):
        pool.close(timeout="2")  # type: ignore[arg-type]
    assert pool.statistics()["state"] == "open"
    pool.close(timeout=float("inf"))
    assert pool.statistics()["state"] == "closed"


def test_a_timeout_beyond_what_a_wait_takes_means_no_timeout() -> None:
    pool = ProcessPool(1, name="hugetimeout")
    pool.close(timeout=1e10)  # above threading.TIMEOUT_MAX: it raised OverflowError, half closed
    assert pool.statistics()["state"] == "closed"


def test_to_process_outside_a_running_loop_shows_how_to_await_it() -> None:
    with pytest.raises(RuntimeError, match="no event loop running") as info:
        offloop.to_process(abs, -1)
    assert "'await offloop.to_process(fn)'" in str(info.value)
    assert "to_thread" not in str(info.value)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_kill_on_cancel_must_be_a_bool(value: object) -> None:
    with pytest.raises(
        TypeError,
        match=r"^ProcessPool\(kill_on_cancel=\.\.\.\) must be True or False, got .*\. Pass True",
    ):
        ProcessPool(1, kill_on_cancel=value)  # type: ignore[arg-type]

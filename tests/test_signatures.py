"""The public signatures the issues name, pinned: names, kinds and defaults.

A rename, a default changed by accident or an option that stops being
keyword-only (and could then collide with a user's arguments) fails here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import offloop

POS = inspect.Parameter.POSITIONAL_ONLY
ANY = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
ARGS = inspect.Parameter.VAR_POSITIONAL
KWARGS = inspect.Parameter.VAR_KEYWORD
REQUIRED = inspect.Parameter.empty

OFFLOAD = [("fn", POS, REQUIRED), ("args", ARGS, REQUIRED), ("kwargs", KWARGS, REQUIRED)]
ASYNC_OFFLOAD = [("async_fn", POS, REQUIRED), *OFFLOAD[1:]]


def shape(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


SIGNATURES: dict[str, tuple[Callable[..., Any], list[tuple[str, Any, Any]]]] = {
    "to_thread": (offloop.to_thread, OFFLOAD),
    "to_process": (offloop.to_process, OFFLOAD),
    "to_loop": (offloop.to_loop, ASYNC_OFFLOAD),
    "from_thread": (offloop.from_thread, ASYNC_OFFLOAD),
    "ThreadPool.run": (offloop.ThreadPool.run, [("self", POS, REQUIRED), *OFFLOAD]),
    "ProcessPool.run": (offloop.ProcessPool.run, [("self", POS, REQUIRED), *OFFLOAD]),
    "DaskPool.run": (offloop.DaskPool.run, [("self", POS, REQUIRED), *OFFLOAD]),
    "ThreadPool": (
        offloop.ThreadPool,
        [
            ("max_workers", ANY, None),
            ("name", KW, None),
            ("on_cancel", KW, "abandon"),
            ("cpu_slots", KW, None),
        ],
    ),
    "ProcessPool": (
        offloop.ProcessPool,
        [
            ("max_workers", ANY, None),
            ("kill_on_cancel", KW, False),
            ("max_tasks_per_worker", KW, None),
            ("initializer", KW, None),
            ("initargs", KW, ()),
            ("mp_context", KW, None),
            ("name", KW, None),
        ],
    ),
    "DaskPool": (
        offloop.DaskPool,
        [
            ("address", ANY, None),
            ("client", KW, None),
            ("connect_timeout", KW, 30.0),
            ("name", KW, None),
        ],
    ),
    "LoopThread": (offloop.LoopThread, [("name", KW, None), ("loop_factory", KW, None)]),
    "Supervisor": (
        offloop.Supervisor,
        [
            ("grace", KW, 5.0),
            ("name", KW, None),
            ("detect_blocking", KW, None),
            ("on_failure", KW, None),
            ("status_port", KW, None),
            ("status_host", KW, "127.0.0.1"),
        ],
    ),
    "Supervisor.service": (
        offloop.Supervisor.service,
        [
            ("self", POS, REQUIRED),
            ("fn", POS, None),
            ("restart", KW, "on-failure"),
            ("backoff", KW, 0.5),
            ("max_backoff", KW, 30.0),
            ("max_restarts", KW, 5),
            ("restart_window", KW, 60.0),
            ("isolate", KW, None),
            ("name", KW, None),
            ("depends_on", KW, ()),
            ("on_dependency_restart", KW, "restart"),
            ("oneshot", KW, False),
            ("retry_startup", KW, False),
            ("startup_window", KW, 1.0),
            ("start_timeout", KW, None),
        ],
    ),
    "detect_blocking": (
        offloop.detect_blocking,
        [("threshold", KW, 0.1), ("interval", KW, None), ("on_block", KW, None)],
    ),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_public_signature(name: str) -> None:
    fn, expected = SIGNATURES[name]
    assert shape(fn) == expected


def test_adapters_take_the_app_then_keyword_only_options() -> None:
    wsgi = dict((n, (k, d)) for n, k, d in shape(offloop.WSGIService))
    assert wsgi["app"] == (ANY, REQUIRED)
    assert wsgi["host"] == (KW, "127.0.0.1")
    assert wsgi["port"] == (KW, 8000)
    assert wsgi["server"] == (KW, "werkzeug")
    for adapter in (offloop.AiohttpService, offloop.ASGIService):
        params = dict((n, (k, d)) for n, k, d in shape(adapter))
        assert params["app"] == (ANY, REQUIRED)
        assert params["host"][0] is KW
        assert params["port"][0] is KW
    watch = dict((n, (k, d)) for n, k, d in shape(offloop.WatchService))
    assert watch["path"] == (ANY, REQUIRED)
    assert watch["handler"] == (ANY, REQUIRED)
    assert watch["recursive"] == (KW, True)
    assert watch["patterns"] == (KW, None)


def test_iterate_takes_a_keyword_only_buffer() -> None:
    params = dict((n, (k, d)) for n, k, d in shape(offloop.iterate))
    assert params["iterable"] == (ANY, REQUIRED)
    assert params["buffer"][0] is KW

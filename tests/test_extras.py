"""Integrations are extras: imported lazily, and missing ones named with the fix."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import offloop

INTEGRATIONS = (
    "aiohttp",
    "cloudpickle",
    "distributed",
    "flask",
    "rich",
    "uvicorn",
    "uvloop",
    "waitress",
    "watchdog",
    "werkzeug",
)


def test_importing_offloop_imports_no_integration() -> None:
    code = f"import sys, offloop\nprint(sorted(m for m in {INTEGRATIONS!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never served")


def make_aiohttp() -> Any:
    # Built before its package is hidden: only the service must fail.
    from aiohttp import web

    return offloop.AiohttpService, web.Application()


CASES: list[tuple[str, str, Callable[[Path], object]]] = [
    ("werkzeug.serving", "flask", lambda p: offloop.WSGIService(wsgi_app, port=0)),
    (
        "waitress",
        "waitress",
        lambda p: offloop.WSGIService(wsgi_app, port=0, server="waitress"),
    ),
    ("uvicorn", "asgi", lambda p: offloop.ASGIService(asgi_app, port=0)),
    ("watchdog.observers", "watch", lambda p: offloop.WatchService(p, print)),
    ("distributed", "dask", lambda p: offloop.DaskPool("tcp://127.0.0.1:1")),
]


@pytest.mark.parametrize(("module", "extra", "make"), CASES, ids=[extra for _, extra, _ in CASES])
def test_a_missing_extra_is_named_where_the_service_is_written(
    module: str,
    extra: str,
    make: Callable[[Path], object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # its import now fails
    with pytest.raises(
        offloop.MissingExtraError, match=rf"pip install 'offloop\[{extra}\]'"
    ) as info:
        make(tmp_path)
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ImportError)


def test_a_missing_aiohttp_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    service, app = make_aiohttp()
    monkeypatch.setitem(sys.modules, "aiohttp.web", None)
    with pytest.raises(offloop.MissingExtraError, match=r"pip install 'offloop\[aiohttp\]'"):
        service(app, port=0)

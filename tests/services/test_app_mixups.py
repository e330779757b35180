"""An app handed to the adapter of another protocol is refused with the adapter it needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp.web
import flask
import pytest
from starlette.applications import Starlette

import offloop


def flask_app() -> Any:
    return flask.Flask("mixup")


def aiohttp_app() -> Any:
    return aiohttp.web.Application()


def starlette_app() -> Any:
    return Starlette()


@pytest.mark.parametrize(
    ("adapter", "make_app", "wanted"),
    [
        (offloop.WSGIService, aiohttp_app, "AiohttpService"),
        (offloop.WSGIService, starlette_app, "ASGIService"),
        (offloop.ASGIService, flask_app, "WSGIService"),
        (offloop.ASGIService, aiohttp_app, "AiohttpService"),
        (offloop.AiohttpService, flask_app, "WSGIService"),
        (offloop.AiohttpService, starlette_app, "ASGIService"),
    ],
)
def test_an_app_of_another_protocol_is_refused_naming_its_adapter(
    adapter: Callable[[Any], object], make_app: Callable[[], Any], wanted: str
) -> None:
    with pytest.raises(TypeError, match=rf"supervise it with offloop\.{wanted}\(app\) instead\."):
        adapter(make_app())


def test_a_factory_is_still_told_to_pass_what_it_returns() -> None:
    def create_app() -> flask.Flask:
        return flask_app()  # type: ignore[no-any-return]

    with pytest.raises(TypeError, match=r"app factory, pass the app it returns"):
        offloop.WSGIService(create_app)  # type: ignore[arg-type]

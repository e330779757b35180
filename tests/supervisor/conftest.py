"""Fixtures shared by the supervisor tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from offloop._supervisor.logs import make_handler


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The supervisor's log, one JSON object a line, at INFO, for the test's duration."""
    out = io.StringIO()
    handler = make_handler("json", out)
    logger = logging.getLogger("offloop.supervisor")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old)

"""Lazy imports of optional integrations, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


def require(module: str, extra: str, *, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    ``feature`` is what the user asked for (e.g. ``"WSGIService"``), so the
    message says why the module is needed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the package {module.split('.')[0]!r}, which is not installed. "
            f"Install it with: pip install 'offloop[{extra}]'"
        ) from exc

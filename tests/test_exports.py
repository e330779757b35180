"""The public surface: complete __all__, public module paths, docstrings."""

from __future__ import annotations

import inspect
import types

import offloop


def test_all_is_complete_and_sorted() -> None:
    public = {
        name
        for name, obj in vars(offloop).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    assert public - {"annotations"} <= set(offloop.__all__), "public names missing from __all__"
    assert all(hasattr(offloop, name) for name in offloop.__all__)
    names = [n for n in offloop.__all__ if n != "__version__"]
    assert names == sorted(names)


def test_public_objects_show_the_public_module_and_have_docstrings() -> None:
    for name in offloop.__all__:
        obj = getattr(offloop, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(obj), f"offloop.{name} has no docstring"
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "offloop", f"offloop.{name} shows {obj.__module__}"


def test_public_methods_have_docstrings() -> None:
    for name in offloop.__all__:
        obj = getattr(offloop, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"offloop.{name}.{attr} has no docstring"


def test_version_matches_the_package_metadata() -> None:
    from importlib.metadata import version

    assert offloop.__version__ == version("offloop")

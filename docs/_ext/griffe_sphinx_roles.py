"""A griffe extension for ``make docs``: offloop's docstrings, readable as Markdown.

The docstrings are written for ``help()`` and IDEs, with Sphinx roles
(``:class:`~offloop.StopToken```) and reST literal blocks (a paragraph ending
in ``::``). mkdocstrings renders Markdown, where those show as noise. This
extension rewrites each docstring as griffe loads it:

- a role whose target is a public object the API reference documents becomes
  a cross-reference to it, ``[`StopToken`][offloop.StopToken]``; any other
  target (a private helper, a builtin) becomes plain code, so no link is ever
  left unresolved (``mkdocs build --strict`` would fail on one);
- a paragraph's closing ``::`` becomes ``:`` (the indented block after it is
  already a Markdown code block).

Configured in mkdocs.yml (``extensions`` of the python handler); it only
touches the text griffe renders, never offloop itself.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import griffe

import offloop

ROLE = re.compile(r":(class|func|meth|data|attr|exc|obj|mod):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)
PUBLIC = frozenset(name for name in offloop.__all__ if not name.startswith("__"))


def _documented_member(owner: str, member: str) -> bool:
    """Whether the reference renders ``offloop.<owner>.<member>`` under its own heading.

    mkdocstrings shows a class's own public members that have a docstring:
    methods and properties; not inherited members, nor plain attributes.
    """
    cls = getattr(offloop, owner)
    if not inspect.isclass(cls) or member.startswith("_"):
        return False
    value = vars(cls).get(member)
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if not (inspect.isfunction(value) or isinstance(value, property)):
        return False
    return bool(inspect.getdoc(value))


def _target(ref: str, context: str | None) -> str | None:
    """The reference's identifier for ``ref`` (``offloop.X`` or ``offloop.X.m``), or None.

    ``context`` is the public class whose docstring holds the role, for
    relative roles such as ``:meth:`aclose```.
    """
    parts = ref.removeprefix("offloop.").split(".")
    if parts[0] in PUBLIC:
        if len(parts) == 1:
            return f"offloop.{parts[0]}"
        if len(parts) == 2 and _documented_member(parts[0], parts[1]):
            return f"offloop.{parts[0]}.{parts[1]}"
        return None
    if context is not None and len(parts) == 1 and _documented_member(context, parts[0]):
        return f"offloop.{context}.{parts[0]}"
    return None


def _public_class(obj: griffe.Object) -> str | None:
    """The public class ``obj`` is, or belongs to, if any."""
    current: griffe.Object | None = obj
    while current is not None:
        if current.is_class and current.name in PUBLIC:
            return current.name
        parent = current.parent
        current = parent if isinstance(parent, griffe.Object) else None
    return None


def rewrite(text: str, context: str | None) -> str:
    """``text`` with its Sphinx roles and reST literal-block markers made Markdown."""

    def role(match: re.Match[str]) -> str:
        kind, short, ref = match.group(1), match.group(2) == "~", match.group(3).strip()
        label = ref.rsplit(".", 1)[-1] if short else ref.removeprefix("offloop.")
        if kind in ("func", "meth") and not label.endswith(")"):
            label += "()"  # as Sphinx shows a function
        target = _target(ref, context)
        return f"[`{label}`][{target}]" if target else f"`{label}`"

    return LITERAL_BLOCK.sub(r"\1:", ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe for each object it loads."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, _public_class(obj))

"""The argument parser of every ``offloop`` command: options whose value is optional.

argparse gives an option declared with ``nargs="?"`` the next word whenever
that word does not start with ``-``, so ``offloop run --detect-blocking
app:sv`` hands ``app:sv`` to ``--detect-blocking`` (and then misses the
target). An option may name, with ``yields_to``, the words that are never its
value but the command's next positional argument; such a word is left to the
positional and the option takes its ``const``, as if it stood last.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Parser"]


@dataclass(frozen=True)
class _OptionalValue:
    option_strings: tuple[str, ...]
    const: Any
    yields_to: Callable[[str], bool]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose optional-value options can give a word back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set first: the base class adds --help through add_argument.
        self._optional_values: list[_OptionalValue] = []
        self._long_options: list[str] = []
        super().__init__(*args, **kwargs)

    def add_argument(
        self,
        *args: Any,
        yields_to: Callable[[str], bool] | None = None,
        **kwargs: Any,
    ) -> argparse.Action:
        """``ArgumentParser.add_argument``, plus ``yields_to`` for ``nargs="?"`` options.

        ``yields_to(word)`` is true for a word that follows the option but is
        the next positional argument, not the option's value.
        """
        action = super().add_argument(*args, **kwargs)
        self._long_options += [s for s in action.option_strings if s.startswith("--")]
        if yields_to is not None:
            if action.nargs != argparse.OPTIONAL or not action.option_strings:
                raise ValueError(f"yields_to is for options with nargs='?', not {args!r}.")
            self._optional_values.append(
                _OptionalValue(tuple(action.option_strings), action.const, yields_to)
            )
        return action

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Subcommand parsers are called here by argparse with their own words.
        if args is not None and self._optional_values:
            args = self._give_back(list(args))
        return super().parse_known_args(args, namespace)

    def _give_back(self, words: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            if word == "--":  # everything after it is positional
                return out + words[i:]
            option = self._optional_value(word)
            following = words[i + 1] if i + 1 < len(words) else None
            if (
                option is not None
                and following is not None
                and not following.startswith("-")
                and option.yields_to(following)
            ):
                # The '=' form keeps the option from taking any word at all.
                out += [f"{word}={option.const}", following]
                i += 2
                continue
            out.append(word)
            i += 1
        return out

    def _optional_value(self, word: str) -> _OptionalValue | None:
        """The optional-value option ``word`` names (in full or abbreviated), if any."""
        if not word.startswith("--") or "=" in word:
            return None
        if word not in self._long_options:
            if not self.allow_abbrev:
                return None
            # argparse accepts an unambiguous prefix of a long option.
            matches = [s for s in self._long_options if s.startswith(word)]
            if len(matches) != 1:
                return None
            word = matches[0]
        return next((o for o in self._optional_values if word in o.option_strings), None)

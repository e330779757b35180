"""The ``offloop`` command line (also ``python -m offloop``).

Each subcommand lives in its own module of this package, which exposes
``register(subparsers) -> None``; the parser it adds sets ``handler`` to a
function taking the parsed namespace and returning the exit code. They are
imported when the command line is parsed, so ``import offloop`` stays light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    from .parsing import Parser

    # Subcommand parsers are made of the same class (argparse's default).
    parser = Parser(
        prog="offloop",
        description="Run blocking code beside an asyncio event loop, and supervise it.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    from . import check, demo, run

    # This order is the order of ``offloop --help``.
    for command in (run, check, demo):
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``offloop`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The arguments as given: 'run --reload' passes them on to its child.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args))


def _version() -> str:
    from .. import __version__

    return f"offloop {__version__}"

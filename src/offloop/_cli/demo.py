"""``offloop demo``: a chat-bot program, done right (source: ``examples/chatbot.py``).

A chat-bot coroutine, a Flask app served through :class:`~offloop.WSGIService`,
an aiohttp app, a :class:`~offloop.WatchService` on a temporary folder and a
periodic job (the ``while True`` loop, as ``@sv.every``), all under one
:class:`~offloop.Supervisor`, which serves its probes (``/healthz``,
``/readyz``, ``/metrics``) on a free port. Ctrl-C stops it within a second;
``--seconds N`` stops it by itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any, Final

#: The program lives in the repository's examples/, where users read it; a
#: wheel installs the same file under <data>/share/offloop/examples/.
DEMO_PROGRAM: Final = Path(__file__).resolve().parents[3] / "examples" / "chatbot.py"
_INSTALLED: Final = Path("share", "offloop", "examples", "chatbot.py")


def demo_program_candidates() -> list[Path]:
    """Where the demo's program may be: the source checkout, then installed data dirs."""
    found = [DEMO_PROGRAM]
    for scheme in (None, f"{os.name}_user"):
        try:
            data = sysconfig.get_path("data", scheme) if scheme else sysconfig.get_path("data")
        except KeyError:
            continue
        found.append(Path(data) / _INSTALLED)
    return found


#: What the demo shows, and the extra each part needs.
NEEDS: Final = {"flask": "flask", "aiohttp": "aiohttp", "watchdog": "watch"}


def load_demo_program(path: Path | None = None) -> ModuleType:
    """Import ``examples/chatbot.py`` by its path (by default, the first that exists).

    Raises:
        FileNotFoundError: offloop was installed without its examples folder.
        MissingExtraError: a package the demo shows is not installed.
    """
    from .._core.errors import MissingExtraError
    from .._core.extras import require

    candidates = [path] if path is not None else demo_program_candidates()
    path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"The demo's program is not in {', '.join(repr(str(c)) for c in candidates)}: "
            f"install offloop from its wheel, or run the demo from a source checkout of "
            f"offloop (git clone, then 'make demo')."
        )
    missing = []
    for package, extra in NEEDS.items():
        try:
            require(package, extra, feature="offloop demo")
        except MissingExtraError as exc:
            missing.append((package, extra, exc))
    if len(missing) == 1:
        raise missing[0][2]
    if missing:
        # One install line for all of them, not one round trip per package.
        names = [repr(package) for package, _, _ in missing]
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        extras = ",".join(extra for _, extra, _ in missing)
        raise MissingExtraError(
            f"offloop demo needs the packages {listed}, which are not installed. "
            f"Install them with: pip install 'offloop[{extras}]'"
        ) from missing[0][2]
    spec = importlib.util.spec_from_file_location("offloop_demo_chatbot", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _handle(args: argparse.Namespace) -> int:
    from .._core.errors import MissingExtraError

    # A zero interval would tick in a busy loop; NaN and negative values make no sense.
    for flag, value in (("--seconds", args.seconds), ("--interval", args.interval)):
        if value is not None and not (0 < value < math.inf):
            print(
                f"offloop demo: error: {flag} must be a positive, finite number of seconds, "
                f"got {value}; for example {flag} 5.",
                file=sys.stderr,
            )
            return 2

    try:
        program = load_demo_program()
    except (FileNotFoundError, MissingExtraError) as exc:
        print(f"offloop demo: {exc}", file=sys.stderr)
        return 2
    return int(program.run(seconds=args.seconds, interval=args.interval))


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help=(
            "run the demo program: a bot, Flask, aiohttp, a file watcher, a periodic job "
            "and the probes"
        ),
        # The docstring's reST quotes read as noise in a terminal.
        description=__doc__.splitlines()[0].replace("``", "") if __doc__ else None,
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="N",
        help="stop by itself after N seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between ticks (default 0.5)"
    )
    parser.set_defaults(handler=_handle)

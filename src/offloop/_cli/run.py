"""``offloop run module:attr``: run a Supervisor defined in a module, like uvicorn runs an app.

In a terminal it shows a live table of the services (with the ``[rich]``
extra); otherwise, or with ``--plain``, the supervisor's log lines.
``--status-port N`` serves the probes on 127.0.0.1 (``/status``,
``/healthz``, ``/readyz``, ``/metrics``): it sets the supervisor's own
``status_port`` (:mod:`offloop._supervisor.probes`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .._core.errors import ServiceFailed, StatusPortError
from .._core.validate import describe
from .._supervisor.importing import StartedOnImport, guard_advice, importing_target
from .._supervisor.logs import LogFormat, make_handler
from .._supervisor.signals import run_with_signals
from .._supervisor.status import ServiceState, SupervisorState
from .._supervisor.supervisor import Supervisor
from .parsing import Parser

__all__ = ["load_supervisor", "register", "render_table"]

logger: Final = logging.getLogger("offloop.cli")

#: The terminal control sequence that shows the cursor again (DECTCEM).
SHOW_CURSOR: Final = b"\x1b[?25h"


class UsageError(Exception):
    """A command-line argument cannot be used; the message says why (exit code 2)."""


class TargetError(UsageError):
    """The MODULE:ATTR argument does not lead to a Supervisor (message says why)."""


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand."""
    parser: Parser = subparsers.add_parser(
        "run",
        help="run the Supervisor found at MODULE:ATTR",
        description=(
            "Import MODULE from the current directory and run the offloop.Supervisor named "
            "ATTR (or returned by calling ATTR with no arguments) until Ctrl-C. The first "
            "Ctrl-C/SIGTERM stops the services gracefully; a second one exits at once."
        ),
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="e.g. 'app:sv' or 'pkg.app:make'")
    parser.add_argument(
        "--status-port",
        type=int,
        default=None,
        metavar="N",
        help="serve /status, /healthz, /readyz and /metrics on 127.0.0.1:N (0: any free port)",
    )
    parser.add_argument(
        "--detect-blocking",
        type=_seconds,
        nargs="?",
        const=0.1,
        default=None,
        metavar="SECONDS",
        help="log every block of the event loop longer than SECONDS (default 0.1) with the "
        "line that blocked it",
        # 'run --detect-blocking app:sv': the target is not the threshold.
        yields_to=_is_target,
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="log lines only, no live table, even in a terminal",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of the log lines (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line for log collectors (implies --plain)",
    )
    parser.add_argument(
        "--reload",
        action="store_true",
        help="run the program in a child process and restart it whenever a Python file "
        "changes (needs offloop[reload])",
    )
    parser.add_argument(
        "--reload-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="with --reload: watch DIR (repeatable; default: the current directory)",
    )
    parser.set_defaults(handler=main)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds such as 0.1, got {text!r}"
        ) from None


def _is_target(word: str) -> bool:
    """True for a MODULE:ATTR word, which no number of seconds looks like."""
    return ":" in word


def main(args: argparse.Namespace) -> int:
    """Run the ``run`` subcommand; return the exit code."""
    if args.detect_blocking is not None:
        from .._detect.thresholds import threshold_out_of_range

        problem = threshold_out_of_range(args.detect_blocking, "--detect-blocking")
        if problem is not None:
            print(
                f"offloop run: error: {problem}. Pass for example --detect-blocking 0.1.",
                file=sys.stderr,
            )
            return 2
    if args.status_port is not None and not 0 <= args.status_port <= 65535:
        print(
            f"offloop run: error: --status-port must be between 0 and 65535, "
            f"got {args.status_port}.",
            file=sys.stderr,
        )
        return 2
    if args.reload or args.reload_dir:
        return _reload(args)
    from .reload import stop_with_parent

    stop_with_parent()
    use_table = (
        not args.plain
        and args.log_format == "text"
        and sys.stdout.isatty()
        and importlib.util.find_spec("rich") is not None
    )
    try:
        sv = load_supervisor(args.target)
        console = _setup_logging(args.log_level.upper(), use_table, args.log_format)
        return run_with_signals(
            sv,
            lambda: _serve(sv, args.status_port, console, args.detect_blocking),
            on_forced_exit=None if console is None else _show_cursor_now(),
        )
    except UsageError as exc:
        print(f"offloop run: error: {exc}", file=sys.stderr)
        return 2
    except ServiceFailed as exc:
        logger.error("%s", exc)
        return 1


def _reload(args: argparse.Namespace) -> int:
    from .._core.errors import MissingExtraError
    from .._core.extras import require
    from .._supervisor.logs import configure_logging
    from .reload import child_argv, run_reloader

    if not args.reload:
        print("offloop run: error: --reload-dir needs --reload.", file=sys.stderr)
        return 2
    dirs = [Path(d).resolve() for d in args.reload_dir or [os.getcwd()]]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(
            f"offloop run: error: --reload-dir {', '.join(missing)} is not a directory; "
            f"name the folders that hold the program's source.",
            file=sys.stderr,
        )
        return 2
    try:
        require("watchfiles", "reload", feature="offloop run --reload")
    except MissingExtraError as exc:
        print(f"offloop run: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_format, args.log_level.upper())
    argv = getattr(args, "argv", None)
    if argv is None:  # main() called without the command line: rebuild the essentials
        argv = ["run", args.target]
    return run_reloader(child_argv(argv), dirs)


def load_supervisor(target: str) -> Supervisor:
    """Import ``module:attr`` from the current directory and return its Supervisor.

    ``attr`` may be dotted (``app:services.sv``) and may name a zero-argument
    callable that returns the Supervisor.

    Raises:
        TargetError: the target is malformed, missing, not a Supervisor, a
            factory that needs arguments, or its module imports a missing module.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(
            f"expected MODULE:ATTR (e.g. 'app:sv'), got {target!r}. MODULE is imported from "
            f"the current directory and ATTR names the offloop.Supervisor in it."
        )
    path_problem = _file_path_instead_of_module(module_name, attr)
    if path_problem is not None:
        # Checked before importing: importing 'app.py' imports 'app' first, so
        # the file's code would run, and then fail with "no module named 'app.py'".
        raise TargetError(path_problem)
    # Like uvicorn: the user's module lives where they run the command, which
    # the console script (unlike 'python -m') does not put on sys.path.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        with importing_target(target):
            module = importlib.import_module(module_name)
    except StartedOnImport as exc:
        raise TargetError(str(exc)) from None
    except ModuleNotFoundError as exc:
        # Only the target itself (or a package above it) missing means a wrong
        # target; 'mytools' missing while importing 'mytoolsapp' is a missing
        # dependency, whose traceback says what to install.
        missing = exc.name
        if missing is None or not (module_name == missing or module_name.startswith(missing + ".")):
            raise TargetError(
                f"could not import the module {module_name!r}: it needs the module "
                f"{missing!r}{_where(exc)}, which is not installed. Install it (or fix the "
                f"import) and run the command again."
            ) from exc
        raise TargetError(
            f"could not import the module {module_name!r}: there is no such module in {cwd} "
            f"or on the Python path. Run the command from the directory that holds it."
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            found = [n for n, v in vars(module).items() if isinstance(v, Supervisor)]
            hint = (
                f" Supervisors in it: {', '.join(found)}."
                if found
                else _guard_hint(module, attr.split(".")[0])
            )
            raise TargetError(
                f"the module {module_name!r} has no attribute {attr!r}.{hint}"
            ) from None
    if isinstance(obj, Supervisor):
        return _not_started(obj, module_name, target)
    if callable(obj):
        _check_factory(obj, target)
        result = obj()
        if isinstance(result, Supervisor):
            return _not_started(result, module_name, target)
        raise TargetError(
            f"{target!r} is a callable, but calling it returned {describe(result)}, "
            f"not an offloop.Supervisor."
        )
    raise TargetError(
        f"{target!r} is {describe(obj)}, not an offloop.Supervisor (or a function that "
        f"returns one)."
    )


def _guard_hint(module: Any, name: str) -> str:
    # A script's habit: everything under the __main__ guard, which an import skips.
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return ""
    for node in tree.body:
        if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
            continue
        for inner in ast.walk(node):
            targets = (
                inner.targets
                if isinstance(inner, ast.Assign)
                else [inner.target]
                if isinstance(inner, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return (
                    f" It is made under 'if __name__ == \"__main__\":', which an import "
                    f"skips. Make it at the top level and keep only {name}.run() under the guard."
                )
    return ""


def _not_started(sv: Supervisor, module_name: str, target: str) -> Supervisor:
    # A module written as a script calls sv.run() at its top level, as the
    # README's examples do: importing it ran the supervisor until Ctrl-C, and
    # serving it again would fail with "it has already run and stopped".
    if sv.state is SupervisorState.NEW:
        return sv
    raise TargetError(
        f"importing the module {module_name!r} already started {target!r} ({sv!r}), and a "
        f"Supervisor runs once: the module calls sv.run() (or serve()) when it is imported. "
        f"{guard_advice(target)}"
    )


def _file_path_instead_of_module(module_name: str, attr: str) -> str | None:
    """What to write instead of a file path given as MODULE, or None if it is not one."""
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if not module_name.endswith(".py") and not any(sep in module_name for sep in separators):
        return None
    folder, file = os.path.split(module_name)
    name = file.removesuffix(".py")
    head = f"MODULE is a module name, not a file: got {module_name!r}."
    if not folder:
        return f"{head} Write '{name}:{attr}' (the module is imported as 'import {name}' would)."
    dotted = ".".join(part for part in folder.replace("\\", "/").split("/") if part)
    return (
        f"{head} Run 'offloop run {name}:{attr}' from the folder {folder!r} (or write "
        f"'{dotted}.{name}:{attr}' if {folder!r} is a package)."
    )


def _where(exc: BaseException) -> str:
    # The last frame of the user's own code: where the missing module was imported.
    tb, where = exc.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen "):
            where = f" (imported at {filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _check_factory(factory: Any, target: str) -> None:
    # Checked before the call, not by catching its TypeError: that would also
    # swallow a TypeError raised inside a factory that takes no arguments.
    try:
        inspect.signature(factory).bind()
    except ValueError:  # no signature to check (some builtins): just call it
        return
    except TypeError as exc:
        raise TargetError(
            f"{target!r} is {describe(factory)}, which cannot be called without arguments "
            f"({exc}). Name an offloop.Supervisor, or a function that takes no arguments and "
            f"returns one."
        ) from None


def _setup_logging(level: str, use_table: bool, log_format: LogFormat = "text") -> Any:
    root = logging.getLogger()
    root.setLevel(level)
    if use_table:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console()
        root.addHandler(RichHandler(console=console, show_path=False))
        return console
    if not root.handlers:
        root.addHandler(make_handler(log_format))
    return None


def _show_cursor_now() -> Callable[[], None]:
    """What a forced exit does for the live table, which hides the terminal's cursor.

    ``Live.stop()`` would show it again, but a forced exit skips it: without
    this the user's shell is left with no cursor. One write to the terminal's
    file descriptor, taken now (the live display redirects ``sys.stdout``), and
    no lock: the forced exit may interrupt the table's own drawing.
    """
    fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1

    def show() -> None:
        os.write(fd, SHOW_CURSOR)

    return show


async def _serve(
    sv: Supervisor, status_port: int | None, console: Any, block_threshold: float | None
) -> None:
    # The supervisor's own detector, as with detect_blocking=... (a threshold in
    # the code wins): its blocks reach the log, /status, /metrics and the table.
    if block_threshold is not None and sv._block_threshold is None:
        sv._block_threshold = block_threshold
    # The supervisor serves the probes itself (before its first service
    # starts): --status-port only says where, over a status_port in the code.
    if status_port is not None:
        sv._probes.port = status_port
    sv._probes.on_bound = lambda url: print(
        f"offloop: status on {url}/status", file=sys.stderr, flush=True
    )
    live = None
    if console is not None:
        from rich.live import Live

        live = Live(
            get_renderable=lambda: render_table(sv),
            console=console,
            refresh_per_second=2,
        )
        live.start()
    try:
        await sv.serve()
    except StatusPortError as exc:
        cause = exc.__cause__
        reason = getattr(cause, "strerror", None) or cause
        flag = "--status-port" if status_port is not None else "status_port in the code"
        raise UsageError(
            f"cannot serve the status on {exc.host}:{exc.port} ({reason}); "
            f"pick another {flag}, or 0 for any free port."
        ) from exc
    finally:
        if live is not None:
            live.stop()


# -- live table ----------------------------------------------------------------------------

_STATE_STYLE: Final = {
    "starting": "yellow",
    "running": "green",
    "restarting": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "failed": "bold red",
    "done": "blue",
}


def render_table(sv: Supervisor) -> Any:
    """A ``rich.table.Table`` of the services (needs the ``[rich]`` extra)."""
    from rich.table import Table

    lag = sv._health.lag()
    caption = None
    if lag["samples"]:
        caption = f"loop lag p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms (last minute)"
    blocks = sv._health.last_blocks()
    if blocks:
        b = blocks[-1]
        caption = (caption + "\n" if caption else "") + (
            f"last block: {b['duration_ms']:.0f} ms at {b['file']}:{b['line']} in {b['function']}"
        )
    table = Table(
        title=f"{sv.name} ({sv.state.value})",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for column in ("service", "state", "restarts", "uptime", "url", "last error"):
        table.add_column(column, justify="right" if column == "restarts" else "left")
    now = time.time()
    for name, st in sv.status().items():
        uptime = ""
        if st.state is ServiceState.RUNNING and st.started_at is not None:
            uptime = f"{now - st.started_at:.0f}s"
        error = st.to_dict()["last_error"] or ""
        style = _STATE_STYLE.get(st.state.value, "")
        notes = []
        if st.restarting_with is not None:  # stopped and started again with a dependency
            notes.append(f"with {st.restarting_with}")
        if st.waiting_for:  # not started (again) before these are ready
            notes.append(f"waiting for {', '.join(st.waiting_for)}")
        state = st.state.value + (f" ({'; '.join(notes)})" if notes else "")
        restarts = str(st.restarts)
        if st.dependency_restarts:
            restarts += f" (+{st.dependency_restarts} with deps)"
        table.add_row(
            name,
            f"[{style}]{state}[/]",
            restarts,
            uptime,
            st.url or "",
            error[:60],
        )
    return table

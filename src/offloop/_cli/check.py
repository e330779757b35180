"""``offloop check script.py [args...]``: run a script and report what blocked its loops.

The script runs in this process as ``__main__`` with its own ``sys.argv``,
exactly as ``python script.py args...`` would run it (including the wait for
its non-daemon threads at the end), while a
:class:`~offloop._detect.hook.LoopWatch` attaches a blocking detector to
every event loop it starts (asyncio or uvloop, in any thread). Afterwards the
blocking sites are printed as a table, or as JSON with ``--json``.

Exit code: 3 if any block exceeded the threshold (so it fails a CI job), 2 for
a bad command line, otherwise the script's own exit code. A script ended by
SIGINT or SIGTERM still gets its report: SIGTERM, which would end the
interpreter on the spot (or which uvicorn raises again as it exits), is turned
into an exception in the script, as Python does with SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import runpy
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any, Final, TextIO

from .._core.forcedexit import on_forced_exit
from .._detect.hook import LoopWatch
from .._detect.report import BlockEvent, BlockSite, SiteTable
from .._detect.thresholds import MAX_THRESHOLD, MIN_THRESHOLD, threshold_out_of_range

__all__ = [
    "BLOCKED_EXIT_CODE",
    "ScriptTerminated",
    "register",
    "render_report",
    "run_script",
    "wait_for_threads",
]

#: Exit code of ``offloop check`` when the event loop blocked.
BLOCKED_EXIT_CODE: Final = 3

#: A MODULE:ATTR target such as ``offloop run`` takes (``app:sv``, ``pkg.app:make``).
_TARGET: Final = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def register(subparsers: Any) -> None:
    """Add the ``check`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="run a script and report the lines that block its event loops",
        description=(
            "Run SCRIPT (as __main__, with ARGS) with a blocking detector on every event loop "
            "it starts, then print the lines that blocked a loop for longer than the threshold. "
            f"Exits with {BLOCKED_EXIT_CODE} if any did, otherwise with the script's exit code."
        ),
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        metavar="S",
        help=(
            "seconds a loop may go without coming back before it counts as blocked, "
            f"from {MIN_THRESHOLD:g} to {MAX_THRESHOLD:g} (default: 0.1)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    parser.add_argument(
        "--stacks", action="store_true", help="print the stack of each site under the table"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="write the report to FILE instead of standard output",
    )
    parser.add_argument("script", metavar="SCRIPT", help="the Python file to run")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script"
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Run the ``check`` subcommand; return the exit code."""
    threshold = args.threshold
    problem = threshold_out_of_range(threshold, "--threshold")
    if problem is not None:
        return _usage(f"{problem}. Pass for example --threshold 0.1 (the default).")
    if not os.path.isfile(args.script):
        if _TARGET.fullmatch(args.script):  # what offloop run takes
            return _usage(
                f"there is no file {args.script!r} (from {os.getcwd()}); offloop check runs "
                f"a Python script. To watch the Supervisor {args.script!r} for blocks, run: "
                f"offloop run {args.script} --detect-blocking"
            )
        return _usage(
            f"there is no file {args.script!r} (from {os.getcwd()}); pass the path of the "
            f"Python script to run."
        )
    problem = None if args.output is None else _unwritable(args.output)
    if problem is not None:
        # Checked before the script runs: its report must not be lost at the end.
        return _usage(
            f"cannot write the report to {args.output!r}: {problem}. Pass the path of a file "
            f"in an existing directory to --output."
        )
    # Resolved now: the script may change directory.
    cwd = os.getcwd()
    script = os.path.abspath(args.script)
    output = None if args.output is None else os.path.abspath(args.output)
    blocks = _Blocks()
    with (
        _TerminateAsException(),
        LoopWatch(threshold=threshold, on_block=blocks.seen) as watch,
        _ReportOnForcedExit(args, watch, blocks, script, cwd, output),
    ):
        code = run_script(args.script, args.args)
        try:
            wait_for_threads()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", file=sys.stderr)
            code = 130
        except ScriptTerminated as exc:
            _say_terminated(exc)
            code = _exit_code(exc.code)
    _flush(sys.stdout)
    sites = [_trim(site, script) for site in watch.report()]
    exit_code = BLOCKED_EXIT_CODE if sites else code
    text = _report_text(args, watch.loops, sites, exit_code, code, cwd)
    error = _save(text, output)
    if error is not None:
        return _usage(
            f"cannot write the report to {args.output!r} ({error.strerror or error}); it was "
            f"printed above instead."
        )
    return exit_code


def _save(text: str, output: str | None) -> OSError | None:
    """Write the report to ``output``, or print it; return why ``output`` could not be written."""
    if output is not None:
        try:
            with open(output, "w", encoding="utf-8") as out:
                out.write(text)
            return None
        except OSError as exc:
            # Checked up front, but the script ran since: keep the report anyway.
            _write(sys.stdout, text)
            return exc
    _write(sys.stdout, text)
    return None


def _report_text(
    args: argparse.Namespace,
    loops: int,
    sites: list[BlockSite],
    exit_code: int,
    script_exit_code: int,
    cwd: str,
) -> str:
    if args.json:
        document = {
            "threshold": args.threshold,
            "loops": loops,
            "blocks": sum(s.count for s in sites),
            # The command's own exit code, as the process exits with it.
            "exit_code": exit_code,
            "script_exit_code": script_exit_code,
            "sites": [s.to_dict() for s in sites],
        }
        return json.dumps(document, indent=2) + "\n"
    return render_report(sites, args.threshold, loops, stacks=args.stacks, start=cwd)


def run_script(path: str, argv: list[str]) -> int:
    """Run ``path`` as ``__main__`` with ``sys.argv = [path, *argv]``; return its exit code.

    Like the interpreter: the script's directory comes first on ``sys.path``,
    an uncaught exception prints its traceback and gives 1, ``SystemExit``
    gives its code, Ctrl-C gives 130.
    """
    target = os.path.abspath(path)  # before the script can change directory
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(target))
    try:
        runpy.run_path(target, run_name="__main__")
    except ScriptTerminated as exc:
        _say_terminated(exc)
        return _exit_code(exc.code)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", file=sys.stderr)
        return 130
    except BaseException as exc:
        _print_script_traceback(exc, target)
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


class ScriptTerminated(SystemExit):
    """SIGTERM reached the script under ``offloop check``: it ends with ``128 + SIGTERM``.

    A ``SystemExit``, so the script's ``finally`` blocks run and asyncio lets it
    through at once, as it does ``KeyboardInterrupt`` for SIGINT.
    """


class _TerminateAsException:
    """While active, the first SIGTERM raises :class:`ScriptTerminated` in the main thread.

    Left alone when SIGTERM is ignored (the parent meant it) or handled by
    someone else already, and not installed outside the main thread. A second
    SIGTERM ends the process at once, as the user then means it.
    """

    def __init__(self) -> None:
        self._installed = False

    def __enter__(self) -> _TerminateAsException:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise ScriptTerminated(128 + signum)


def _say_terminated(exc: ScriptTerminated) -> None:
    # The interpreter prints "Terminated" through the shell; say it here, since
    # this process goes on to print the report.
    print(f"offloop check: the script was ended by SIGTERM (exit code {exc.code})", file=sys.stderr)


#: Seconds wait_for_threads() waits before it says which threads it waits for.
THREAD_NOTICE_AFTER: Final = 2.0


def wait_for_threads() -> None:
    """Wait for every non-daemon thread, as the interpreter does before it exits.

    The script is not over when its module returns: a loop may still run in
    one of its threads. First the callbacks registered for this moment run
    (they tell idle ``concurrent.futures`` workers to exit, which would
    otherwise be waited for forever), then the threads are joined, again if
    they started new ones.
    """
    for callback in reversed(list(getattr(threading, "_threading_atexits", ()))):
        try:
            callback()
        except Exception:
            traceback.print_exc()
    me = threading.current_thread()
    told = False
    while True:
        alive = [t for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]
        if not alive:
            return
        for thread in alive:
            thread.join(None if told else THREAD_NOTICE_AFTER)
            if thread.is_alive() and not told:
                # A wait that looks like a hang must say what it waits for.
                told = True
                names = ", ".join(repr(t.name) for t in alive if t.is_alive())
                print(
                    f"offloop check: the script has returned; waiting for its thread(s) {names} "
                    f"to end, as Python would. Ctrl-C stops the wait and prints the report.",
                    file=sys.stderr,
                    flush=True,
                )


def render_report(
    sites: list[BlockSite],
    threshold: float,
    loops: int,
    *,
    stacks: bool = False,
    start: str | None = None,
) -> str:
    """The human-readable report: a table of sites, most total time first.

    Paths are shown relative to ``start`` (default: the current directory)
    when they are under it.
    """
    limit = f"{threshold * 1e3:g} ms"
    if not sites:
        clean = (
            f"offloop check: no event loop blocked for more than {limit} "
            f"({loops} event loop(s) watched).\n"
        )
        if loops:
            return clean
        # Nothing ran on a loop: most likely a module written for 'offloop run'.
        return clean + (
            "The script started no event loop, so there was nothing to watch. If it only "
            "defines a Supervisor for 'offloop run app:sv', check that with "
            "'offloop run app:sv --detect-blocking', or call sv.run() under "
            "'if __name__ == \"__main__\":'.\n"
        )
    blocks = sum(s.count for s in sites)
    where = [f"{_short(s.file, start)}:{s.line}" for s in sites]
    width = max(len("path:line"), *(len(w) for w in where))
    fn_width = max(len("function"), *(len(s.function) for s in sites))
    lines = [
        f"offloop check: {blocks} block(s) over {limit} at {len(sites)} site(s) "
        f"({loops} event loop(s) watched):",
        "",
        f"{'path:line':<{width}}  {'function':<{fn_width}}  {'count':>5}  "
        f"{'total ms':>9}  {'max ms':>9}",
    ]
    for site, at in zip(sites, where, strict=True):
        lines.append(
            f"{at:<{width}}  {site.function:<{fn_width}}  {site.count:>5}  "
            f"{site.total_ms:>9.1f}  {site.max_ms:>9.1f}"
        )
    if stacks:
        for site, at in zip(sites, where, strict=True):
            lines += ["", f"Stack of the longest block at {at} (most recent call last):"]
            lines += [f"  {entry}" for entry in site.stack]
    else:
        lines += ["", "Run with --stacks to see each site's stack, or --json for everything."]
    return "\n".join(lines) + "\n"


def _trim(site: BlockSite, script: str) -> BlockSite:
    # Frames above the script's first one are offloop check's and runpy's own.
    for n, entry in enumerate(site.stack):
        if entry.startswith(f"{script}:"):
            return dataclasses.replace(site, stack=site.stack[n:])
    return site


class _Blocks:
    """The watch's ``on_block``: says when a loop looks stuck, and keeps the blocks under way.

    A block enters the watch's report when its loop comes back. A supervised
    program whose loop never does is ended by the supervisor's forced exit
    (``os._exit``), so the report written then adds the blocks still under way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By monitor thread: each watched loop has its own.
        self._under_way: dict[int, tuple[BlockEvent, float]] = {}

    def seen(self, event: BlockEvent) -> None:
        with self._lock:
            if event.ongoing:
                self._under_way[threading.get_ident()] = (event, time.monotonic())
            else:
                self._under_way.pop(threading.get_ident(), None)
        if event.ongoing:
            # A script whose loop never comes back would otherwise show nothing
            # until it is interrupted: say where it is stuck as soon as it is clear.
            print(f"offloop check: {event}", file=sys.stderr, flush=True)

    def sites_with_those_under_way(self, watch: LoopWatch) -> list[BlockSite]:
        table = SiteTable()
        for event in watch.events:
            table.add(event)
        now = time.monotonic()
        with self._lock:
            under_way = list(self._under_way.values())
        for event, noticed in under_way:
            lasted = event.duration_ms + (now - noticed) * 1e3
            table.add(dataclasses.replace(event, duration_ms=lasted, ongoing=False))
        return table.report()


#: Seconds a forced exit waits for the report: a full stdout pipe must not keep
#: the process alive, which is what the forced exit is for.
FORCED_REPORT_WAIT: Final = 0.5


class _ReportOnForcedExit:
    """While active, a forced exit of the script's supervisor writes the report first.

    It then exits with 3 if the report has blocks, as after a script that ended.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        watch: LoopWatch,
        blocks: _Blocks,
        script: str,
        cwd: str,
        output: str | None,
    ) -> None:
        self._args, self._watch, self._blocks = args, watch, blocks
        self._script, self._cwd, self._output = script, cwd, output
        self._active = False
        # The code the process is to exit with, once the report knows it.
        self._exit_code: int | None = None

    def __enter__(self) -> _ReportOnForcedExit:
        self._active = True
        on_forced_exit(self._on_forced_exit)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active = False

    def _on_forced_exit(self, forced: int) -> int | None:
        if not self._active:
            return None
        # On a thread of its own: the hook may run in a signal handler on the
        # main thread, and writing may block; the forced exit waits a bounded time.
        writer = threading.Thread(
            target=self._write, args=(forced,), name="offloop-check-report", daemon=True
        )
        writer.start()
        writer.join(FORCED_REPORT_WAIT)
        return self._exit_code  # known before the writing began, even if it blocks

    def _write(self, forced: int) -> None:
        sites = [
            _trim(site, self._script)
            for site in self._blocks.sites_with_those_under_way(self._watch)
        ]
        exit_code = self._exit_code = BLOCKED_EXIT_CODE if sites else forced
        text = _report_text(self._args, self._watch.loops, sites, exit_code, forced, self._cwd)
        print(
            f"offloop check: the script's supervisor could not stop it gracefully and forced "
            f"it to exit (code {forced}); the report counts the blocks still under way.",
            file=sys.stderr,
            flush=True,
        )
        _save(text, self._output)  # printed if it cannot be written, as after a script that ended


def _short(path: str, start: str | None) -> str:
    try:
        rel = os.path.relpath(path, start)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith(os.pardir) else rel


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_script_traceback(exc: BaseException, target: str) -> None:
    # Show the traceback from the script's first frame on, as `python script.py` would.
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != target:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)


def _unwritable(path: str) -> str | None:
    """Why the report cannot be written to ``path``, or None if it looks writable."""
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"there is no directory {folder!r}"
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            return "the file is not writable"
    elif not os.access(folder, os.W_OK | os.X_OK):
        return f"the directory {folder!r} is not writable"
    return None


def _usage(message: str) -> int:
    print(f"offloop check: error: {message}", file=sys.stderr)
    return 2


def _flush(stream: TextIO | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _write(stream: TextIO | None, text: str) -> None:
    # A script run with its standard output closed (`>&-`: sys.stdout is
    # None) or piped into a reader that went away still gets its exit code,
    # and the report goes to stderr rather than nowhere.
    for target in (stream, sys.stderr):
        if target is None:
            continue
        try:
            target.write(text)
            target.flush()
            return
        except (OSError, ValueError):  # a broken pipe, a closed file
            continue

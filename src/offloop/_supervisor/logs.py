"""Logging for ``sv.run()`` and ``offloop run``: plain lines, or one JSON object per line.

:func:`configure_logging` gives the root logger a handler on stderr unless
the application has configured logging itself (the root logger has a
handler): a script that calls ``sv.run()`` sees what its services do without
writing a ``logging.basicConfig`` first, and one that did keeps its own.

:class:`JsonFormatter` writes each record as one JSON object on one line, for
log collectors. The records offloop itself writes for service state
changes, restarts, crashes, blocks of the loop and abandoned calls get an
``event`` field and their parts as fields (``service``, ``state``,
``delay``, ...), read from :data:`EVENTS`: the format strings those log calls
use, so that no log call has to change shape to be machine-readable. A test
checks that each of them is still in offloop's source.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import traceback
from typing import Any, Final, Literal, TextIO

__all__ = ["EVENTS", "LOG_FORMAT", "JsonFormatter", "LogFormat", "configure_logging"]

LogFormat = Literal["text", "json"]

#: The line format of text logs (the CLI's and ``sv.run()``'s).
LOG_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: offloop's log calls worth a machine-readable shape: format string -> (event,
#: the names of its arguments, fixed fields).
EVENTS: Final[dict[str, tuple[str, tuple[str, ...], dict[str, str]]]] = {
    "%s: starting %d service(s)": ("supervisor", ("supervisor", "services"), {"state": "starting"}),
    "%s: all %d service(s) ready": ("supervisor", ("supervisor", "services"), {"state": "running"}),
    "%s: stopping (%s), grace %gs": (
        "supervisor",
        ("supervisor", "reason", "grace"),
        {"state": "stopping"},
    ),
    "%s: stopped": ("supervisor", ("supervisor",), {"state": "stopped"}),
    "%s: starting service %r": ("service", ("supervisor", "service"), {"state": "starting"}),
    "%s: service %r is ready": ("service", ("supervisor", "service"), {"state": "running"}),
    "%s: one-shot service %r is running": (
        "service",
        ("supervisor", "service"),
        {"state": "running"},
    ),
    "%s: one-shot service %r is done": ("service", ("supervisor", "service"), {"state": "done"}),
    "%s: stopping service %r": ("service", ("supervisor", "service"), {"state": "stopping"}),
    "%s: service %r stopped": ("service", ("supervisor", "service"), {"state": "stopped"}),
    "%s: service %r returned; it is stopped": (
        "service",
        ("supervisor", "service"),
        {"state": "stopped"},
    ),
    "%s: service %r crashed: %r": ("crash", ("supervisor", "service", "error"), {}),
    "%s: service %r: a run crashed with %r; the service stops once its %d other run(s) end": (
        "run_crash",
        ("supervisor", "service", "error", "running"),
        {},
    ),
    "%s: service %r failed to start: %r": (
        "crash",
        ("supervisor", "service", "error"),
        {"phase": "start"},
    ),
    "%s: restarting service %r in %.2fs (restart #%d)": (
        "restart",
        ("supervisor", "service", "delay", "restart"),
        {},
    ),
    "%s: stopping service %r while its dependency %r restarts": (
        "cascade",
        ("supervisor", "service", "dependency"),
        {"state": "stopping"},
    ),
    "%s: starting service %r again now that its dependency %r is ready": (
        "cascade",
        ("supervisor", "service", "dependency"),
        {"state": "starting"},
    ),
    "%s: service %r waits for its dependency %r to be ready again": (
        "cascade",
        ("supervisor", "service", "dependency"),
        {"state": "waiting"},
    ),
    "%s: service %r abandoned %s": ("abandoned", ("supervisor", "service", "what"), {}),
    "%s: abandoned task %s, which ignores cancellation": (
        "abandoned",
        ("supervisor", "task"),
        {},
    ),
    "%s: service %r: its abandoned %s ended later with %r": (
        "abandoned",
        ("supervisor", "service", "what", "error"),
        {"state": "ended"},
    ),
    "%s: service %r: its abandoned %s ended later: %s": (
        "abandoned",
        ("supervisor", "service", "what", "outcome"),
        {"state": "ended"},
    ),
    "offloop: %s in thread %s of pool %r is still running %s and was abandoned; "
    "it cannot be stopped from outside. Poll offloop.current_token() in long "
    "functions so they can stop when asked.": (
        "abandoned",
        ("call", "thread", "pool", "when"),
        {},
    ),
    "%s: service %r missed %d run(s) of %s (the program was blocked or asleep)%s": (
        "missed",
        ("supervisor", "service", "missed", "schedule", "note"),
        {},
    ),
    "%s: service %r missed at least %d run(s) of %s (the program was blocked or "
    "asleep; the count stops there)%s": (
        "missed",
        ("supervisor", "service", "missed", "schedule", "note"),
        {"count": "at least"},
    ),
    "%s: service %r: a run of %s came due while the last one was still running "
    "(for %.1fs); %s. The job is slower than its schedule: this is said again only "
    "after a run starts on time (the count is in the status: schedule.overlapped)": (
        "overlap",
        ("supervisor", "service", "schedule", "running", "outcome"),
        {},
    ),
    "%s: service %r: the clock was set back by %.0fs; the next run of %s comes "
    "in %.0fs, at its due time by the clock as it reads now": (
        "clock_set_back",
        ("supervisor", "service", "seconds", "schedule", "next_in"),
        {},
    ),
}

#: The attribute a record carries its structured fields in (``extra={...}``).
FIELDS_ATTR: Final = "offloop_fields"


def _plain(value: object) -> object:
    """``value`` if JSON writes it as itself, else its ``repr``."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and more.

    offloop's own events add ``event`` and their fields (see :data:`EVENTS`);
    a record logged with ``extra={"offloop_fields": {...}}`` adds those; an
    exception adds ``exc_info`` (its traceback, as text).
    """

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        known = EVENTS.get(record.msg) if isinstance(record.msg, str) else None
        args = record.args if isinstance(record.args, tuple) else ()
        if known is not None and len(args) == len(known[1]):
            event, names, fixed = known
            out["event"] = event
            out.update(fixed)
            out.update({name: _plain(arg) for name, arg in zip(names, args, strict=True)})
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            out.update({str(k): _plain(v) for k, v in fields.items()})
        if record.exc_info and record.exc_info[1] is not None:
            out["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, ensure_ascii=False)


def make_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler on ``stream`` (stderr by default) writing ``log_format`` lines."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    return handler


def check_log_format(log_format: object, where: str) -> LogFormat:
    """``log_format`` as a :data:`LogFormat`, or a ValueError naming the choices."""
    if log_format == "text" or log_format == "json":
        return log_format
    raise ValueError(
        f"{where} needs log_format to be 'text' (lines for people) or 'json' (one JSON "
        f"object per line, for log collectors), got {log_format!r}."
    )


def configure_logging(log_format: LogFormat = "text", level: int | str = logging.INFO) -> bool:
    """Log to stderr in ``log_format`` unless the application configured logging already.

    Returns:
        Whether a handler was added (False: the root logger had one, so the
        application's configuration is left as it is).
    """
    root = logging.getLogger()
    if root.handlers:
        return False
    root.setLevel(level)
    root.addHandler(make_handler(log_format))
    return True

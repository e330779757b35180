"""A supervisor's own probes: ``Supervisor(status_port=...)`` serves the status server.

The server (:mod:`.statusserver`) is opened at the very start of the run,
before any service starts, so ``/healthz`` answers while the services start
and ``/readyz`` says 503 until every one is ready; it is closed at the end of
the shutdown, after the last service stopped. Because the supervisor opens it
itself, every way of running one serves it: ``async with``, ``serve()``,
``run()`` and ``start()`` / ``aclose()`` in a host such as FastAPI.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Final

from .._core.errors import StatusPortError
from .._core.validate import describe
from .statusserver import StatusServer
from .view import SupervisorView

__all__ = ["Probes", "check_status_host", "check_status_port"]

logger: Final = logging.getLogger("offloop.supervisor")

#: Where the probes listen unless told otherwise: loopback, because /status and
#: /metrics describe the program's internals and must not reach the network unasked.
DEFAULT_HOST: Final = "127.0.0.1"


def check_status_port(port: object) -> int | None:
    """``status_port`` as given, once checked: None, or an int from 0 to 65535.

    Raises:
        TypeError: not an int (a bool is refused too).
        ValueError: out of range.
    """
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(
            f"status_port must be an int from 0 to 65535 (0: any free port) or None, "
            f"got {describe(port)}."
        )
    if not 0 <= port <= 65535:
        raise ValueError(
            f"status_port must be from 0 to 65535, got {port}; pass 0 for any free port."
        )
    return port


def check_status_host(host: object) -> str:
    """``status_host`` as given, once checked: an IP address literal.

    A host name (even ``localhost``) is refused rather than looked up: it
    may resolve to several addresses, and asyncio then binds port 0 to a
    different free port on each, so one ``status_url`` could not name them.

    Raises:
        TypeError: not a str.
        ValueError: not an IP address.
    """
    if not isinstance(host, str):
        raise TypeError(f"status_host must be a str such as '127.0.0.1', got {describe(host)}.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"status_host must be an IP address, got {host!r}: pass '127.0.0.1' "
            f"(this machine only, the default) or '0.0.0.0' (every interface, "
            f"e.g. for a Kubernetes probe, which comes from outside the pod)."
        ) from None
    return host


class Probes:
    """The probes a supervisor serves itself: where, and the server while it is open."""

    def __init__(self, port: object, host: object) -> None:
        self.port = check_status_port(port)
        self.host = check_status_host(host)
        self.server: StatusServer | None = None
        self._url: str | None = None
        #: Called with the base URL once bound (``offloop run`` prints it).
        self.on_bound: Callable[[str], None] | None = None

    @property
    def url(self) -> str | None:
        """The base URL while serving (``http://127.0.0.1:8081``), else None."""
        return self._url

    async def open(self, sv: SupervisorView) -> None:
        """Listen, if a port was given; nothing has started yet.

        Raises:
            StatusPortError: the port cannot be bound.
        """
        if self.port is None:
            return
        if self.server is not None:
            raise RuntimeError(f"The probes of {sv!r} are already being served.")
        server = StatusServer(sv)
        # Set first: a second start while this one binds is refused above.
        self.server = server
        try:
            await server.start(self.port, host=self.host)
        except OSError as exc:
            self.server = None
            raise StatusPortError(
                f"{sv!r} cannot serve its probes on {self.host}:{self.port} "
                f"({exc.strerror or exc}); nothing was started. Pass another "
                f"status_port, or 0 for any free port (then read sv.status_url).",
                errno=exc.errno,
                host=self.host,
                port=self.port,
            ) from exc
        except BaseException:
            self.server = None
            await server.aclose()
            raise
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._url = url = f"http://{host}:{server.port}"
        logger.info(
            "%s: probes on %s (/healthz /readyz /status /metrics)", getattr(sv, "name", sv), url
        )
        if self.on_bound is not None:
            self.on_bound(url)

    async def close(self) -> None:
        """Stop listening and end the open connections (see ``StatusServer.aclose``)."""
        server, self.server, self._url = self.server, None, None
        if server is not None:
            await server.aclose()

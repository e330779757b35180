"""What the service adapters (WSGI, aiohttp, ASGI, watch) share besides their lifecycle.

The lifecycle itself is :class:`~offloop._services.lifecycle.LifecycleService`.
Here: the argument checks every adapter makes the same way, and
:class:`NetworkAdapter`, the base of the servers, which binds its listening
socket itself: the bind error then comes from offloop with a message that
names the service and the fix, instead of a ``sys.exit(1)`` from deep inside a
server (werkzeug and uvicorn both do that).
"""

from __future__ import annotations

import inspect
import socket
from typing import Any, Final

from .._core.validate import describe
from .base import Service
from .lifecycle import LifecycleService, LifecycleState

__all__ = [
    "NetworkAdapter",
    "check_app_signature",
    "check_host_port",
    "check_name",
    "listen_socket",
    "other_adapter_hint",
]

#: The listen backlog of every adapter's socket (werkzeug's and uvicorn's default).
BACKLOG: Final = 128


def check_name(name: object, default: str, where: str) -> str:
    """The service name: ``name`` if given, else ``default``.

    Raises:
        TypeError: ``name`` is neither ``None`` nor a non-empty str.
    """
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}(name=...) must be a non-empty str, got {describe(name)}.")
    return name


def check_app_signature(app: Any, arguments: str, counts: tuple[int, ...], where: str) -> None:
    """Refuse an app that cannot be called with any of its protocol's argument ``counts``.

    Most often an app factory (``create_app``) passed instead of the app it
    builds, which would otherwise fail every request with a 500.

    Raises:
        TypeError: saying to pass what the factory returns.
    """
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):  # no signature to read (a builtin): trust it
        return
    for count in counts:
        try:
            signature.bind(*range(count))
        except TypeError:
            continue
        return
    hint = other_adapter_hint(app, where) or (
        f"If it is an app factory, pass the app it returns: {where}(create_app())."
    )
    raise TypeError(
        f"{where}(app) needs an application called as app({arguments}), but "
        f"{describe(app)} cannot take those arguments. {hint}"
    )


#: The adapter for an app of a framework, by the top-level package of its
#: class (or of a base class): the usual mix-up is an app handed to the
#: adapter of another protocol. Only frameworks whose apps speak one protocol:
#: Django and Falcon make WSGI and ASGI apps alike, so their package says
#: nothing about the adapter.
_ADAPTERS: Final = {
    "aiohttp": "AiohttpService",
    "flask": "WSGIService",
    "bottle": "WSGIService",
    "pyramid": "WSGIService",
    "starlette": "ASGIService",
    "fastapi": "ASGIService",
    "quart": "ASGIService",
    "litestar": "ASGIService",
}


def other_adapter_hint(app: Any, where: str) -> str:
    """The sentence naming the adapter ``app``'s framework needs, if not ``where``; else ""."""
    for cls in type(app).__mro__:
        adapter = _ADAPTERS.get(cls.__module__.partition(".")[0])
        if adapter is not None:
            if adapter == where:
                return ""
            return (
                f"It looks like an app for offloop.{adapter}: supervise it with "
                f"offloop.{adapter}(app) instead."
            )
    return ""


def check_host_port(host: object, port: object, where: str) -> tuple[str, int]:
    """Validate the address a network adapter listens on.

    Raises:
        TypeError: ``host`` is not a str or ``port`` is not an int.
        ValueError: ``host`` is empty or ``port`` is outside 0..65535.
    """
    if not isinstance(host, str):
        raise TypeError(
            f"{where}(host=...) must be a str such as '127.0.0.1', got {describe(host)}."
        )
    if not host:
        raise ValueError(f"{where}(host=...) must not be empty; use '127.0.0.1' or '0.0.0.0'.")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # '[::1]', as written in URLs
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # 'fe80::1%eth0'
        except OSError:
            # 'localhost:8000' and the like: a port written into the host.
            raise ValueError(
                f"{where}(host=...) must be a host name or an IP address without a port, got "
                f"{host!r}; pass the port separately, e.g. host='127.0.0.1', port=8000."
            ) from None
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{where}(port=...) must be an int, got {describe(port)}.")
    if not 0 <= port <= 65535:
        raise ValueError(
            f"{where}(port=...) must be between 0 and 65535 (0 picks any free port), got {port}."
        )
    return host, port


def listen_socket(host: str, port: int, service: Service) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening.

    Raises:
        OSError: the address cannot be bound (in use, not a local address);
            the message names the service and what to do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        hint = (
            " Stop the program using it, pick another port, or pass port=0 for any free one."
            if port
            else ""
        )
        # socket.create_server() appends "(while attempting to bind on address
        # (host, port))" to strerror: the address is named once, as host:port.
        why = (exc.strerror or str(exc)).partition(" (while attempting to bind")[0]
        raise OSError(
            exc.errno, f"{service!r} cannot listen on {_host_port(host, port)}: {why}.{hint}"
        ) from exc


def _host_port(host: str, port: int) -> str:
    # IPv6 addresses are bracketed, so the port stays readable: [::1]:8000.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NetworkAdapter(LifecycleService):
    """An adapter that listens on ``host:port``: the bound port and the URL."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name)
        self.host = host
        self._requested_port = port
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The port the service listens on: the bound one once started (so ``port=0`` works)."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port``, with the bound port once started."""
        return f"http://{_host_port(self.host, self.port)}"

    def _listen(self) -> socket.socket:
        """Bind a fresh listening socket for a run.

        With ``port=0``, a restart binds the port of the previous run again, so
        the URL stays the same; if that port was taken meanwhile, any free one.
        """
        if self._requested_port == 0 and self._bound_port is not None:
            try:
                return listen_socket(self.host, self._bound_port, self)
            except OSError:
                pass
        return listen_socket(self.host, self._requested_port, self)

    def _where(self) -> str:
        if self._state in (LifecycleState.RUNNING, LifecycleState.STOPPING):
            return f"url={self.url}"
        return _host_port(self.host, self.port)

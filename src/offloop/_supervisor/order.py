"""Start order: the ``depends_on`` of each service, checked and sorted before anything starts.

A service may name services added after it, so the names are only checked
when the supervisor starts, all at once: an unknown name or a cycle is refused
with :class:`ValueError` before the first service starts (and before the
supervisor changes state, so the mistake can be fixed and the supervisor
entered again).

The order is a topological sort that keeps the order of registration wherever
the dependencies allow it, so a supervisor without ``depends_on`` starts its
services exactly in the order they were added. The supervisor starts them one
after the other, each once the one before is ready, so every service starts
after its dependencies are ready; it stops them in the reverse order, so a
service stops before what it depends on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from .._core.validate import describe

__all__ = [
    "DependencyRestart",
    "check_depends_on",
    "check_on_dependency_restart",
    "check_oneshot",
    "start_order",
]

#: What a service does when a service it depends on is restarted by its policy:
#: ``"restart"`` (stop before it, start again once it is ready) or ``"keep"`` running.
DependencyRestart = Literal["restart", "keep"]


def check_depends_on(depends_on: object, service: str | None) -> tuple[str, ...]:
    """``depends_on`` as a tuple of names; raise before any side effect if it is not one.

    Raises:
        TypeError: not a list (or tuple, set) of service names.
        ValueError: an empty name, or a service depending on itself.
    """
    what = f"the service {service!r}" if service else "a service"
    if isinstance(depends_on, str) or not isinstance(depends_on, Iterable):
        hint = f" (depends_on=[{depends_on!r}])" if isinstance(depends_on, str) else ""
        raise TypeError(
            f"depends_on of {what} must be a list of service names{hint}, "
            f"got {describe(depends_on)}."
        )
    names: list[str] = []
    for name in depends_on:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"depends_on of {what} must hold the names (non-empty str) of other services, "
                f"got {describe(name)}; pass the service's name, e.g. depends_on=['db']."
            )
        if name == service:
            raise ValueError(f"The service {service!r} cannot depend on itself (depends_on).")
        if name not in names:
            names.append(name)
    return tuple(names)


def check_oneshot(oneshot: object, restart: str, service: str) -> bool:
    """``oneshot`` as a bool; refuse it with ``restart="always"``, which would rerun it forever.

    Raises:
        TypeError: ``oneshot`` is not a bool.
        ValueError: ``oneshot=True`` with ``restart="always"``.
    """
    if not isinstance(oneshot, bool):
        raise TypeError(f"oneshot must be True or False, got {describe(oneshot)}.")
    if oneshot and restart == "always":
        raise ValueError(
            f"The one-shot service {service!r} cannot have restart='always', which would run "
            f"it again each time it is done; use restart='on-failure' or 'no'."
        )
    return oneshot


def check_on_dependency_restart(value: object, service: str | None) -> DependencyRestart:
    """``on_dependency_restart`` as a :data:`DependencyRestart`, or an error naming the choices.

    Raises:
        ValueError: neither ``"restart"`` nor ``"keep"``.
    """
    if value == "restart" or value == "keep":
        return value
    what = f"the service {service!r}" if service else "a service"
    raise ValueError(
        f"on_dependency_restart of {what} must be 'restart' (stop it while "
        f"a service it depends on restarts, and start it again after) or 'keep' (leave it "
        f"running: it only needs its dependencies at start), got {describe(value)}."
    )


def start_order(depends_on: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The names of ``depends_on`` (in registration order) sorted so dependencies come first.

    Raises:
        ValueError: a name that no service has, or a cycle (the message shows it).
    """
    for name, deps in depends_on.items():
        unknown = [d for d in deps if d not in depends_on]
        if unknown:
            known = ", ".join(map(repr, depends_on)) or "none"
            raise ValueError(
                f"The service {name!r} depends on {', '.join(map(repr, unknown))}, which no "
                f"service of this supervisor is named (its services: {known}). Add that "
                f"service, or fix the name in depends_on."
            )
    order: list[str] = []
    placed: set[str] = set()
    # Depth-first from each service in registration order: a service is placed
    # right after the last of its dependencies, so without depends_on the
    # order is the registration order.
    for root in depends_on:
        _place(root, depends_on, order, placed, [])
    return order


def _place(
    name: str,
    depends_on: Mapping[str, tuple[str, ...]],
    order: list[str],
    placed: set[str],
    path: list[str],
) -> None:
    if name in placed:
        return
    if name in path:
        cycle = [*path[path.index(name) :], name]
        raise ValueError(
            f"The services depend on each other in a cycle: {' -> '.join(cycle)}. "
            f"No start order can satisfy it; remove one of these depends_on."
        )
    path.append(name)
    for dep in depends_on[name]:
        _place(dep, depends_on, order, placed, path)
    path.pop()
    placed.add(name)
    order.append(name)

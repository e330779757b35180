"""Restarting dependents with their dependency (``on_dependency_restart``).

When the restart policy restarts a service, the services that depend on it,
directly or through others, are stopped in reverse start order before it
restarts, and started again in start order once it is ready, each once its
own dependencies are ready, as at start. That is systemd's ``PartOf=`` /
``BindsTo=`` (a restart of the unit is propagated to the units bound to it)
rather than ``Wants=``; a dependent added with
``on_dependency_restart="keep"`` is left running (it needed its dependency at
start only), and the cascade does not go through it.

Such a restart is the dependency's, not the dependent's: it is counted in
``ServiceStatus.dependency_restarts``, not in ``restarts`` nor against the
dependent's restart budget. One-shot services that are already ``done``, and
services that ended for good (``stopped``), are not run again, and the cascade
does not go through them.

A dependent held by several restarting dependencies starts again once the last
of them is ready. The stops run in a task of their own, which the restarting
service's runner waits for: a shutdown that begins meanwhile waits for the
stop under way (it began earlier, with the same grace, so it ends first) and
the cascade stops there; the starts still to come are dropped.

A service whose runner has not begun is none of the cascade's (nothing of it
runs to stop): the runner waits in :meth:`Cascade.before_start` until its
dependencies are ready again, which matters while the supervisor starts.
A service waiting for its dependencies, there or before the cascade starts it
again, names them in ``ServiceStatus.waiting_for``.

A service whose backoff is infinite is *parked* once it crashed: it sleeps
until the supervisor stops. While the supervisor starts, a start waiting for
it (directly, or through a dependent it holds down) would wait for ever, so
the start fails instead (:meth:`Cascade.parked_behind`, from
``Supervisor._check_start``). After the start, its dependents stay stopped
until the supervisor stops, as it does: both are logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine, Mapping
from typing import Any, Final, Protocol

from .status import ServiceState
from .supervised import LAST_CHANCE, Supervised

__all__ = ["Cascade", "CascadeHost", "parked_message"]

logger: Final = logging.getLogger("offloop.supervisor")

_ST = ServiceState
#: States of a service that will not run again by itself: the cascade leaves them be.
_ENDED: Final = (_ST.STOPPED, _ST.FAILED, _ST.DONE)


class CascadeHost(Protocol):
    """The supervisor, as the cascade sees it."""

    name: str
    grace: float
    _entries: dict[str, Supervised]

    def _shutting_down(self) -> bool: ...

    def _check_start(self) -> None: ...

    def _runner_done(self, runner: asyncio.Task[None]) -> None: ...


class Cascade:
    """The restarts of dependents with their dependency, for one supervisor."""

    def __init__(self, host: CascadeHost) -> None:
        self._host = host
        # The task starting the dependents of each dependency that is ready again.
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def dependents(self, root: Supervised) -> list[Supervised]:
        """The services to stop while ``root`` restarts, in start order."""
        entries: Mapping[str, Supervised] = self._host._entries
        found: set[str] = set()
        frontier = [root.name]
        while frontier:
            name = frontier.pop()
            for e in entries.values():
                if (
                    name in e.depends_on
                    and e.name not in found
                    and e.on_dependency_restart == "restart"
                    and e.runner is not None  # not started yet: it starts after root anyway
                    and e.state not in _ENDED
                ):
                    found.add(e.name)
                    frontier.append(e.name)
        return [e for e in entries.values() if e.name in found]

    async def stop_dependents(self, root: Supervised) -> None:
        """Stop what depends on ``root`` (which is about to restart), last started first."""
        root.renew_ready()  # its dependents wait for it to be ready again
        chain = self._chains.pop(root.name, None)
        if chain is not None:  # still starting them after its last restart
            chain.cancel()
            await asyncio.wait({chain})
        targets = self.dependents(root)
        if not targets:
            return
        for e in targets:
            # Pending at once, not only once its stop ends: a service not
            # begun yet (none of the cascade's) that depends on one waits.
            e.renew_ready()
        task = self._spawn(self._stop_all(root, targets), f"offloop-cascade-stop-{root.name}")
        # Not cancelled with the runner: a shutdown waits for the stop under way.
        await asyncio.wait({task})

    async def _stop_all(self, root: Supervised, targets: list[Supervised]) -> None:
        host = self._host
        deadline = asyncio.get_running_loop().time() + host.grace
        for e in reversed(targets):
            if host._shutting_down():
                return  # the shutdown stops the rest
            e.held.add(root.name)
            if e.state is _ST.RESTARTING and (e.runner is None or e.runner.done()):
                continue  # held already, by another dependency's restart
            if e.restarting_with is None:
                e.restarting_with = root.name
            logger.info(
                "%s: stopping service %r while its dependency %r restarts",
                host.name,
                e.name,
                root.name,
            )
            await e.stop(deadline, hold=root.name)

    def ready_again(self, root: Supervised) -> None:
        """``root`` is ready: start what its restart held, in start order."""
        host = self._host
        released = [e for e in host._entries.values() if root.name in e.held]
        for e in released:
            e.held.discard(root.name)
        todo = [e for e in released if not e.held]
        if todo and not host._shutting_down():
            self._chains[root.name] = self._spawn(
                self._start_all(root, todo), f"offloop-cascade-start-{root.name}"
            )

    async def before_start(self, e: Supervised, shutdown: asyncio.Future[None]) -> None:
        """Return once each dependency of ``e`` is ready (again), or the shutdown began.

        ``e``'s runner is made once they are ready, but one may have been
        restarted by its policy (or stopped by another's restart) before the
        runner begins: ``e``, not started yet, is none of the cascade's.
        """
        await self._await_dependencies(e, shutdown, log=True)

    async def _await_dependencies(
        self, e: Supervised, shutdown: asyncio.Future[None] | None, *, log: bool
    ) -> None:
        """Wait until each dependency of ``e`` is ready (again), or the shutdown began.

        ``e.waiting_for`` names the ones not ready meanwhile. ``shutdown``: a
        future done once the shutdown began (``None`` for a task that the
        shutdown cancels). ``log``: log each dependency waited for, once (the
        cascade's own starts say why they wait already).
        """
        host = self._host
        deps = [host._entries[d] for d in e.depends_on]
        told: set[str] = set()
        try:
            while not host._shutting_down():
                waits = _pending(deps)
                e.waiting_for = tuple(waits)
                if not waits:
                    return
                for name in (waits.keys() - told) if log else ():
                    logger.info(
                        "%s: service %r waits for its dependency %r to be ready again",
                        host.name,
                        e.name,
                        name,
                    )
                told.update(waits)
                # A dependency parked for good fails a start that waits for e.
                host._check_start()
                if host._shutting_down():
                    return
                wakes = set(waits.values()) if shutdown is None else {shutdown, *waits.values()}
                await asyncio.wait(wakes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            e.waiting_for = ()

    async def _start_all(self, root: Supervised, todo: list[Supervised]) -> None:
        host = self._host
        loop = asyncio.get_running_loop()
        for e in todo:
            # As at start: once each of its dependencies is ready (again).
            await self._await_dependencies(e, None, log=False)
            if host._shutting_down():
                return
            if e.held or e.state is not _ST.RESTARTING or not (e.runner is None or e.runner.done()):
                continue  # held again, or started by another dependency's restart
            logger.info(
                "%s: starting service %r again now that its dependency %r is ready",
                host.name,
                e.name,
                root.name,
            )
            e.dependency_restarts += 1
            e.stopping = False
            e.renew_ready()
            e.runner = loop.create_task(e.supervise(), name=f"offloop-supervise-{e.name}")
            e.runner.add_done_callback(host._runner_done)

    def parked_behind(self, e: Supervised) -> list[Supervised] | None:
        """The path from ``e`` to a parked service that keeps it from being ready, if any.

        ``[e, dependency, ..., parked]`` (``[e]`` if ``e`` is parked itself),
        through the dependencies whose restart holds ``e`` stopped and those
        it waits for: both are its dependencies, so the walk ends.
        """
        if e.parked:
            return [e]
        for name in (*e.held, *e.waiting_for):
            path = self.parked_behind(self._host._entries[name])
            if path is not None:
                return [e, *path]
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_starts(self) -> None:
        """The shutdown begins: start nothing more."""
        for chain in self._chains.values():
            chain.cancel()
        self._chains.clear()

    async def close(self) -> None:
        """Wait for the cascade's tasks to end; the shutdown already stopped their services."""
        self.cancel_starts()
        if self._tasks:
            # A stop task left has only its last service's stop to finish, which
            # the shutdown waited for (or gave up on): a last chance is plenty.
            await asyncio.wait(set(self._tasks), timeout=LAST_CHANCE)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))


def parked_message(path: list[Supervised]) -> str:
    """Why the start fails: ``path`` (from :meth:`Cascade.parked_behind`) ends parked."""
    waiter, parked = path[0], path[-1]
    error = parked.parked_after
    if error is None:  # only restart="always" restarts a run that returned
        ended = "returned (restart='always') during the supervisor's start and is not started again"
    else:
        ended = f"crashed ({error!r}) during the supervisor's start and never restarts"
    if math.isinf(parked.policy.backoff):
        why, setting = "its backoff is infinite", "backoff"
    else:
        # A finite backoff doubles past the largest float (RestartPolicy.delay)
        # only under an infinite max_backoff, which is then what to change.
        why, setting = "its backoff/max_backoff make its restart delay infinite", "max_backoff"
    how = f"{ended}, because {why}."
    if len(path) == 1:
        return (
            f"Service {waiter.name!r} cannot start: it {how} Give it a finite {setting} "
            f"so that it restarts."
        )
    drop = f"drop the dependency on {parked.name!r}"
    if parked.name in waiter.depends_on:
        whose = f"its dependency {parked.name!r}"
        drop = f"drop {parked.name!r} from the depends_on of {waiter.name!r}"
    elif len(path) == 2:  # held stopped by the restart of a dependency of its dependencies
        whose = f"it depends on {parked.name!r} through its dependencies, and {parked.name!r}"
    else:
        whose = f"its dependency {path[1].name!r} waits for {parked.name!r}, which"
    return (
        f"Service {waiter.name!r} cannot start: {whose} {how} Give {parked.name!r} "
        f"a finite {setting}, or {drop}."
    )


def _pending(deps: list[Supervised]) -> dict[str, asyncio.Future[None]]:
    """The ``ready`` futures, by name, of those of ``deps`` that are not ready (again) yet."""
    return {d.name: d.ready for d in deps if d.ready is not None and not d.ready.done()}

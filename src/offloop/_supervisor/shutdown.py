"""The Supervisor's shutdown: one task that stops every service within ``grace``.

It stops the services in reverse start order against one shared deadline,
gives those left when the time is up one last chance together, then closes
what the supervisor runs beside them (the cascade, the blocking detector, the
loop's health check, the probes). Whoever asks for the stop gets that task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from .._core.errors import ServiceFailed
from .cascade import Cascade
from .embed import Embedding
from .health import LoopHealth
from .owner import LoopEndWatch
from .probes import Probes
from .status import ServiceState, SupervisorState
from .supervised import SERVICE_OF, SHUTDOWN_OVERRUN, Supervised

if TYPE_CHECKING:
    from .._detect.detector import BlockingDetector

__all__ = ["Shutdown"]

logger: Final = logging.getLogger("offloop.supervisor")

_SV = SupervisorState


class Shutdown:
    """The shutdown of :class:`~offloop.Supervisor` (set up in its ``__init__``)."""

    name: str
    grace: float
    _state: SupervisorState
    _loop: asyncio.AbstractEventLoop | None
    _entries: dict[str, Supervised]
    _shutdown_requested: asyncio.Future[None] | None
    _shutdown_task: asyncio.Task[None] | None
    _stop_deadline: float | None
    _failure: ServiceFailed | None
    _detector: BlockingDetector | None
    _health: LoopHealth
    _probes: Probes
    _embed: Embedding
    _loop_end: LoopEndWatch
    _cascade: Cascade

    def _request_shutdown(self, reason: str) -> asyncio.Task[None]:
        if self._shutdown_task is None:
            loop = self._loop
            assert loop is not None
            assert self._shutdown_requested is not None
            if self._state is not _SV.STOPPED:
                self._state = _SV.STOPPING
                self._embed.changed()
            logger.info("%s: stopping (%s), grace %gs", self.name, reason, self.grace)
            self._shutdown_task = loop.create_task(
                self._shutdown(), name=f"offloop-shutdown-{self.name}"
            )
            self._shutdown_requested.set_result(None)
        return self._shutdown_task

    async def _finish_shutdown(self, task: asyncio.Task[None]) -> None:
        # The shutdown is bounded by grace, so waiting it out even when we are
        # cancelled keeps "no service outlives the supervisor" true. Except in
        # one of its own services' code, which the shutdown cancelled to stop
        # it: waiting there, it would wait for itself until grace ran out.
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._own_service() is None:
                await asyncio.wait({task})
            raise
        await self._loop_end.wait_done()

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        self._stop_deadline = deadline + SHUTDOWN_OVERRUN
        self._cascade.cancel_starts()
        left = list(reversed(self._entries.values()))
        kills = {e.name: e.kills for e in left}
        while left and loop.time() < deadline:
            await left.pop(0).stop(deadline)
        if left:
            # The grace period is used up: the rest get their last chance side by
            # side, so the overrun is one LAST_CHANCE, not one per service.
            now = loop.time()
            await asyncio.gather(*(e.stop(now) for e in left))
        await self._cascade.close()
        if self._detector is not None:
            # Joins the monitor thread, which only sleeps between heartbeats:
            # it wakes on the stop request, so the loop waits a moment at most.
            self._detector.stop()
        self._health.stop()
        await self._probes.close()
        self._state = _SV.FAILED if self._failure is not None else _SV.STOPPED
        self._embed.changed()
        killed = [e.name for e in self._entries.values() if e.kills > kills.get(e.name, 0)]
        if killed:
            # One line an operator can find: the stop was not clean, though
            # every service is stopped now (their lines above say how).
            logger.warning(
                "%s: stopped, but %d service(s) did not stop politely and were killed: %s. "
                "See the lines above for what each was doing; make them stop on their "
                "stop token or cancellation, or raise grace.",
                self.name,
                len(killed),
                ", ".join(repr(name) for name in killed),
            )
        else:
            logger.info("%s: stopped", self.name)

    def _own_service(self, *, starting: bool = False) -> str | None:
        """The name of this supervisor's service whose code calls (see SERVICE_OF), if any.

        With ``starting``, only one that is still starting (not ready yet):
        one the supervisor's start waits for.
        """
        entry = SERVICE_OF.get()
        if entry is None or self._entries.get(entry.name) is not entry:
            return None
        if starting and entry.state is not ServiceState.STARTING:
            return None
        return entry.name

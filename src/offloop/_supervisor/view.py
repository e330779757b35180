"""What the probes and the metrics read of a supervisor.

``statusserver.py`` and ``metrics.py`` describe a running supervisor, and
``supervisor.py`` opens the status server when it starts: typing them against
this protocol instead of the ``Supervisor`` class keeps the modules free of a
cycle (the import rule checks type-only imports too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._detect.detector import BlockingDetector
    from .health import LoopHealth
    from .status import ServiceStatus, SupervisorState

__all__ = ["SupervisorView"]


class SupervisorView(Protocol):
    """The parts of a :class:`~offloop.Supervisor` its probes and metrics read."""

    name: str
    _health: LoopHealth

    @property
    def state(self) -> SupervisorState: ...

    @property
    def detector(self) -> BlockingDetector | None: ...

    def status(self) -> dict[str, ServiceStatus]: ...

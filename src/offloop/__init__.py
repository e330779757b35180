"""offloop: run blocking code beside your asyncio event loop, without stalling it.

The four quadrants of mixing blocking and async code, one call each:

=====================  ================================================
sync code in a loop    ``await offloop.to_thread(fn, *args)`` / ``ThreadPool``
async code from sync   ``offloop.from_thread(async_fn, *args)``
blocking coroutine     ``await offloop.to_loop(async_fn, *args)`` / ``LoopThread``
CPU-bound sync code    ``await offloop.to_process(fn, *args)`` / ``ProcessPool``
=====================  ================================================

Long-lived blocking parts (a Flask server, a file watcher, a ``while True``
loop) run as services under a :class:`Supervisor`.
"""

from __future__ import annotations

from ._aiohttp_service import AiohttpService
from ._asgi import ASGIService
from ._dask import DaskPool
from ._detector import (
    BlockEvent,
    BlockingDetector,
    BlockSite,
    DetectorState,
    detect_blocking,
)
from ._errors import (
    CallerGoneError,
    LoopBlockedError,
    MissingExtraError,
    NotPicklableError,
    OffloopError,
    PoolClosedError,
    ServiceFailed,
    WorkerCrashed,
    WouldDeadlockError,
)
from ._fromthread import from_thread
from ._iterate import ThreadedIterator, iterate, threaded
from ._loopthread import LoopThread, LoopThreadState
from ._offload import OffloadFuture
from ._processpool import ProcessPool, to_process
from ._service import Service
from ._sharedloop import to_loop
from ._status import ServiceState, ServiceStatus, SupervisorState
from ._supervisor import Supervisor
from ._threadpool import ThreadPool
from ._token import StopToken, current_token
from ._tothread import to_thread
from ._watch import WatchService
from ._wsgi import WSGIService

__version__ = "0.1.0"

__all__ = [
    "ASGIService",
    "AiohttpService",
    "BlockEvent",
    "BlockSite",
    "BlockingDetector",
    "CallerGoneError",
    "DaskPool",
    "DetectorState",
    "LoopBlockedError",
    "LoopThread",
    "LoopThreadState",
    "MissingExtraError",
    "NotPicklableError",
    "OffloadFuture",
    "OffloopError",
    "PoolClosedError",
    "ProcessPool",
    "Service",
    "ServiceFailed",
    "ServiceState",
    "ServiceStatus",
    "StopToken",
    "Supervisor",
    "SupervisorState",
    "ThreadPool",
    "ThreadedIterator",
    "WSGIService",
    "WatchService",
    "WorkerCrashed",
    "WouldDeadlockError",
    "__version__",
    "current_token",
    "detect_blocking",
    "from_thread",
    "iterate",
    "threaded",
    "to_loop",
    "to_process",
    "to_thread",
]


def _fix_module_names() -> None:
    # Show the public path (offloop.ThreadPool) in reprs, tracebacks and docs,
    # not the private module that happens to define the name.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("offloop._"):
            obj.__module__ = "offloop"


_fix_module_names()

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

from ._core.errors import (
    CallerGoneError,
    LoopBlockedError,
    MissingExtraError,
    NotPicklableError,
    OffloopError,
    PoolClosedError,
    PoolConnectionError,
    ServiceFailed,
    StartTimeout,
    StatusPortError,
    WorkerCrashed,
    WouldDeadlockError,
)
from ._core.offload import OffloadFuture
from ._core.poolexecutor import PoolExecutorView
from ._core.token import StopToken, current_token
from ._detect.detector import (
    BlockEvent,
    BlockingDetector,
    BlockSite,
    DetectorState,
    detect_blocking,
)
from ._loops.context import BoundContext, BoundContextState
from ._loops.fromthread import from_thread
from ._loops.loopthread import LoopThread, LoopThreadState
from ._loops.loopthread import use_default_executor as _use_default_executor
from ._loops.portal import Portal, from_thread_sync
from ._loops.shared import to_loop
from ._loops.target import set_from_thread_loop
from ._loops.tasks import TaskHandle, task_ready
from ._process.dask import DaskPool
from ._process.pool import ProcessPool
from ._process.toprocess import default_process_pool, to_process
from ._services.aiohttp_app import AiohttpService
from ._services.asgi import ASGIService
from ._services.base import Service
from ._services.plan import ScheduleStatus
from ._services.watch import WatchService
from ._services.wsgi import WSGIService
from ._supervisor.lifespan import lifespan
from ._supervisor.pools import pools
from ._supervisor.status import ServiceState, ServiceStatus, SupervisorState
from ._supervisor.supervisor import Supervisor
from ._threads.executor import loop_thread_executor as _loop_thread_executor
from ._threads.iterate import ThreadedIterator, iterate, threaded
from ._threads.pool import ThreadPool
from ._threads.tothread import default_thread_pool, to_thread

# A loop thread's default executor is an offloop thread pool's (daemon
# threads, which interpreter exit does not wait for). _loops may not import
# _threads, so the one module that sees both wires them.
_use_default_executor(_loop_thread_executor)

__version__ = "0.1.0"

__all__ = [
    "ASGIService",
    "AiohttpService",
    "BlockEvent",
    "BlockSite",
    "BlockingDetector",
    "BoundContext",
    "BoundContextState",
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
    "PoolConnectionError",
    "PoolExecutorView",
    "Portal",
    "ProcessPool",
    "ScheduleStatus",
    "Service",
    "ServiceFailed",
    "ServiceState",
    "ServiceStatus",
    "StartTimeout",
    "StatusPortError",
    "StopToken",
    "Supervisor",
    "SupervisorState",
    "TaskHandle",
    "ThreadPool",
    "ThreadedIterator",
    "WSGIService",
    "WatchService",
    "WorkerCrashed",
    "WouldDeadlockError",
    "__version__",
    "current_token",
    "default_process_pool",
    "default_thread_pool",
    "detect_blocking",
    "from_thread",
    "from_thread_sync",
    "iterate",
    "lifespan",
    "pools",
    "set_from_thread_loop",
    "task_ready",
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

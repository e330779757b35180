"""``offloop.lifespan(sv)``: a Supervisor as the lifespan of a Starlette or FastAPI app.

The lifespan runs in a task of the ASGI server, and cancelling that task does
not stop the server (uvicorn logs the error and keeps serving). What stops
uvicorn, hypercorn and a gunicorn worker gracefully is SIGTERM, so that is
the default failure action here: the server stops accepting, ends its
lifespan (where ``aclose()`` raises the failure) and exits. uvicorn raises
the SIGTERM again once it has stopped, so the process ends killed by SIGTERM
(exit status 143 in a shell, -15 from ``subprocess``): not zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Final

from .._core.errors import ServiceFailed
from .._core.validate import describe

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["lifespan"]

logger: Final = logging.getLogger("offloop.supervisor")


def lifespan(sv: Supervisor, /) -> Callable[[object], AbstractAsyncContextManager[None]]:
    """A Starlette/FastAPI lifespan that runs ``sv`` beside the app: ``FastAPI(lifespan=...)``.

    The app's startup waits until every service is ready (a service that
    fails to start fails the startup, and uvicorn exits with status 3); its
    shutdown stops them within ``sv.grace`` seconds. When a service fails
    beyond its restart policy while the app serves, the process gets SIGTERM,
    the graceful stop of uvicorn, hypercorn and gunicorn, unless ``sv`` was
    given ``on_failure``. uvicorn then stops, its shutdown logs the
    :class:`~offloop.ServiceFailed`, and the process exits killed by SIGTERM.

    To do more in the lifespan, enter this one inside yours:
    ``async with offloop.lifespan(sv)(app): yield``.

    Raises:
        TypeError: ``sv`` is not a :class:`~offloop.Supervisor`.
    """
    from .supervisor import Supervisor

    if not isinstance(sv, Supervisor):
        raise TypeError(
            f"offloop.lifespan() takes the offloop.Supervisor to run, got {describe(sv)}. "
            f"Pass what it returns as the app's lifespan: FastAPI(lifespan=offloop.lifespan(sv))."
        )

    @contextlib.asynccontextmanager
    async def run(app: object) -> AsyncIterator[None]:
        sv._embed.host_stop = _terminate
        await sv.start()
        try:
            yield
        finally:
            await sv.aclose()

    return run


def _terminate(failure: ServiceFailed) -> None:
    logger.error(
        "offloop.lifespan: sending SIGTERM to this process (pid %d) so that the ASGI server "
        "stops: %s",
        os.getpid(),
        failure,
    )
    os.kill(os.getpid(), signal.SIGTERM)

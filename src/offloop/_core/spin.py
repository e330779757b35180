"""Giving the CPU and the GIL away while polling for a hand-over.

Every hand-over between threads (a worker taking its next call, a caller
waiting for a loop thread's reply, a loop thread polling after a wake-up)
polls briefly before it sleeps: a thread that is still polling when the other
side answers takes the answer without paying for a wake-up. Each turn of such
a poll calls :func:`yield_cpu`, so the other side gets the CPU and the GIL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Final

__all__ = ["yield_cpu"]

#: Give up the CPU (and with it the GIL) for one scheduling turn.
yield_cpu: Final[Callable[[], object]] = getattr(os, "sched_yield", lambda: time.sleep(0))

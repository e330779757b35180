"""How many CPUs this process may run on: the default size of the pools."""

from __future__ import annotations

import os

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), else the machine's CPU count.

    A container or ``taskset`` limited to fewer CPUs than the machine has
    gets its own figure, as ``os.process_cpu_count()`` (Python 3.13) gives.
    """
    if hasattr(os, "sched_getaffinity"):  # Linux and some other POSIX systems
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1

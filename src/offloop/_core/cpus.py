"""How many CPUs this process may run on: the default size of the pools."""

from __future__ import annotations

import os

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """The CPUs this process may run on, else the machine's CPU count.

    ``os.process_cpu_count()`` where it exists (Python 3.13: it honours
    ``PYTHON_CPU_COUNT`` and ``-X cpu_count``), else the process's CPU
    affinity, else ``os.cpu_count()``. A CPU set (``taskset``, docker's
    ``--cpuset-cpus``) limits it; a CPU quota (docker's ``--cpus``, a
    Kubernetes CPU limit) does not, as for the standard library's pools.
    """
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return max(1, process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):  # Linux and some other POSIX systems
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1

"""What the machine lets this process use: the cores for its worker processes and threads.

A container's cpuset shows in the process's CPU affinity, but its CPU quota (``docker run
--cpus``, a Kubernetes CPU limit) does not: on a 64-core node a container limited to 2 cores
would otherwise start a decoder, a report builder and an ONNX Runtime thread per node core.
"""

from __future__ import annotations

import math
import os

#: cgroup v2's CPU quota of this process's cgroup.
CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cgroup_cpu_limit(path: str = CPU_MAX) -> int | None:
    """Whole cores a cgroup v2 CPU quota allows (a container's ``--cpus``), or None if unlimited.

    ``cpu.max`` holds "<quota> <period>" in microseconds, or "max <period>".
    """
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (a container's cpuset), capped by a cgroup
    CPU quota, so that no pool starts more workers than it will get time for."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores

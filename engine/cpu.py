"""Physical CPU cores available to this process, without psutil (30 ms of import on the GUI thread).

Hyper-threads share one core's execution units, so torch's convolutions run no faster with one
thread per logical CPU (engine.ai.models.devices). Linux: the distinct sibling sets
(``/sys/devices/system/cpu/cpuN/topology/core_cpus_list``, ``thread_siblings_list`` before
Linux 5.7) of the CPUs this process may run on (sched_getaffinity: containers and taskset
narrow it). Elsewhere, or when sysfs is not readable: psutil, then the logical count.
"""
from __future__ import annotations

import os

SYSFS_CPU = "/sys/devices/system/cpu"


def _sibling_sets(cpus: set[int]) -> set[str] | None:
    cores: set[str] = set()
    for n in cpus:
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                with open(f"{SYSFS_CPU}/cpu{n}/topology/{name}") as fh:
                    cores.add(fh.read().strip())
                break
            except OSError:
                continue
        else:
            return None
    return cores


def physical_cores() -> int:
    """At least 1."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set()
    if cpus:
        cores = _sibling_sets(cpus)
        if cores:
            return len(cores)
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        n = None
    return max(1, int(n or len(cpus) or os.cpu_count() or 1))

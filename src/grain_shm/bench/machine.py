"""Where and with what a run was measured: figures mean nothing without it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Dict, List, Optional, TypedDict

from grain_shm import names


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class MachineInfo(TypedDict):
    hostname: str
    platform: str
    cpu: str
    cpus: Optional[int]
    cpus_usable: Optional[int]
    memory_bytes: int
    dev_shm_bytes: int
    load_average_at_start: List[float]


def info() -> MachineInfo:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "dev_shm_bytes": (names.shm_space() or (0, 0))[0],
        "load_average_at_start": list(os.getloadavg()),
    }


def versions() -> Dict[str, Optional[str]]:
    """Python's version and each package's; None for a package not installed."""
    found: Dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for package in ("grain_shm", "numpy", "grain", "SharedArray", "faster-fifo", "iceoryx2",
                    "matplotlib"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    if found["grain_shm"] is None:  # run from a source tree, not installed
        import grain_shm

        found["grain_shm"] = grain_shm.__version__
    return found


def headline(machine: MachineInfo, versions: Dict[str, Optional[str]], started: str) -> str:
    """One line naming the machine and the date, for the top of a report."""
    return (
        f"{started[:16].replace('T', ' ')} UTC · {machine['cpu']} "
        f"({machine['cpus_usable'] or machine['cpus']} CPUs) · {machine['platform']} · "
        f"Python {versions['python']} · numpy {versions['numpy']} · "
        f"grain_shm {versions['grain_shm']} · load average at start "
        f"{machine['load_average_at_start'][0]:.2f}"
    )

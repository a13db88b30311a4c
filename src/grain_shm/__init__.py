"""grain_shm: NumPy arrays between processes through POSIX shared memory.

A C-accelerated drop-in replacement for Grain's `grain.multiprocessing`.
"""

import sys as _sys

if not hasattr(_sys, "getwindowsversion"):
    from grain_shm import session as _session  # noqa: F401  (names, exit cleanup)
else:  # pragma: no cover
    raise ImportError(
        "grain_shm needs POSIX shared memory (shm_open/mmap); Windows is not supported"
    )

from typing import TYPE_CHECKING as _TYPE_CHECKING

from grain_shm.array import SharedMemoryArray, SharedMemoryArrayMetadata
from grain_shm.grain_patch import patch_grain
from grain_shm.options import MultiprocessingOptions
from grain_shm.tree import copy_to_shm, open_from_shm, unlink_shm

if _TYPE_CHECKING:
    from grain_shm.prefetch import Prefetcher, prefetch
    from grain_shm.queue import Queue

_LAZY = {"prefetch": "grain_shm.prefetch", "Prefetcher": "grain_shm.prefetch",
         "Queue": "grain_shm.queue"}


def __getattr__(name: str) -> object:
    """`prefetch`, `Prefetcher` and `Queue`, imported on first use: they
    need multiprocessing, logging or threading, which `import grain_shm`
    must not pay for (see benchmarks/fixed_costs.py)."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # Importing the submodule bound its name here: the function wins.
        globals().update({n: getattr(module, n) for n, m in _LAZY.items() if m == _LAZY[name]})
        return globals()[name]
    raise AttributeError(f"module 'grain_shm' has no attribute {name!r}")

__all__ = [
    "MultiprocessingOptions",
    "Prefetcher",
    "Queue",
    "SharedMemoryArray",
    "SharedMemoryArrayMetadata",
    "copy_to_shm",
    "open_from_shm",
    "patch_grain",
    "prefetch",
    "unlink_shm",
]
__version__ = "0.1.0"

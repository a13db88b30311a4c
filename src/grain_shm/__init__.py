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

from grain_shm.array import SharedMemoryArray, SharedMemoryArrayMetadata
from grain_shm.grain_patch import patch_grain
from grain_shm.options import MultiprocessingOptions
from grain_shm.prefetch import Prefetcher, prefetch
from grain_shm.tree import copy_to_shm, open_from_shm, unlink_shm

__all__ = [
    "MultiprocessingOptions",
    "Prefetcher",
    "SharedMemoryArray",
    "SharedMemoryArrayMetadata",
    "copy_to_shm",
    "open_from_shm",
    "patch_grain",
    "prefetch",
    "unlink_shm",
]
__version__ = "0.1.0"

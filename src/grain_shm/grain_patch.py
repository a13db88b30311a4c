"""Grain's own pipelines on grain_shm: patch_grain() and its start-up hook.

Grain's DataLoader, `mp_prefetch` and batching look its array API up on one
module at call time (`shared_memory_array.SharedMemoryArray(...)`,
`.copy_to_shm(...)`), so putting grain_shm's names on that module, and on
the modules that re-export them (`grain.multiprocessing`, `grain.python`),
moves a whole Grain pipeline onto grain_shm. Grain's workers are spawned
interpreters: the `grain_shm.pth` file installed beside the package runs
patch_grain() at their start-up when GRAIN_SHM_PATCH_GRAIN is set (to
anything but "" or "0"), which they inherit. Without the variable the .pth
line costs one environment lookup and imports nothing.

Patched, a process takes its new arrays from the pool of recycled memory
(unless GRAIN_SHM_RECYCLE is set, then as it says: "0" keeps fresh
segments): Grain makes, sends and releases its arrays and never looks one
up by name, so a pool block is a fresh segment to it, but for speed.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

GRAIN_MODULE = "grain._src.python.ipc.shared_memory_array"
NAMES = ("SharedMemoryArray", "SharedMemoryArrayMetadata", "copy_to_shm", "open_from_shm",
         "unlink_shm")
ENV = "GRAIN_SHM_PATCH_GRAIN"


def patch_grain() -> None:
    """Make Grain use grain_shm's arrays, in this process and the ones it starts.

    Patches Grain now if it is imported, else the moment it is; and sets
    GRAIN_SHM_PATCH_GRAIN=1 in the environment, so that Grain's workers
    (spawned afterwards) patch themselves at start-up. Grain's own
    `MultiprocessingOptions` stays: it is the same dataclass. Patched
    processes pool their arrays unless GRAIN_SHM_RECYCLE is set (to "0":
    fresh segments).
    """
    os.environ[ENV] = "1"
    module = sys.modules.get(GRAIN_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _patch(module: ModuleType) -> None:
    import grain_shm
    from grain_shm import _shm
    from grain_shm.array import recycling_chosen

    if not recycling_chosen() and not _shm.pool_stats()["max_bytes"]:
        grain_shm.SharedMemoryArray.enable_recycling()  # the default bound

    originals = {name: getattr(module, name) for name in NAMES}
    for name, original in originals.items():
        ours = getattr(grain_shm, name)
        for other in list(sys.modules.values()):
            if getattr(other, "__name__", "").partition(".")[0] == "grain" and (
                getattr(other, name, None) is original
            ):
                setattr(other, name, ours)


class _PatchOnImport:
    """A meta path finder that patches Grain's array module once it has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != GRAIN_MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        sys.meta_path.remove(self)
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch  # this module's loader only
        return spec

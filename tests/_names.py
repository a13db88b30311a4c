"""Whether an array's name is still there, in both modes of the suite.

The suite runs twice in CI: as is, and with GRAIN_SHM_RECYCLE=1 (the pool
on). An array of its own has a file in /dev/shm; a pool block shares its
arena's file with other arrays, so for a block the pool's accounting says
whether its "name" is still linked. Child interpreters import this too
(run_python puts tests/ on their path).
"""

import os

from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, _shm

from grain_shm.names import SHM_DIR
RECYCLING = os.environ.get("GRAIN_SHM_RECYCLE", "").strip() not in ("", "0")


def metadata_of(ref):
    return ref if isinstance(ref, SharedMemoryArrayMetadata) else ref.metadata


def exists(ref):
    """`ref`: an array, or its metadata (a bare name means a file)."""
    if isinstance(ref, str):
        return os.path.exists(os.path.join(SHM_DIR, ref))
    md = metadata_of(ref)
    if md.block is None:
        return os.path.exists(os.path.join(SHM_DIR, md.name))
    try:
        state = _shm.block_state(md.name, *md.block)
    except FileNotFoundError:  # the arena itself is gone
        return False
    return state is not None and state[0]


def references(ref):
    """How many mappings a pool block has (None: not a block, or reused)."""
    md = metadata_of(ref)
    if md.block is None:
        return None
    state = _shm.block_state(md.name, *md.block)
    return None if state is None else state[1]


__all__ = ["RECYCLING", "SHM_DIR", "SharedMemoryArray", "exists", "metadata_of", "references"]

"""Put grain_shm in place of Grain's shared-memory arrays, in every process.

Python imports `sitecustomize` when any interpreter starts, so a test that
puts this directory on PYTHONPATH patches its own process and every process
that inherits the environment: Grain's mp_prefetch (also behind DataLoader)
starts its workers with the "spawn" method, fresh interpreters that run this
before they unpickle their target or dataset. The same holds for fork and
forkserver, which copy a process that already ran it.

Grain looks the names up on the module at call time
(`shared_memory_array.SharedMemoryArray(...)`, `.copy_to_shm(...)`), so
replacing the module's attributes is enough.

Grain's module keeps its own `shared_memory` (the stdlib module) for its
original classes; it is replaced by a tripwire, so any Grain code path that
still reached Grain's implementation fails loudly, in whichever process.
"""

import grain_shm
from grain._src.python.ipc import shared_memory_array as _grain_shm_module

NAMES = (
    "SharedMemoryArray",
    "SharedMemoryArrayMetadata",
    "copy_to_shm",
    "open_from_shm",
    "unlink_shm",
)


class _Tripwire:
    def __getattr__(self, name):
        raise AssertionError(
            f"Grain's own shared_memory.{name} was used although grain_shm "
            "was put in place of grain._src.python.ipc.shared_memory_array"
        )


for _name in NAMES:
    setattr(_grain_shm_module, _name, getattr(grain_shm, _name))
_grain_shm_module.shared_memory = _Tripwire()

"""patch_grain(): every place Grain's array API is reachable from holds
grain_shm's, whether Grain was imported before the call or after it."""

import pytest

pytest.importorskip("grain", reason="patch_grain patches Grain: pip install 'grain_shm[compare]'")

from conftest import run_python  # noqa: E402

CHECK = """
import logging, os, sys
logging.disable(logging.WARNING)
import grain_shm
{before}
import grain, grain.python, grain.multiprocessing
{after}
from grain._src.python.ipc import shared_memory_array as m
assert m.SharedMemoryArray is grain_shm.SharedMemoryArray
assert m.SharedMemoryArrayMetadata is grain_shm.SharedMemoryArrayMetadata
assert m.copy_to_shm is grain_shm.copy_to_shm and m.open_from_shm is grain_shm.open_from_shm
assert m.unlink_shm is grain_shm.unlink_shm
assert grain.multiprocessing.SharedMemoryArray is grain_shm.SharedMemoryArray
assert grain.python.SharedMemoryArray is grain_shm.SharedMemoryArray
assert os.environ["GRAIN_SHM_PATCH_GRAIN"] == "1"  # for the workers it starts
print("patched")
"""


@pytest.mark.parametrize("when", ["before grain is imported", "after grain is imported"])
def test_patch_grain_reaches_every_reexport(when):
    call = "grain_shm.patch_grain()"
    code = CHECK.format(before=call if when.startswith("before") else "",
                        after=call if when.startswith("after") else "")
    proc = run_python(code, env={"GRAIN_SHM_PATCH_GRAIN": "0"})
    assert proc.stdout.strip() == "patched"

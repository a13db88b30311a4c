"""Bad input gets a clear exception and leaves /dev/shm exactly as it was."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_shm_room, own_entries, run_python

from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata
from grain_shm.names import SHM_DIR

BIG = np.iinfo(np.int64).max


@pytest.mark.parametrize("shape", [(-1,), (3, -2), [-5]])
def test_negative_dims(shape):
    with pytest.raises(ValueError, match="negative"):
        SharedMemoryArray(shape, np.int32)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((2**62, 4), np.int64),          # bytes overflow int64
        ((2**32, 2**32), np.uint8),      # product wraps int64 to 0
        ((2**32, 2**32, 3), np.uint8),   # product wraps to a small positive
        ((2**70,), np.uint8),            # a dim beyond int64
        ((BIG,), np.int16),
    ],
)
def test_overflowing_shapes(shape, dtype):
    before = own_entries()
    with pytest.raises((OverflowError, ValueError)) as info:
        SharedMemoryArray(shape, dtype)
    assert isinstance(info.value, OverflowError) and isinstance(info.value, ValueError)
    assert own_entries() == before


@pytest.mark.parametrize("shape", [(1.5,), ("3",), (None,), 2.0])
def test_non_integer_shapes(shape):
    with pytest.raises(TypeError):
        SharedMemoryArray(shape, np.int32)


OBJECT_DTYPES = [object, [("x", np.int32), ("o", object)]]
if hasattr(np.dtypes, "StringDType"):  # numpy >= 2: strings kept on the heap
    OBJECT_DTYPES.append(np.dtypes.StringDType())


@pytest.mark.parametrize("dtype", OBJECT_DTYPES, ids=str)
def test_dtypes_holding_python_objects(dtype):
    before = own_entries()
    with pytest.raises(TypeError, match="objects"):
        SharedMemoryArray((3,), dtype)
    assert own_entries() == before


def test_missing_name():
    with pytest.raises(FileNotFoundError) as info:
        SharedMemoryArray.from_metadata(
            SharedMemoryArrayMetadata("gs_definitely_not_there", (1,), np.uint8)
        )
    assert info.value.filename == "gs_definitely_not_there"


@needs_shm_room(256 << 20)  # /dev/shm has the room; the address space does not
def test_out_of_address_space_is_not_blamed_on_dev_shm():
    run_python(
        """
        import resource, numpy as np, pytest
        from grain_shm import SharedMemoryArray
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        limit = size + (64 << 20)  # room for 64 MiB more of address space
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with pytest.raises(MemoryError) as info:
            SharedMemoryArray((256 << 20,), np.uint8)
        assert "address space" in str(info.value), info.value
        assert "--shm-size" not in str(info.value)
        """
    )


@pytest.mark.parametrize(
    "name", ["", "/", "a/b", "a\0b", "x" * 300, ".", ".."], ids=repr
)
def test_invalid_names(name):
    md = SharedMemoryArrayMetadata(name, (1,), np.uint8)
    with pytest.raises(ValueError, match="name"):
        SharedMemoryArray.from_metadata(md)
    with pytest.raises(ValueError, match="name"):
        md.close_and_unlink_shm()


def test_metadata_larger_than_segment_is_an_error_not_a_sigbus():
    # In a child: if the check were missing, touching the tail would SIGBUS.
    run_python(
        """
        import numpy as np, pytest
        from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata
        arr = SharedMemoryArray((100,), np.uint8)
        arr.unlink_on_del()
        # Offsets from where the array starts: 0 for a segment of its own,
        # its block's place in the arena with the pool on.
        name, at, block = arr.metadata.name, arr.metadata.offset, arr.metadata.block
        cases = [
            SharedMemoryArrayMetadata(name, (101,), np.uint8, None, at, block),
            SharedMemoryArrayMetadata(name, (4096 * 4,), np.float64, None, at, block),
            SharedMemoryArrayMetadata(name, (10,), np.uint8, None, at + 95, block),
            SharedMemoryArrayMetadata(name, (10,), np.uint8, (20,), at, block),
            SharedMemoryArrayMetadata(name, (10,), np.uint8, (-1,), at + 5, block),
        ]
        for md in cases:
            with pytest.raises(ValueError):
                SharedMemoryArray.from_metadata(md)
        # The largest geometry that does fit still works.
        ok = SharedMemoryArray.from_metadata(
            SharedMemoryArrayMetadata(name, (10,), np.uint8, (-10,), at + 99, block))
        ok[0] = 1
        assert arr[99] == 1
        """
    )


def test_short_segment_made_elsewhere(fresh_segments):
    # A segment truncated behind our back (e.g. by another library).
    arr = SharedMemoryArray((4096,), np.uint8)
    arr.unlink_on_del()
    md = arr.metadata
    os.truncate(os.path.join(SHM_DIR, md.name), 10)
    with pytest.raises(ValueError, match="metadata"):
        SharedMemoryArray.from_metadata(md)


def _can_unshare():
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
    )
    return probe.returncode == 0


needs_small_shm = pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare --mount` and tmpfs mounts (root)"
)


def run_with_small_shm(code, size="16m"):
    """Run `code` in a child whose /dev/shm is its own `size` tmpfs."""
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec \"$0\" -c \"$1\""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, code],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        pytest.fail(f"child failed ({how}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@needs_small_shm
def test_releases_pending_on_the_deleter_do_not_make_a_full_dev_shm():
    """Dropped arrays whose release waits for the deleter still hold their
    pages: a creation that finds /dev/shm full finishes those first, so
    enable_async_del never fails where inline release would succeed."""
    out = run_with_small_shm(
        """
import os, numpy as np
from grain_shm import SharedMemoryArray, _shm
SharedMemoryArray.enable_async_del(num_threads=1, max_outstanding_requests=50)
_shm._hold_async_release(True)  # the worker takes nothing: the releases stay pending
for _ in range(12):
    a = SharedMemoryArray((1 << 20,), np.uint8)
    a[:] = 1
    a.unlink_on_del()
    del a
assert _shm.async_release_stats()["queued"] == 12
big = SharedMemoryArray((8 << 20,), np.uint8)  # 12 + 8 MiB > 16 MiB: room only once flushed
big[:] = 2
big.unlink_on_del()
stats = _shm.async_release_stats()
assert stats["queued"] == 0 and stats["in_flight"] == 0, stats
del big
_shm._hold_async_release(False)
SharedMemoryArray._disable_async_del()
print(len([n for n in os.listdir("/dev/shm") if not n.startswith("sem.")]))
""")
    assert out.split()[-1] == "0"


@needs_small_shm
def test_full_dev_shm_is_a_memory_error_naming_the_fix():
    out = run_with_small_shm(
        """
import os, numpy as np, pytest
from grain_shm import SharedMemoryArray
with pytest.raises(MemoryError) as info:
    SharedMemoryArray((32 << 20,), np.uint8)
message = str(info.value)
assert "/dev/shm" in message and "16777216 bytes free" in message, message
assert "--shm-size" in message, message
assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")

# Fill it up with arrays that fit, touching every page: never a SIGBUS.
kept = []
with pytest.raises(MemoryError):
    for _ in range(100):
        arr = SharedMemoryArray((3 << 20,), np.uint8)
        arr.unlink_on_del()
        arr[:] = 1
        kept.append(arr)
assert len(kept) == 5, len(kept)
assert len(os.listdir("/dev/shm")) == 5
del kept, arr
assert os.listdir("/dev/shm") == []
print("ok")
"""
    )
    assert out.strip().endswith("ok")


def test_a_shape_numpy_rejects_after_the_segment_exists_leaves_nothing():
    before = own_entries()
    with pytest.raises(ValueError, match="dimension"):
        SharedMemoryArray((1,) * 65, np.uint8)
    assert own_entries() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_someone_elses_read_only_segment_opens_read_only(fresh_segments):
    arr = SharedMemoryArray((16,), np.uint8)
    arr.unlink_on_del()
    arr[:] = 7
    name = arr.metadata.name
    os.chmod(os.path.join(SHM_DIR, name), 0o644)
    run_python(
        f"""
        import os, numpy as np, pytest
        from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata
        os.setuid(65534)  # nobody: may read the segment, not write it
        arr = SharedMemoryArray.from_metadata(
            SharedMemoryArrayMetadata({name!r}, (16,), np.uint8))
        assert int(arr.sum()) == 7 * 16
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
        """,
        env={"GRAIN_SHM_SESSION": ""},
    )

"""SharedMemoryArray in one process: shapes, dtypes, views, results, lifetimes."""

import gc
import os
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import pytest

from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, _shm



from _names import RECYCLING, exists


def owned(shape, dtype=float):
    arr = SharedMemoryArray(shape, dtype)
    arr.unlink_on_del()
    return arr


# Every dtype numpy has that does not hold Python objects.
DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
    np.int64, np.uint64, np.float16, np.float32, np.float64, np.longdouble,
    np.complex64, np.complex128, np.clongdouble,
    "datetime64[ns]", "timedelta64[s]", "S7", "U3", "V5",
    [("x", np.int32), ("y", np.float64, (2,))],
    np.dtype([("a", "u1"), ("b", ">i4")], align=True),
    ">f8", "<u2",
]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_through_metadata(dtype):
    arr = owned((3, 4), dtype)
    source = np.frombuffer(np.random.default_rng(0).bytes(arr.nbytes), arr.dtype)
    arr.view(np.uint8).reshape(-1)[:] = source.view(np.uint8)
    other = SharedMemoryArray.from_metadata(arr.metadata)
    assert other.dtype == arr.dtype and other.shape == (3, 4)
    assert other.tobytes() == arr.tobytes()
    assert _shm.segment_of(other).name == arr.metadata.name  # a mapping of arr's segment
    other.view(np.uint8).reshape(-1)[0] ^= 0xFF
    assert other.tobytes() == arr.tobytes()  # same memory, not a copy


def test_default_dtype_is_float64_and_shape_is_any_iterable_of_ints():
    for shape in ((2, 3), [2, 3], np.array([2, 3]), (d for d in (2, 3)), (np.int64(2), 3)):
        arr = owned(shape)
        assert arr.shape == (2, 3) and arr.dtype == np.float64
    assert owned(5).shape == (5,)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 7), ()])
def test_empty_and_zero_d_arrays(shape):
    arr = owned(shape, np.int32)
    assert arr.shape == shape
    if arr.size:
        arr[...] = 7
    back = SharedMemoryArray.from_metadata(arr.metadata)
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_max_ndim():
    ndim = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
    arr = owned((1,) * ndim, np.uint8)
    arr[...] = 9
    assert SharedMemoryArray.from_metadata(arr.metadata).reshape(-1)[0] == 9


def test_zero_itemsize_dtype():
    arr = owned((4,), "V0") if np.dtype("V0").itemsize == 0 else owned((4,), "S0")
    assert arr.nbytes == 0
    assert SharedMemoryArray.from_metadata(arr.metadata).shape == (4,)


def test_metadata_is_grains_triple_plus_view_geometry():
    arr = owned((2, 3), np.int16)
    md = arr.metadata
    assert md.name == _shm.segment_of(arr).name and (md.shape, md.dtype) == ((2, 3), np.int16)
    assert exists(md)
    assert md.strides is None
    if RECYCLING:  # a pool block: its place in the arena, and which block
        assert md.offset > 0 and md.block is not None
        positional = SharedMemoryArrayMetadata(md.name, (2, 3), np.int16, None, md.offset, md.block)
    else:  # Grain's triple, as Grain spells it
        assert md.offset == 0 and md.block is None
        positional = SharedMemoryArrayMetadata(md.name, (2, 3), np.int16)
    assert positional == md
    with pytest.raises(dataclass_frozen_error()):
        md.name = "other"


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_ufunc_results_and_reductions_are_plain_ndarrays():
    arr = owned((4,), np.int64)
    arr[:] = [1, 2, 3, 4]
    assert type(arr + 1) is np.ndarray
    assert type(np.sqrt(arr)) is np.ndarray
    assert type(arr.sum(axis=0)) is np.int64 and arr.sum() == 10
    assert type(arr.reshape(2, 2).sum(axis=0)) is np.ndarray
    assert type(arr[[0, 2]]) is np.ndarray  # fancy indexing copies
    assert type(arr[arr > 2]) is np.ndarray
    result = np.add(arr, 1, out=arr)  # in place: still the shared array
    assert result is arr and list(arr) == [2, 3, 4, 5]
    other = owned((4,), np.int64)
    assert np.add(arr, 1, out=other) is other and list(other) == [3, 4, 5, 6]
    assert type(np.add(arr, 1, out=np.empty(4, np.int64))) is np.ndarray


def test_results_of_zero_dimensional_arrays_are_scalars_as_numpys():
    arr = owned((), np.float64)
    arr[()] = 2.5
    plain = np.array(2.5)
    for op in (lambda a: a * 2, np.negative, abs, lambda a: a + a, np.sum, lambda a: a.sum()):
        result, expected = op(arr), op(plain)
        assert type(result) is type(expected) and result == expected
    assert np.add(arr, 1, out=arr) is arr and arr == 3.5


class _Labelled(SharedMemoryArray):
    """A user's subclass: numpy's default wrapping, results of its own type."""


def test_a_subclass_keeps_numpys_default_for_results():
    arr = _Labelled((4,), np.int64)
    arr.unlink_on_del()
    arr[:] = [1, 2, 3, 4]
    assert type(arr + 1) is _Labelled and list(arr + 1) == [2, 3, 4, 5]
    assert type(arr.reshape(2, 2).sum(axis=0)) is _Labelled
    assert arr.sum() == 10 and np.add(arr, 1, out=arr) is arr


def test_basic_views_stay_shared_and_know_their_place():
    arr = owned((4, 5), np.int32)
    arr[...] = np.arange(20).reshape(4, 5)
    view = arr[1:3, ::2]
    assert type(view) is SharedMemoryArray
    md = view.metadata
    assert md.name == arr.metadata.name and md.offset == arr.metadata.offset + 5 * 4
    np.testing.assert_array_equal(SharedMemoryArray.from_metadata(md), view)


def test_a_private_copy_is_not_mistaken_for_shared_memory():
    arr = owned((3,), np.int32)
    arr[:] = 5
    copy = arr.copy()
    with pytest.raises(ValueError, match="copy"):
        copy.metadata
    copy.unlink_on_del()  # nothing to unlink: a no-op, as in Grain
    assert not copy._unlink_on_del
    import pickle

    back = pickle.loads(pickle.dumps(copy))
    np.testing.assert_array_equal(back, arr)  # sent by value instead


def test_view_outlives_the_array_and_keeps_the_segment():
    arr = owned((1000,), np.float64)
    arr[:] = 3.0
    name = arr.metadata
    view = arr[10:20]
    del arr
    gc.collect()
    assert exists(name)
    assert view.sum() == 30.0
    del view
    gc.collect()
    assert not exists(name)


def test_dropping_a_view_never_releases_what_others_use():
    arr = owned((100,), np.uint8)
    name = arr.metadata
    for _ in range(50):
        view = arr[::3]
        view[:] = 1
        del view
    gc.collect()
    assert exists(name) and arr.sum() == 34


def test_without_unlink_on_del_the_segment_stays_for_the_receiver():
    arr = SharedMemoryArray((8,), np.int8)
    arr[:] = 4
    md = arr.metadata
    del arr
    gc.collect()
    assert exists(md)
    received = SharedMemoryArray.from_metadata(md)
    assert received.sum() == 32 and not received._unlink_on_del
    received.unlink_on_del()
    del received
    assert not exists(md)


def test_reopened_array_does_not_own_the_name():
    arr = owned((8,), np.int8)
    other = SharedMemoryArray.from_metadata(arr.metadata)
    assert not other._unlink_on_del
    name = arr.metadata
    del other
    gc.collect()
    assert exists(name)


def test_no_file_descriptor_stays_open_per_array():
    before = len(os.listdir("/proc/self/fd"))
    arrays = [owned((16,), np.int32) for _ in range(200)]
    opened = [SharedMemoryArray.from_metadata(a.metadata) for a in arrays]
    assert len(os.listdir("/proc/self/fd")) == before
    del arrays, opened


def test_stdlib_opens_our_segments():
    arr = owned((16,), np.int32)
    arr[:] = np.arange(16)
    md = arr.metadata  # a pool block is at its offset in the arena
    shm = shared_memory.SharedMemory(name=md.name)
    try:
        resource_tracker.unregister(shm._name, "shared_memory")
        np.testing.assert_array_equal(
            np.ndarray((16,), np.int32, buffer=shm.buf, offset=md.offset), arr)
    finally:
        shm.close()


def test_we_open_segments_the_stdlib_made():
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        np.ndarray((8,), np.int64, buffer=shm.buf)[:] = np.arange(8)
        arr = SharedMemoryArray.from_metadata(
            SharedMemoryArrayMetadata(shm.name, (8,), np.int64)
        )
        np.testing.assert_array_equal(arr, np.arange(8))
        arr[0] = 42
        assert shm.buf[0] == 42
        del arr
    finally:
        shm.close()
        shm.unlink()


def test_names_are_short_random_and_portable():
    arrays = [owned((1,)) for _ in range(200)]
    # Every array its own name; with the pool, its own block of an arena.
    assert len({(a.metadata.name, a.metadata.block) for a in arrays}) == 200
    names = {a.metadata.name for a in arrays}
    for name in names:
        assert len(name) + 1 <= 30
        assert all(c.isalnum() or c in "_.-" for c in name)


PADDED = np.dtype({"names": ["a", "b"], "formats": ["u1", "<u8"], "offsets": [0, 8],
                   "itemsize": 16})  # 7 padding bytes after `a`


def test_a_fresh_segment_starts_zeroed_padding_bytes_too(fresh_segments):
    """Grain's semantics: a fresh segment is the kernel's zeroed pages, so
    even bytes no field covers read 0, after memory that held other bytes
    was given back."""
    for _ in range(3):
        dirty = SharedMemoryArray((256,), PADDED)
        dirty.unlink_on_del()
        dirty.view(np.uint8)[:] = 0xFF
        del dirty
        fresh = SharedMemoryArray((256,), PADDED)
        fresh.unlink_on_del()
        assert fresh.metadata.block is None
        assert not fresh.view(np.uint8).any()


def test_a_pooled_array_starts_with_what_its_block_last_held():
    """The pool's memory is not zeroed, like np.empty (documented in the
    README, enable_recycling and design.md): a reused block shows its last
    array's bytes, padding included, until written."""
    before = _shm.pool_stats()["max_bytes"]
    SharedMemoryArray.enable_recycling(64 << 20)
    try:
        dirty = SharedMemoryArray((256,), PADDED)
        dirty.unlink_on_del()
        dirty.view(np.uint8)[:] = 0xFF
        block = dirty.metadata.block
        del dirty
        reused = SharedMemoryArray((256,), PADDED)
        reused.unlink_on_del()
        assert reused.metadata.block[0] == block[0]
        assert (reused.view(np.uint8) == 0xFF).all()
    finally:
        if before:
            SharedMemoryArray.enable_recycling(before)
        else:
            SharedMemoryArray._disable_recycling()

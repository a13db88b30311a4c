"""Grain's own shared_memory_array_test.py cases (the non-async ones), ported.

Grain checks existence through the stdlib; we do the same, so these also show
that stdlib and grain_shm names interoperate.
"""

from multiprocessing import resource_tracker, shared_memory

import numpy as np

from _names import exists
import pytest

from grain_shm import (
    SharedMemoryArray,
    SharedMemoryArrayMetadata,
    copy_to_shm,
    open_from_shm,
    unlink_shm,
)


def stdlib_exists(metadata):
    """Open the array's name with the stdlib (as Grain's tests do) without
    leaving it tracked. A pool block shares its arena's name with other
    arrays: the pool's accounting says whether the block's name is there."""
    if metadata.block is not None:
        return exists(metadata)
    try:
        shm = shared_memory.SharedMemory(name=metadata.name, create=False)
    except FileNotFoundError:
        return False
    resource_tracker.unregister(shm._name, "shared_memory")  # 3.11 tracks attaches too
    shm.close()
    return True


def create_and_delete_shm():
    data = np.array([[1, 2], [3, 4]], dtype=np.int32)
    shm_array = SharedMemoryArray(data.shape, data.dtype)
    shm_array.unlink_on_del()
    return shm_array.metadata


def test_batch_of_dicts_through_shared_memory():
    # Grain's test_batch_dict_of_data_with_shared_memory, without its BatchOperation.
    batch = {"a": np.stack([np.array([1, 2], np.int32), np.array([3, 4], np.int32)])}
    shm_struct = copy_to_shm(batch)
    assert shm_struct.keys() == {"a"}
    metadata = shm_struct["a"]
    assert isinstance(metadata, SharedMemoryArrayMetadata)
    assert metadata.shape == (2, 2)
    assert metadata.dtype == np.int32
    metadata.close_and_unlink_shm()
    assert not stdlib_exists(metadata)


def test_del_no_pool():
    metadata = create_and_delete_shm()
    assert not stdlib_exists(metadata)


def test_copy_and_open_shm_single_array():
    arr = np.arange(10).astype(np.int32)
    shm_struct = copy_to_shm(arr)
    assert isinstance(shm_struct, SharedMemoryArrayMetadata)
    opened = open_from_shm(shm_struct)
    assert isinstance(opened, SharedMemoryArray)
    np.testing.assert_array_equal(opened, arr)
    assert opened._unlink_on_del


def test_copy_and_open_shm_nested_structure():
    arr = np.arange(10).astype(np.int32)
    arr2 = np.arange(5).astype(np.int32)
    struct = {"a": arr, "b": [arr2, arr], "c": 123}
    shm_struct = copy_to_shm(struct)
    assert isinstance(shm_struct["a"], SharedMemoryArrayMetadata)
    assert isinstance(shm_struct["b"][0], SharedMemoryArrayMetadata)
    assert isinstance(shm_struct["b"][1], SharedMemoryArrayMetadata)
    assert shm_struct["c"] == 123

    opened = open_from_shm(shm_struct)
    for got, want in ((opened["a"], arr), (opened["b"][0], arr2), (opened["b"][1], arr)):
        assert isinstance(got, SharedMemoryArray)
        np.testing.assert_array_equal(got, want)
        assert got._unlink_on_del
    assert opened["c"] == 123


def test_copy_and_open_shm_min_size():
    arr = np.arange(10).astype(np.int32)  # 40 bytes
    kept = copy_to_shm(arr, min_size=100)
    assert type(kept) is np.ndarray
    np.testing.assert_array_equal(kept, arr)
    shm_struct = copy_to_shm(arr, min_size=10)
    assert isinstance(shm_struct, SharedMemoryArrayMetadata)
    opened = open_from_shm(shm_struct)
    assert isinstance(opened, SharedMemoryArray)
    np.testing.assert_array_equal(opened, arr)
    assert opened._unlink_on_del


def test_unlink_shm():
    arr = np.arange(10).astype(np.int32)
    arr2 = np.arange(5).astype(np.int32)
    shm_struct = copy_to_shm({"a": arr, "b": [arr2, arr], "c": 123})
    names = [shm_struct["a"], shm_struct["b"][0], shm_struct["b"][1]]
    assert all(stdlib_exists(name) for name in names)
    unlink_shm(shm_struct)
    assert not any(stdlib_exists(name) for name in names)


def test_close_and_unlink_missing_raises():
    metadata = create_and_delete_shm()
    with pytest.raises(FileNotFoundError):
        metadata.close_and_unlink_shm()

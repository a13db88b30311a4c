"""copy_to_shm / open_from_shm / unlink_shm over nested containers."""

import collections

import numpy as np
import pytest
from _names import exists
from conftest import own_entries

from grain_shm import (
    SharedMemoryArray,
    SharedMemoryArrayMetadata,
    copy_to_shm,
    open_from_shm,
    unlink_shm,
)

Point = collections.namedtuple("Point", "x y")


def test_containers_keep_their_types_and_non_array_leaves():
    arr = np.arange(6, dtype=np.float32)
    factory_dict = collections.defaultdict(list, {"k": arr})
    struct = {
        "list": [arr, "text", 3.5],
        "tuple": (arr, None),
        "point": Point(arr, b"raw"),
        "default": factory_dict,
        "none": None,
        "nested": {"deeper": [{"z": arr}]},
    }
    shared = copy_to_shm(struct)
    assert type(shared["tuple"]) is tuple and shared["tuple"][1] is None
    assert type(shared["point"]) is Point and shared["point"].y == b"raw"
    assert type(shared["default"]) is collections.defaultdict
    assert shared["default"].default_factory is list
    assert shared["list"][1:] == ["text", 3.5] and shared["none"] is None
    opened = open_from_shm(shared)
    for got in (opened["list"][0], opened["tuple"][0], opened["point"].x,
                opened["default"]["k"], opened["nested"]["deeper"][0]["z"]):
        assert isinstance(got, SharedMemoryArray)
        np.testing.assert_array_equal(got, arr)


def test_leaves_that_are_not_copied():
    objects = np.array([1, "a"], dtype=object)
    fortran = np.asfortranarray(np.ones((3, 4)))
    strided = np.arange(10)[::2]
    empty = np.zeros((0, 3))
    small = np.arange(3, dtype=np.int8)
    struct = [objects, fortran, strided, empty, small, 7, "s"]
    out = copy_to_shm(struct, min_size=4)
    for before, after in zip(struct, out):
        assert after is before


def test_min_size_is_inclusive():
    arr = np.zeros(10, np.int32)  # 40 bytes
    md = copy_to_shm(arr, min_size=40)
    assert isinstance(md, SharedMemoryArrayMetadata)
    unlink_shm(md)
    assert copy_to_shm(arr, min_size=41) is arr


def test_shared_arrays_and_their_views_pass_by_reference_without_a_copy():
    arr = SharedMemoryArray((4, 4), np.int32)
    arr.unlink_on_del()
    arr[...] = np.arange(16).reshape(4, 4)
    before = own_entries()
    out = copy_to_shm({"whole": arr, "column": arr[:, 1], "rows": arr[2:]})
    assert own_entries() == before  # no new segment: nothing copied
    for key, md in out.items():
        assert md.name == arr.metadata.name, key
    column = SharedMemoryArray.from_metadata(out["column"])
    np.testing.assert_array_equal(column, arr[:, 1])
    column[0] = 100
    assert arr[0, 1] == 100


def test_a_plain_view_of_a_shared_array_is_copied_not_handed_over():
    # A producer's long-lived table: a plain ndarray view of it is not the
    # caller's to give away; the receiver's open_from_shm owns what it gets.
    table = SharedMemoryArray((100,), np.int64)
    table.unlink_on_del()
    table[:] = np.arange(100)
    for _ in range(2):  # the second receiver still finds the table
        sent = copy_to_shm({"x": np.asarray(table[10:20])})
        assert (sent["x"].name, sent["x"].block) != (table.metadata.name, table.metadata.block)
        received = open_from_shm(sent)
        np.testing.assert_array_equal(received["x"], np.arange(10, 20))
        received["x"][0] = -1  # a copy: the table is untouched
        del received
        assert exists(table) and not exists(sent["x"])
    again = SharedMemoryArray.from_metadata(table.metadata)
    np.testing.assert_array_equal(again, np.arange(100))


def test_a_private_copy_of_a_shared_array_is_copied_to_shared_memory():
    private = SharedMemoryArray((3,), np.int32)
    private.unlink_on_del()
    private[:] = 7
    copy = private.copy()  # a SharedMemoryArray in private memory
    sent = copy_to_shm(copy)
    assert isinstance(sent, SharedMemoryArrayMetadata)
    np.testing.assert_array_equal(open_from_shm(sent), [7, 7, 7])


def test_open_from_shm_owns_what_it_opens():
    md = copy_to_shm(np.ones(8))
    opened = open_from_shm(md)
    assert opened._unlink_on_del
    del opened
    assert not exists(md)


def test_unlink_shm_ignores_everything_else():
    struct = copy_to_shm({"a": np.ones(4), "b": [1, "x", None]})
    assert unlink_shm(struct) is None
    assert not exists(struct["a"])
    with pytest.raises(FileNotFoundError):
        unlink_shm(struct)  # already gone: as Grain, an error


def test_a_copy_that_fails_leaves_no_segment(monkeypatch):
    before = own_entries()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "copyto", interrupted)
    with pytest.raises(KeyboardInterrupt):
        copy_to_shm(np.ones(1000))
    monkeypatch.undo()
    assert own_entries() == before

"""An arena is never a segment (issue 16).

A pooled array's metadata names its arena, a segment shared by many arrays
whose header hands the blocks out. Metadata that names an arena but no valid
block must not map it (offset 0 would read the header, other offsets other
arrays, and the mapping would be writable) nor unlink it (every array in it
would be lost to receivers that have not mapped it yet): ValueError, and the
arena and its arrays are as they were. Arenas have names of their own, so
this is decided before anything is opened.
"""

import os
import re
import types

import numpy as np
import pytest

from conftest import run_python
from grain_shm import (SharedMemoryArray, SharedMemoryArrayMetadata, _shm, names,
                       open_from_shm, unlink_shm)
from grain_shm.names import SHM_DIR

MiB = 1 << 20


@pytest.fixture
def pool():
    before = _shm.pool_stats()["max_bytes"]
    SharedMemoryArray.enable_recycling(64 * MiB)
    yield
    if before:
        SharedMemoryArray.enable_recycling(before)
    else:
        SharedMemoryArray._disable_recycling()


def two_arrays():
    """Two arrays in one arena, each filled with its own byte (not a fixture:
    pytest would hold them past the leak check)."""
    first = SharedMemoryArray((4096,), np.uint8)
    second = SharedMemoryArray((4096,), np.uint8)
    for arr, byte in ((first, 1), (second, 2)):
        arr.unlink_on_del()
        arr[:] = byte
    assert first.metadata.name == second.metadata.name and first.metadata.block
    return first, second


def arena_bytes(name):
    with open(os.path.join(SHM_DIR, name), "rb") as f:
        return f.read()


def intact(first, second, before):
    """The arena's file, header and block words included, is byte for byte
    what it was, and both arrays read their own bytes."""
    assert arena_bytes(first.metadata.name) == before
    assert (first == 1).all() and (second == 2).all()


def offsets(first, second):
    size = os.path.getsize(os.path.join(SHM_DIR, first.metadata.name))
    return {
        "0 (the header)": 0,
        "inside another block": second.metadata.offset + 100,
        "before the first block": 64,  # the block table
        "past the end": size + 4096,
    }


@pytest.mark.parametrize("where", ["0 (the header)", "inside another block",
                                   "before the first block", "past the end"])
def test_metadata_without_a_block_never_maps_an_arena(pool, where):
    first, second = two_arrays()
    before = arena_bytes(first.metadata.name)
    offset = offsets(first, second)[where]
    forged = SharedMemoryArrayMetadata(first.metadata.name, (64,), np.uint8, None, offset)
    with pytest.raises(ValueError, match="pool arena"):
        SharedMemoryArray.from_metadata(forged)
    with pytest.raises(ValueError, match="pool arena"):
        _shm.open(first.metadata.name, offset + 64)
    intact(first, second, before)


def test_no_writable_mapping_of_an_arena_hands_a_live_block_out_again(pool):
    """The attack of issue 16: map the arena at offset 0 and free a live
    block's word, so that the next array takes it and overwrites `second`."""
    first, second = two_arrays()
    header = SharedMemoryArrayMetadata(first.metadata.name, (4096,), np.uint8, None, 0)
    with pytest.raises(ValueError, match="pool arena"):
        SharedMemoryArray.from_metadata(header)[:] = 0
    later = [SharedMemoryArray((4096,), np.uint8) for _ in range(4)]
    for arr in later:
        arr.unlink_on_del()
        arr[:] = 9
    assert all(arr.metadata.block != second.metadata.block for arr in later)
    assert (first == 1).all() and (second == 2).all()


def test_grain_style_metadata_on_an_arena_name_is_refused(pool):
    """Grain's metadata is (name, shape, dtype) and nothing else."""
    first, second = two_arrays()
    before = arena_bytes(first.metadata.name)
    grain_style = types.SimpleNamespace(name=first.metadata.name, shape=(64,), dtype=np.uint8)
    with pytest.raises(ValueError, match="pool arena"):
        SharedMemoryArray.from_metadata(grain_style)
    intact(first, second, before)


@pytest.mark.parametrize("how", ["close_and_unlink_shm", "unlink_shm", "open_from_shm",
                                 "_shm.unlink"])
def test_no_unlink_path_removes_an_arena(pool, how):
    first, second = two_arrays()
    name = first.metadata.name
    before = arena_bytes(name)
    md = SharedMemoryArrayMetadata(name, (64,), np.uint8)
    with pytest.raises(ValueError, match="pool arena"):
        if how == "close_and_unlink_shm":
            md.close_and_unlink_shm()
        elif how == "unlink_shm":
            unlink_shm({"x": [md]})
        elif how == "open_from_shm":
            open_from_shm({"x": [md]})
        else:
            _shm.unlink(name)
    assert os.path.exists(os.path.join(SHM_DIR, name))
    intact(first, second, before)
    # A receiver that has not mapped the arena yet still opens both arrays.
    proc = run_python(f"""
        import pickle, sys
        first, second = pickle.loads({pickle_of(first, second)!r})
        print(int(first[0]), int(second[0]))
    """)
    assert proc.stdout.split() == ["1", "2"]


def pickle_of(*arrays):
    import pickle

    return pickle.dumps(arrays)


def test_arenas_have_names_of_their_own_that_ls_gc_and_the_reaper_know(pool):
    arr = SharedMemoryArray((100,), np.uint8)
    arr.unlink_on_del()
    name = arr.metadata.name
    assert names.ARENA_RE.fullmatch(name) and names.is_arena(name)
    assert names.SEGMENT_RE.fullmatch(name)  # a session's segment: ls, gc and leak checks
    assert name.startswith(names.segment_prefix(re.match(r"gs(\w{13})", name).group(1)))
    SharedMemoryArray._disable_recycling()
    plain = SharedMemoryArray((100,), np.uint8)
    plain.unlink_on_del()
    assert not names.is_arena(plain.metadata.name)
    assert names.SEGMENT_RE.fullmatch(plain.metadata.name)


def test_an_arena_name_is_not_opened_as_a_block_unless_it_is_one(pool, fresh_segments):
    """The other way round: a block reference must name an arena."""
    plain = SharedMemoryArray((8192,), np.uint8)
    plain.unlink_on_del()
    md = SharedMemoryArrayMetadata(plain.metadata.name, (8,), np.uint8, None, 4096, (0, 1))
    with pytest.raises(ValueError, match="not a grain_shm pool arena"):
        SharedMemoryArray.from_metadata(md)


@pytest.mark.parametrize("name", [
    "gs0123456789abc_.ABCDEFGHIJKL", "/gs0123456789abc_.abc-_0123456",
    "gs0123456789abc_ABCDEFGHIJKL", "gs0123456789abc_.ABCDEFGHIJK", "gs0123456789ABC_.ABCDEFGHIJKL",
    "gsk_ABCDEFGHIJKL", "gs0123456789abc_.ABCDEFGHIJK.", "xs0123456789abc_.ABCDEFGHIJKL",
    "psm_0123abcd", "gs0123456789abc-.ABCDEFGHIJKL",
])
def test_the_core_and_names_agree_on_what_an_arena_name_is(name):
    assert _shm.is_arena_name(name) == names.is_arena(name)

"""A queue's ring is never an array's segment: like a pool arena, it has a
name of its own, and no array metadata maps or unlinks it (its cells and
claim words belong to the queue's protocol; an unlink would cut off every
process that has not opened it yet)."""

import os
import types

import numpy as np
import pytest

import grain_shm
from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, _shm, names
from grain_shm import open_from_shm, unlink_shm
from grain_shm.names import SHM_DIR


@pytest.fixture
def queue():
    q = grain_shm.Queue(4)
    q.put(b"still here")
    yield q
    q.close()


def still_works(q):
    assert os.path.exists(os.path.join(SHM_DIR, q.name))
    assert q.get(timeout=5) == b"still here"
    q.put(b"still here")


def test_a_ring_has_a_name_of_its_own_that_ls_gc_and_the_reaper_know(queue):
    assert names.is_queue(queue.name) and _shm.is_queue_name(queue.name)
    assert not names.is_arena(queue.name)
    assert names.SEGMENT_RE.fullmatch(queue.name)  # a session's name: swept with the rest


@pytest.mark.parametrize("offset", [0, 512])
def test_array_metadata_never_maps_a_ring(queue, offset):
    for md in (SharedMemoryArrayMetadata(queue.name, (64,), np.uint8, None, offset),
               types.SimpleNamespace(name=queue.name, shape=(64,), dtype=np.uint8)):
        with pytest.raises(ValueError, match="Queue's ring"):
            SharedMemoryArray.from_metadata(md)
    still_works(queue)


@pytest.mark.parametrize("how", ["close_and_unlink_shm", "unlink_shm", "open_from_shm",
                                 "_shm.unlink"])
def test_no_unlink_path_removes_a_ring(queue, how):
    md = SharedMemoryArrayMetadata(queue.name, (64,), np.uint8)
    with pytest.raises(ValueError, match="Queue's ring"):
        if how == "close_and_unlink_shm":
            md.close_and_unlink_shm()
        elif how == "unlink_shm":
            unlink_shm({"x": [md]})
        elif how == "open_from_shm":
            open_from_shm({"x": [md]})
        else:
            _shm.unlink(queue.name)
    still_works(queue)


def test_a_plain_segment_is_not_opened_as_a_ring(fresh_segments):
    plain = SharedMemoryArray((8192,), np.uint8)
    plain.unlink_on_del()
    with pytest.raises(ValueError, match="not a grain_shm queue"):
        _shm.ring_open(plain.metadata.name)


@pytest.mark.parametrize("name", [
    "gs0123456789abc_~ABCDEFGHIJKL", "/gs0123456789abc_~abc-_0123456",
    "gs0123456789abc_.ABCDEFGHIJKL", "gs0123456789abc_~ABCDEFGHIJK", "gs0123456789ABC_~ABCDEFGHIJKL",
    "gsk_ABCDEFGHIJKL", "gs0123456789abc_~ABCDEFGHIJK~", "gs0123456789abc_ABCDEFGHIJKL",
])
def test_the_core_and_names_agree_on_what_a_ring_name_is(name):
    assert _shm.is_queue_name(name) == names.is_queue(name)
    assert _shm.is_arena_name(name) == names.is_arena(name)

"""Pickling sends a reference: the same elements over the same memory."""

import contextlib
import multiprocessing as mp
import pickle

import numpy as np
import pytest

from _names import exists
from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata

PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)

VIEWS = {
    "whole": lambda a: a,
    "row": lambda a: a[2],
    "column": lambda a: a[:, 3],
    "strided": lambda a: a[1::2, ::3],
    "transposed": lambda a: a.T,
    "reversed": lambda a: a[::-1],
    "reversed-both": lambda a: a[::-1, ::-2],
    "zero-d": lambda a: a[1, 2, ...],
    "dtype-view": lambda a: a.view(np.int16),
    "bytes": lambda a: a[3:].view(np.uint8),
    "reshaped": lambda a: a.reshape(4, 2, 7),
    "empty-slice": lambda a: a[3:3],
    "broadcast": lambda a: np.broadcast_to(a[0], (5, 7), subok=True),
}


def make_grid():
    arr = SharedMemoryArray((8, 7), np.int32)
    arr.unlink_on_del()
    arr[...] = np.arange(56).reshape(8, 7)
    return arr


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("view_name", list(VIEWS))
def test_view_arrives_as_the_same_elements_over_the_same_memory(view_name, protocol):
    view = VIEWS[view_name](make_grid())
    data = pickle.dumps(view, protocol=protocol)
    assert len(data) < 1000  # a reference, not the bytes
    back = pickle.loads(data)
    assert isinstance(back, SharedMemoryArray)
    assert back.shape == view.shape and back.dtype == view.dtype
    assert back.strides == view.strides
    np.testing.assert_array_equal(back, view)
    if view.size:
        first = (0,) * back.ndim
        back[first] = 99  # write through the unpickled array ...
        assert view[first] == 99  # ... and the original sees it: same memory
    assert not back._unlink_on_del  # an unpickled array never owns the name


def test_a_large_array_pickles_to_a_few_hundred_bytes():
    arr = SharedMemoryArray((1 << 20,), np.float64)
    arr.unlink_on_del()
    assert len(pickle.dumps(arr, protocol=5)) < 400


def test_dropping_the_unpickled_array_does_not_unlink():
    grid = make_grid()
    back = pickle.loads(pickle.dumps(grid))
    del back
    assert exists(grid)


@contextlib.contextmanager
def spawned_child(target):
    """A `spawn`ed child running target(queue, results); joined (or killed)
    on the way out, so a failing child never hangs the test."""
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=target, args=(queue, results))
    child.start()
    try:
        yield queue, results
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def _child_checks_views(queue, results):
    try:
        checked = 0
        while (item := queue.get()) is not None:
            view_name, view, expected = item
            assert isinstance(view, SharedMemoryArray), type(view)
            np.testing.assert_array_equal(view, expected, err_msg=view_name)
            if view.size:
                view[(0,) * view.ndim] = 99  # visible to the parent
            checked += 1
        results.put(("ok", checked))
    except BaseException as exc:  # report, never hang the parent
        results.put(("error", repr(exc)))


def test_views_cross_a_spawned_process():
    views = []
    with spawned_child(_child_checks_views) as (queue, results):
        for view_name, make in VIEWS.items():
            arr = SharedMemoryArray((8, 7), np.int32)
            arr.unlink_on_del()
            arr[...] = np.arange(56).reshape(8, 7)
            view = make(arr)  # keeps arr's segment alive
            queue.put((view_name, view, np.array(view)))
            views.append(view)
        queue.put(None)
        status, detail = results.get(timeout=60)
    assert status == "ok", detail
    assert detail == len(views)
    for view in views:
        if view.size:
            assert view[(0,) * view.ndim] == 99


def _child_echoes_bytes(queue, results):
    try:
        while (arr := queue.get()) is not None:
            assert isinstance(arr, SharedMemoryArray)
            results.put((str(arr.dtype), arr.shape, arr.tobytes()))
        results.put(None)
    except BaseException as exc:
        results.put(("error", repr(exc), b""))


def test_every_dtype_crosses_a_spawned_process():
    from test_array import DTYPES

    rng = np.random.default_rng(1)
    sent = []
    with spawned_child(_child_echoes_bytes) as (queue, results):
        for dtype in DTYPES:
            arr = SharedMemoryArray((3, 5), dtype)
            arr.unlink_on_del()
            arr.view(np.uint8).reshape(-1)[:] = np.frombuffer(rng.bytes(arr.nbytes), np.uint8)
            queue.put(arr)
            sent.append(arr)
        queue.put(None)
        for arr in sent:
            assert results.get(timeout=60) == (str(arr.dtype), arr.shape, arr.tobytes())
        assert results.get(timeout=60) is None


def test_dtypes_other_packages_register_keep_their_identity():
    # numpy's own test dtype, registered like ml_dtypes' bfloat16: its .str is
    # "<V8", which would rebuild as raw bytes.
    try:
        from numpy._core._rational_tests import rational
    except ImportError:  # numpy 1.x
        rational = pytest.importorskip("numpy.core._rational_tests").rational
    arr = SharedMemoryArray((3,), rational)
    arr.unlink_on_del()
    arr[:] = [rational(1, 2), rational(2, 3), rational(3, 4)]
    back = pickle.loads(pickle.dumps(arr))
    assert back.dtype == rational
    assert back[1] == rational(2, 3)


def test_dtype_metadata_survives_pickling():
    dtype = np.dtype(np.float32, metadata={"unit": "m"})
    arr = SharedMemoryArray((2,), dtype)
    arr.unlink_on_del()
    assert pickle.loads(pickle.dumps(arr)).dtype.metadata == {"unit": "m"}


class Tagged(SharedMemoryArray):
    """A user's subclass: pickling must give it back, not the base class."""


def test_a_subclass_pickles_as_itself():
    arr = Tagged((4,), np.int16)
    arr.unlink_on_del()
    arr[:] = 5
    back = pickle.loads(pickle.dumps(arr[1:]))
    assert type(back) is Tagged and back.sum() == 15


class _MyMetadata(SharedMemoryArrayMetadata):
    """A user's subclass of the metadata."""


@pytest.mark.parametrize("dtype", [
    np.dtype(np.float32), np.dtype(">i8"), np.dtype([("x", "<f4"), ("y", "u1")]),
    np.dtype(np.float32, metadata={"unit": "m"}), "float32", np.int16,
], ids=repr)
def test_metadata_pickles_to_an_equal_metadata_with_fields_of_the_same_types(dtype):
    md = SharedMemoryArrayMetadata("gs_x", (3, 4), dtype, (32, 8), 16, (2, 7))
    back = pickle.loads(pickle.dumps(md))
    assert back == md and type(back) is SharedMemoryArrayMetadata
    for field in ("name", "shape", "dtype", "strides", "offset", "block"):
        assert type(getattr(back, field)) is type(getattr(md, field)), field
    if isinstance(dtype, np.dtype):
        assert back.dtype == dtype and back.dtype.metadata == dtype.metadata
    sub = _MyMetadata("gs_x", (3,), dtype)
    assert type(pickle.loads(pickle.dumps(sub))) is _MyMetadata


def test_metadata_sent_as_grain_sends_it_maps_the_same_elements():
    """copy_to_shm's output crosses as metadata: it must come back whole."""
    arr = SharedMemoryArray((4, 6), np.int32)
    arr.unlink_on_del()
    arr[...] = np.arange(24).reshape(4, 6)
    md = pickle.loads(pickle.dumps(arr[1:, ::2].metadata))
    np.testing.assert_array_equal(SharedMemoryArray.from_metadata(md), arr[1:, ::2])

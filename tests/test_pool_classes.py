"""Size classes no coarser than 1.25x (issue 18).

Blocks come in classes of 256 B, then four per doubling (320, 384, 448,
512, 640, ...) up to 256 MiB, so an array takes at most 1.25 times its size
(powers of two took up to twice). Every class boundary, exactly at and one
byte over: the block chosen, reads and writes inside it, and references
forged across the boundary refused.
"""

import dataclasses

import numpy as np
import pytest

from grain_shm import SharedMemoryArray, _shm

MiB = 1 << 20


def classes():
    """Every class's block bytes, as the spacing rule gives them."""
    sizes = [256]
    for k in range(8, 28):
        sizes += [(1 << k) + j * (1 << (k - 2)) for j in (1, 2, 3, 4)]
    return sizes


CLASSES = classes()


def expected_block(nbytes):
    return min(size for size in CLASSES if size >= nbytes)


def test_no_array_takes_more_than_a_quarter_more_than_its_size():
    assert len(CLASSES) == 81 and CLASSES[-1] == 256 * MiB
    assert all(b / a <= 1.25 for a, b in zip(CLASSES, CLASSES[1:]))
    assert all(size % 64 == 0 for size in CLASSES)  # blocks start on cache lines
    rng = np.random.default_rng(0)
    for nbytes in map(int, rng.integers(257, 256 * MiB, 10000)):
        block = _shm.block_size(nbytes)
        assert nbytes <= block < 1.25 * nbytes and block == expected_block(nbytes)


@pytest.mark.parametrize("index", range(len(CLASSES)))
def test_each_boundary_takes_its_class_and_one_byte_over_the_next(index):
    size = CLASSES[index]
    assert _shm.block_size(size) == size
    assert _shm.block_size(size + 1) == (CLASSES[index + 1] if index + 1 < len(CLASSES) else None)
    assert _shm.block_size(size - 1) == size
    if index > 0:
        assert _shm.block_size(CLASSES[index - 1] + 1) == size


def test_a_36_mib_batch_takes_at_most_a_quarter_more():
    batch = 256 * 224 * 224 * 3  # 256 RGB images of 224 x 224: 36.75 MiB
    assert _shm.block_size(batch) <= 1.25 * batch


@pytest.fixture
def pool():
    before = _shm.pool_stats()["max_bytes"]
    SharedMemoryArray.enable_recycling(64 * MiB)  # arenas of 32 MiB at most
    yield
    if before:
        SharedMemoryArray.enable_recycling(before)
    else:
        SharedMemoryArray._disable_recycling()


# Real blocks for every class whose arena fits the test's bound.
REAL = [size for size in CLASSES if size < 2 * MiB]


@pytest.mark.parametrize("size", REAL)
def test_arrays_at_and_over_a_boundary_live_inside_their_block(pool, size):
    for nbytes in (size, size + 1):
        first = SharedMemoryArray((nbytes,), np.uint8)
        second = SharedMemoryArray((nbytes,), np.uint8)  # its neighbour, if the arena has one
        for arr, byte in ((first, 1), (second, 2)):
            arr.unlink_on_del()
            arr[:] = byte
        md = first.metadata
        expected = expected_block(nbytes)
        assert md.block is not None
        assert md.name == second.metadata.name  # arenas hold 4 MiB of blocks: two at least
        step = second.metadata.offset - md.offset  # blocks are `expected` bytes apart
        assert abs(step) == expected * abs(second.metadata.block[0] - md.block[0])
        assert (first == 1).all() and (second == 2).all()  # writes stayed inside
        # Across the boundary: one byte more than the array is refused ...
        for forged in (dataclasses.replace(md, shape=(nbytes + 1,)),
                       dataclasses.replace(md, shape=(expected,)) if expected > nbytes else None,
                       dataclasses.replace(md, offset=md.offset + 1)):
            if forged is not None:
                with pytest.raises(ValueError):
                    SharedMemoryArray.from_metadata(forged)
        # ... and exactly the array is opened.
        again = SharedMemoryArray.from_metadata(md)
        assert again.nbytes == nbytes and (again == 1).all()
        del first, second, again
        _shm.pool_trim(0.0)


def test_one_byte_over_the_largest_class_gets_a_fresh_segment():
    assert _shm.block_size(256 * MiB + 1) is None

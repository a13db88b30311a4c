"""The pool (enable_recycling): a block behaves exactly as a POSIX name would.

Each rule of issue 10 in its own test: a block is reused only once it is
unlinked and no process maps it; a stale or forged reference raises and
reads nothing; a killed consumer or a forked child does not disturb the
pool; past its bound the pool falls back to fresh segments; and nothing is
left behind. These tests turn the pool on themselves, in either mode of the
suite.
"""

import dataclasses
import gc
import pickle
import textwrap

import numpy as np
import pytest

from _names import exists, references
from conftest import run_python
from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, _shm, session

MiB = 1 << 20


@pytest.fixture
def pool():
    """The pool on in this process for one test, with room for 64 MiB."""
    before = _shm.pool_stats()["max_bytes"]
    SharedMemoryArray.enable_recycling(64 * MiB)
    yield
    if before:
        SharedMemoryArray.enable_recycling(before)
    else:
        SharedMemoryArray._disable_recycling()


def owned(shape, dtype=np.uint8, fill=None):
    arr = SharedMemoryArray(shape, dtype)
    arr.unlink_on_del()
    if fill is not None:
        arr[...] = fill
    return arr


def test_arrays_come_from_blocks_and_pickle_as_references(pool):
    arr = owned((1000,), np.float32, 2.5)
    md = arr.metadata
    assert md.block is not None and md.offset > 0
    data = pickle.dumps(arr)
    assert len(data) < 300
    back = pickle.loads(data)
    assert np.shares_memory(back, arr) and float(back.sum()) == 2500.0
    assert references(md) == 2  # two mappings of the block, as of a name


def test_a_freed_block_is_reused_at_once_and_its_old_reference_is_stale(pool):
    arr = owned((100,), np.int64, 7)
    old = arr.metadata
    del arr
    assert not exists(old)
    new = owned((100,), np.int64, 9)
    # The same memory again, under a new generation.
    assert (new.metadata.name, new.metadata.offset) == (old.name, old.offset)
    assert new.metadata.block[0] == old.block[0]
    assert new.metadata.block[1] != old.block[1]
    with pytest.raises(FileNotFoundError):
        SharedMemoryArray.from_metadata(old)  # never the new array's bytes
    with pytest.raises(FileNotFoundError):
        old.close_and_unlink_shm()
    assert exists(new)


def test_a_block_is_not_reused_while_any_mapping_of_it_lives(pool):
    arr = owned((64,), np.uint8, 1)
    md = arr.metadata
    reader = SharedMemoryArray.from_metadata(md)[10:20]  # another mapping, a view of it
    del arr
    assert not exists(md)  # unlinked: the owner is gone ...
    others = [owned((64,), np.uint8, 2) for _ in range(50)]
    # ... but mapped: none of the new arrays took its block.
    assert md.block[0] not in {o.metadata.block[0] for o in others}
    assert int(reader.sum()) == 10
    del reader
    assert references(md) is None or references(md) == 0


def test_a_reference_in_flight_keeps_its_block_until_unlinked(pool):
    arr = SharedMemoryArray((32,), np.int16)  # no owner: the receiver will be
    arr[:] = 5
    in_flight = pickle.dumps(arr)
    del arr
    gc.collect()
    taken = [owned((32,), np.int16, 0) for _ in range(20)]  # reuse nothing linked
    received = pickle.loads(in_flight)
    assert int(received.sum()) == 5 * 32
    received.unlink_on_del()
    md = received.metadata
    del received, taken
    assert not exists(md)


def test_close_and_unlink_frees_the_block_once_unmapped(pool):
    arr = SharedMemoryArray((16,), np.uint8)
    md = arr.metadata
    md.close_and_unlink_shm()
    assert not exists(md)
    arr[:] = 3  # this mapping is still valid
    assert int(arr.sum()) == 48
    with pytest.raises(FileNotFoundError):
        SharedMemoryArray.from_metadata(md)
    del arr
    assert references(md) is None or references(md) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"offset": -1},                       # before its block: relative to it
        {"offset": +100},                     # past the array's end
        {"shape": (101,)},                    # larger than the array
        {"strides": (-1,), "offset": +0},     # reaches before the block
        {"block_index": +1},                  # another block
        {"block_index": 1 << 20},             # no such block
        {"generation": +1},                   # a generation not (yet) issued
        {"generation": -(1 << 40)},           # not a generation at all
    ],
    ids=lambda c: ",".join(c),
)
def test_a_forged_reference_raises_and_reads_nothing(pool, change):
    arr = owned((100,), np.uint8, 42)
    md = arr.metadata
    index, generation = md.block
    forged = dataclasses.replace(
        md,
        shape=change.get("shape", md.shape),
        strides=change.get("strides", md.strides),
        offset=md.offset + change.get("offset", 0),
        block=(index + change.get("block_index", 0), generation + change.get("generation", 0)),
    )
    with pytest.raises((ValueError, FileNotFoundError)):
        SharedMemoryArray.from_metadata(forged)
    assert references(md) == 1  # the failed open left no reference behind
    assert int(arr.sum()) == 4200


def test_a_reference_to_a_segment_that_is_not_an_arena_is_refused(pool, fresh_segments):
    plain = owned((8192,), np.uint8, 0)
    md = SharedMemoryArrayMetadata(plain.metadata.name, (8,), np.uint8, None, 0, (0, 1))
    with pytest.raises(ValueError, match="not a grain_shm pool arena"):
        SharedMemoryArray.from_metadata(md)


def test_past_its_bound_the_pool_falls_back_to_fresh_segments():
    SharedMemoryArray.enable_recycling(16 * MiB)  # arenas of 8 MiB at most
    arrays = []
    try:
        arrays += [owned((MiB,)) for _ in range(4)]  # one arena of 4 x 1 MiB
        assert all(a.metadata.block is not None for a in arrays)
        arrays.append(owned((7 * MiB + 1,)))  # an 8 MiB block: with its header,
        assert arrays[-1].metadata.block is None  # larger than an arena may be
        arrays += [owned((MiB,)) for _ in range(12)]
        assert arrays[-1].metadata.block is None  # past 16 MiB of arenas
        assert _shm.pool_stats()["arena_bytes"] <= 16 * MiB
        assert _shm.pool_stats()["fallbacks"] >= 2
        for a in arrays:
            a[:] = 1  # every array's memory is really there
    finally:
        del arrays
        SharedMemoryArray._disable_recycling()


def test_persistent_arrays_never_come_from_the_pool(pool):
    with session.persistent():
        arr = SharedMemoryArray((16,), np.uint8)
    md = arr.metadata
    try:
        assert md.block is None and md.name.startswith("gsk_")
    finally:
        md.close_and_unlink_shm()


def test_idle_arenas_go_back_to_the_system(pool):
    arrays = [owned((4096,)) for _ in range(10)]
    assert _shm.pool_stats()["arena_bytes"] > 0
    names = {a.metadata.name for a in arrays}
    assert all(exists(n) for n in names)  # the arena's own file
    del arrays
    _shm.pool_trim(0.0)
    assert _shm.pool_stats()["arena_bytes"] == 0
    assert not any(exists(n) for n in names)


def test_disabling_keeps_live_blocks_valid():
    SharedMemoryArray.enable_recycling(16 * MiB)
    arr = owned((1000,), np.int32, 3)
    SharedMemoryArray._disable_recycling()
    fresh = owned((1000,), np.int32, 4)
    assert arr.metadata.block is not None and fresh.metadata.block is None
    assert int(pickle.loads(pickle.dumps(arr)).sum()) == 3000
    md = arr.metadata
    del arr
    assert not exists(md)


def test_a_producers_view_survives_the_consumers_unlink():
    run_python(
        """
        import multiprocessing as mp
        import numpy as np
        from grain_shm import SharedMemoryArray
        from _names import exists

        def consume(queue, done):
            arr = queue.get()
            arr.unlink_on_del()
            assert int(arr.sum()) == 4096
            del arr  # unlinks: the producer's name is gone ...
            done.put("unlinked")

        if __name__ == "__main__":
            SharedMemoryArray.enable_recycling(16 << 20)
            ctx = mp.get_context("spawn")
            queue, done = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=consume, args=(queue, done))
            child.start()
            arr = SharedMemoryArray((4096,), np.uint8)
            arr[:] = 1
            view = arr[::2]
            queue.put(arr)
            assert done.get(timeout=60) == "unlinked"
            child.join(60)
            md = arr.metadata
            assert not exists(md)
            # ... but the producer's mapping and view keep valid bytes, and
            # new arrays do not take the block while it holds it.
            others = [SharedMemoryArray((4096,), np.uint8) for _ in range(20)]
            for o in others:
                o[:] = 9
                o.unlink_on_del()
            assert int(view.sum()) == 2048 and int(arr.sum()) == 4096
        """
    )


def test_a_killed_consumer_does_not_corrupt_the_pool():
    # Its own session: the blocks the killed consumer held stay counted until
    # the session ends (then its reaper removes the arena).
    run_python(
        """
        import multiprocessing as mp, os, signal, time
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm

        def hold(queue, ready):
            kept = [queue.get() for _ in range(5)]
            ready.put([int(a[0]) for a in kept])
            time.sleep(600)

        if __name__ == "__main__":
            SharedMemoryArray.enable_recycling(16 << 20)
            ctx = mp.get_context("spawn")
            queue, ready = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=hold, args=(queue, ready))
            child.start()
            sent = []
            for i in range(5):
                a = SharedMemoryArray((512,), np.int64)
                a[:] = i
                queue.put(a)
                sent.append(a.metadata)
                del a
            assert ready.get(timeout=60) == [0, 1, 2, 3, 4]
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            # The killed holder's blocks stay taken (their names are linked:
            # nobody unlinked them), and new arrays get other blocks, intact.
            for md in sent:
                assert int(SharedMemoryArray.from_metadata(md)[0]) == sent.index(md)
            fresh = []
            for i in range(200):
                a = SharedMemoryArray((512,), np.int64)
                a.unlink_on_del()
                a[:] = 1000 + i
                fresh.append(a)
            taken = {md.block[0] for md in sent}
            assert not taken & {a.metadata.block[0] for a in fresh}
            assert all(int(a.sum()) == 512 * (1000 + i) for i, a in enumerate(fresh))
            for md in sent:
                md.close_and_unlink_shm()
        """,
        env={"GRAIN_SHM_SESSION": ""},
    )


def test_a_forked_childs_pool_is_its_own():
    run_python(
        """
        import os, pickle
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm
        from _names import exists, references

        SharedMemoryArray.enable_recycling(16 << 20)
        parent = SharedMemoryArray((256,), np.int32)
        parent.unlink_on_del()
        parent[:] = 1
        md = parent.metadata
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = references(md) == 2  # the child's inherited mapping counts
            mine = SharedMemoryArray((256,), np.int32)
            mine.unlink_on_del()
            mine[:] = 2
            ok &= mine.metadata.name != md.name  # an arena of its own
            ok &= _shm.pool_stats()["arenas"] == 1
            os.write(w, pickle.dumps(mine.metadata))
            del mine, parent  # the inherited copy: a reference dropped, nothing unlinked
            ok &= exists(md) and references(md) == 1
            _shm.pool_trim(0.0)
            os._exit(0 if ok else 1)
        child_md = pickle.loads(os.read(r, 4096))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert exists(md) and references(md) == 1 and int(parent.sum()) == 256
        assert _shm.pool_stats()["arenas"] == 1  # nothing of the child's
        assert not exists(child_md)  # the child's own array was freed in the child
        """,
        env={"GRAIN_SHM_SESSION": ""},
    )


def test_async_release_of_blocks():
    run_python(
        """
        import pickle
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm
        from _names import exists

        SharedMemoryArray.enable_async_del(num_threads=1, max_outstanding_requests=4)
        SharedMemoryArray.enable_recycling(16 << 20)
        refs = []
        for i in range(1000):
            a = SharedMemoryArray((1024,), np.uint8)
            a.unlink_on_del()
            a[:] = i % 256
            refs.append(a.metadata)
            b = pickle.loads(pickle.dumps(a))
            assert int(b[0]) == i % 256
            del a, b
        assert not any(exists(md) for md in refs)
        assert _shm.pool_stats()["arenas"] == 1  # every block came back
        """
    )


# A spawned producer of three pooled arrays, 0.0, 1.0 and 2.0 (x1000).
PRODUCER = """
import multiprocessing as mp, os, signal, time
import numpy as np
from grain_shm import SharedMemoryArray, _shm

def produce(queue):
    SharedMemoryArray.enable_recycling(16 << 20)
    for i in range(3):
        a = SharedMemoryArray((1000,), np.float64)
        a[:] = i
        queue.put(a)
        del a
"""


def test_an_exiting_owner_leaves_its_arena_to_the_last_holder():
    run_python(
        PRODUCER + textwrap.dedent("""

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(target=produce, args=(queue,))
            child.start()
            got = [queue.get(timeout=60) for _ in range(3)]
            child.join(60)
            assert child.exitcode == 0
            arena = got[0].metadata.name
            assert os.path.exists("/dev/shm/" + arena)  # the producer is gone, its arena not
            assert [float(a.sum()) for a in got] == [0.0, 1000.0, 2000.0]
            for a in got:
                a.unlink_on_del()
            del got, a
            # The last block freed: its holder unlinks the arena.
            assert not os.path.exists("/dev/shm/" + arena)
        """)
    )


def test_many_cycles_leave_nothing_and_the_pool_returns_to_idle():
    run_python(
        """
        import multiprocessing as mp, os
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm

        N = 100_000

        def consume(queue, out):
            total = 0
            while (arr := queue.get()) is not None:
                arr.unlink_on_del()
                total += int(arr[0])
                del arr
            out.put(total)

        def fds():
            return len(os.listdir("/proc/self/fd"))

        if __name__ == "__main__":
            SharedMemoryArray.enable_recycling(16 << 20)
            ctx = mp.get_context("spawn")
            queue, out = ctx.Queue(maxsize=8), ctx.Queue()
            child = ctx.Process(target=consume, args=(queue, out))
            child.start()
            SharedMemoryArray((1,), np.uint8).unlink_on_del()  # joins the session: one socket
            base_fds = fds()
            for i in range(N):
                arr = SharedMemoryArray((64,), np.uint8)
                arr[0] = i % 7
                queue.put(arr)
                del arr
            queue.put(None)
            assert out.get(timeout=300) == sum(i % 7 for i in range(N))
            child.join(60)
            st = _shm.pool_stats()
            assert st["taken"] == N + 1 and st["fallbacks"] == 0, st
            assert st["blocks_in_use"] == 0, st
            assert st["arenas"] <= 2, st  # a few blocks in flight at a time
            _shm.pool_trim(0.0)
            st = _shm.pool_stats()
            assert st["arenas"] == 0 and st["arena_bytes"] == 0, st
            assert fds() <= base_fds  # none per array (the reaper's launch pipe may close meanwhile)
            prefix = os.environ["GRAIN_SHM_SESSION"]
            assert not [n for n in os.listdir("/dev/shm") if prefix in n]
        """,
        timeout=600,
        env={"GRAIN_SHM_SESSION": ""},
    )


def test_the_environment_turns_it_on_in_every_process_that_inherits_it():
    proc = run_python(
        """
        import multiprocessing as mp
        import numpy as np
        from grain_shm import SharedMemoryArray

        def child(queue):
            arr = SharedMemoryArray((8,), np.uint8)
            arr.unlink_on_del()
            queue.put(arr.metadata.block is not None)

        if __name__ == "__main__":
            arr = SharedMemoryArray((8,), np.uint8)
            arr.unlink_on_del()
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            p = ctx.Process(target=child, args=(queue,))
            p.start()
            print(arr.metadata.block is not None, queue.get(timeout=60))
            p.join()
        """,
        env={"GRAIN_SHM_RECYCLE": "1"},
    )
    assert proc.stdout.split() == ["True", "True"]
    proc = run_python(
        "from grain_shm import _shm; print(_shm.pool_stats()['max_bytes'])",
        env={"GRAIN_SHM_RECYCLE": str(8 * MiB)},
    )
    assert int(proc.stdout) == 8 * MiB
    proc = run_python(
        "from grain_shm import _shm; print(_shm.pool_stats()['max_bytes'])",
        env={"GRAIN_SHM_RECYCLE": "lots"},
    )
    assert int(proc.stdout) == 0 and "GRAIN_SHM_RECYCLE" in proc.stderr


def test_a_killed_producers_arena_goes_once_nothing_in_it_can_be_opened():
    run_python(
        PRODUCER + textwrap.dedent("""

        def produce_then_wait(queue):
            produce(queue)
            time.sleep(600)  # killed here: it never says it is gone

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(target=produce_then_wait, args=(queue,))
            child.start()
            got = [queue.get(timeout=60) for _ in range(3)]
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            arena = got[0].metadata.name
            keep = SharedMemoryArray.from_metadata(got[2].metadata)  # a mapping that stays
            for a in got:
                a.unlink_on_del()
            del a
            _shm.pool_trim(0.0)
            assert os.path.exists("/dev/shm/" + arena)  # their names are still linked
            del got
            _shm.pool_trim(0.0)
            assert not os.path.exists("/dev/shm/" + arena)  # nothing left to open
            assert float(keep.sum()) == 2000.0
        """)
    )


def test_random_forged_references_never_reach_outside_their_block():
    # In a child: a reference that reached outside would crash it or show here.
    run_python(
        """
        import dataclasses
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm

        try:
            from numpy.lib.array_utils import byte_bounds
        except ImportError:  # numpy 1.x
            byte_bounds = np.byte_bounds

        SharedMemoryArray.enable_recycling(16 << 20)
        # Blocks of the classes between powers of two too (320, 5120, 640).
        blocks = [SharedMemoryArray((n,), np.uint8)
                  for n in (1, 300, 300, 4096, 5000, 5000, 513, 640)]
        for b in blocks:
            b.unlink_on_del()
            b[:] = 7
        rng = np.random.default_rng(0)
        opened = refused = 0
        for _ in range(3000):
            target = blocks[rng.integers(len(blocks))]
            md = target.metadata
            ndim = int(rng.integers(0, 3))
            shape = tuple(int(d) for d in rng.integers(0, 70, ndim))
            strides = (None if rng.random() < 0.3 else
                       tuple(int(s) for s in rng.integers(-80, 80, ndim)))
            index, generation = md.block
            forged = dataclasses.replace(
                md, shape=shape, dtype=np.dtype(rng.choice(["u1", "i4", "f8"])),
                strides=strides,
                offset=md.offset + int(rng.integers(-300, 5300)),
                block=(index + int(rng.choice([0, 0, 0, 1, -1])),
                       generation + int(rng.choice([0, 0, 0, 1]))))
            try:
                arr = SharedMemoryArray.from_metadata(forged)
            except (ValueError, FileNotFoundError, OverflowError):
                refused += 1
                continue
            opened += 1
            # The block it opened: the target's, or a neighbour's (same size)
            # if the forged index named one and the offset lay inside it.
            (target,) = [b for b in blocks if (b.metadata.name, b.metadata.block)
                         == (forged.name, forged.block)]
            if arr.size:
                low, high = byte_bounds(arr)
                start, end = byte_bounds(target.view(np.ndarray))
                assert start <= low and high <= end, (forged, md)
                assert (arr.view(np.uint8) == 7).all() if arr.dtype == np.uint8 else True
            del arr
        assert opened > 100 and refused > 100, (opened, refused)
        for b in blocks:
            assert _shm.block_state(b.metadata.name, *b.metadata.block)[1] == 1
        print(opened, refused)
        """
    )


@pytest.mark.parametrize("max_bytes, error", [(0, ValueError), (-5, ValueError),
                                              (1.5, TypeError), ("1G", TypeError), (True, TypeError)])
def test_enable_recycling_refuses_bounds_that_are_not_byte_counts(max_bytes, error):
    with pytest.raises(error, match="max_bytes"):
        SharedMemoryArray.enable_recycling(max_bytes)

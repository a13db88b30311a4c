"""enable_async_del: releases deferred to the C deleter.

Enabling is one-way per process (as in Grain), so every scenario that
enables it runs in a fresh interpreter. The children check what a user can
see: names in /dev/shm, lines of /proc/self/maps, open fds, threads, and the
deleter's counters (`_shm.async_release_stats()`). `_shm._hold_async_release`
is a test-only switch that keeps the workers from taking new requests, so a
test can hold releases pending and watch the bound and fork at work.

The deleter serves segments of their own: a pool block's release is a few
atomics, done inline because a queue push would cost more. So these
children run with the pool off (GRAIN_SHM_RECYCLE=0) whatever the suite's
mode; tests/test_pool.py covers blocks with async release on.
"""

import os
import textwrap

import pytest

from grain_shm.names import SHM_DIR

from conftest import run_python
from grain_shm import SharedMemoryArray

PRELUDE = """\
import os, pickle, signal, sys, threading, time
import numpy as np
from grain_shm import SharedMemoryArray
from grain_shm import _shm
from grain_shm.names import SHM_DIR

def exists(name):
    return os.path.exists(os.path.join(SHM_DIR, name))

def shm_maps():
    with open("/proc/self/maps") as f:
        return [line for line in f if SHM_DIR + "/" in line]

def mapped(name):
    return any(line.rstrip().endswith(os.path.join(SHM_DIR, name)) for line in shm_maps())

def fds():
    return len(os.listdir("/proc/self/fd"))

def threads():
    return len(os.listdir("/proc/self/task"))

def settle(timeout=20):
    # Wait until the deleter has nothing queued or in flight.
    deadline = time.monotonic() + timeout
    while True:
        st = _shm.async_release_stats()
        if st["queued"] == 0 and st["in_flight"] == 0:
            return st
        assert time.monotonic() < deadline, f"deleter did not settle: {st}"
        time.sleep(0.002)

def wait_gone(name, timeout=20):
    deadline = time.monotonic() + timeout
    while exists(name):
        assert time.monotonic() < deadline, f"{name} was never unlinked"
        time.sleep(0.002)

def released(shape=(2, 2), dtype=np.int32):
    # Grain's _create_and_delete_shm: an owned array, dropped at once.
    arr = SharedMemoryArray(shape, dtype)
    arr.unlink_on_del()
    return arr.metadata.name

def warm_up():
    # The first array of a process may start helpers (a session reaper):
    # take baselines of fds, threads and mappings after it.
    released()

def wait_child(pid, timeout=60):
    # The child's exit status; a hang (deadlock) is a failure, not a stuck test.
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} hung (deadlock?)")
        time.sleep(0.005)
"""


def run(body, **kwargs):
    """Run `body` after PRELUDE in a fresh interpreter; it prints "ok" at the end."""
    env = {"GRAIN_SHM_RECYCLE": "0", **kwargs.pop("env", {})}
    proc = run_python(PRELUDE + textwrap.dedent(body) + '\nprint("ok")\n', env=env, **kwargs)
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout + proc.stderr
    return proc


# -- arguments ---------------------------------------------------------------
# A refused call enables nothing, so these run in this process.


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"num_threads": -1}, ValueError, "num_threads"),
        ({"num_threads": 65}, ValueError, "num_threads"),
        ({"num_threads": 1.0}, TypeError, "num_threads"),
        ({"num_threads": "2"}, TypeError, "num_threads"),
        ({"num_threads": True}, TypeError, "num_threads"),
        ({"num_threads": None}, TypeError, "num_threads"),
        ({"max_outstanding_requests": 0}, ValueError, "max_outstanding_requests"),
        ({"max_outstanding_requests": -5}, ValueError, "max_outstanding_requests"),
        ({"max_outstanding_requests": 2**20 + 1}, ValueError, "max_outstanding_requests"),
        ({"max_outstanding_requests": 10**30}, ValueError, "max_outstanding_requests"),
        ({"max_outstanding_requests": 2.5}, TypeError, "max_outstanding_requests"),
        ({"max_outstanding_requests": False}, TypeError, "max_outstanding_requests"),
    ],
)
def test_invalid_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        SharedMemoryArray.enable_async_del(**kwargs)
    from grain_shm import _shm

    assert _shm.async_release_stats()["num_threads"] == 0


def test_numpy_integers_accepted():
    run("""
        import numpy as np
        SharedMemoryArray.enable_async_del(np.int64(2), np.int32(7))
        st = _shm.async_release_stats()
        assert (st["num_threads"], st["max_outstanding"]) == (2, 7), st
    """)


# -- leaks -------------------------------------------------------------------


def test_10000_arrays_leave_no_segment_fd_or_mapping():
    run("""
        warm_up()
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=50)
        base_fds, base_maps = fds(), len(shm_maps())
        names = []
        for i in range(10_000):
            arr = SharedMemoryArray((64 << (i % 7),), np.uint8)
            arr.unlink_on_del()
            arr[0] = 1
            names.append(arr.metadata.name)
            del arr
        st = settle()
        assert st["deferred"] + st["refused"] == 10_000, st
        assert st["deferred"] > 5_000, st  # mostly asynchronous
        assert st["unlink_errors"] == 0, st
        left = [n for n in names if exists(n)]
        assert not left, left[:5]
        assert len(shm_maps()) == base_maps, shm_maps()[:5]
        assert fds() == base_fds
    """)


def test_4_threads_x_400_create_pickle_view_release():
    run("""
        warm_up()
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=50)
        base_fds, base_maps = fds(), len(shm_maps())
        names, errors = [], []

        def work(seed):
            try:
                for i in range(400):
                    arr = SharedMemoryArray((16 + (seed * 400 + i) % 500,), np.int64)
                    arr.unlink_on_del()
                    arr[:] = np.arange(arr.size) + seed
                    names.append(arr.metadata.name)
                    other = pickle.loads(pickle.dumps(arr))  # a second mapping
                    view = arr[1::2]
                    del arr  # the view keeps the segment
                    assert view[0] == 1 + seed and other[-1] == other.size - 1 + seed
                    del other
                    del view
            except BaseException as e:
                errors.append(repr(e))

        workers = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors, errors
        st = settle()
        assert st["unlink_errors"] == 0, st
        assert len(names) == 1600
        left = [n for n in names if exists(n)]
        assert not left, left[:5]
        assert len(shm_maps()) == base_maps
        assert fds() == base_fds
    """)


# -- the bound ---------------------------------------------------------------


def test_bound_releases_inline_when_full():
    run("""
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=3)
        _shm._hold_async_release(True)
        pending = [released((1 << 20,), np.uint8) for _ in range(3)]
        time.sleep(0.05)
        st = _shm.async_release_stats()
        assert st["queued"] == 3 and st["refused"] == 0, st
        assert all(exists(n) and mapped(n) for n in pending)  # held, not yet released

        name = released((1 << 20,), np.uint8)  # the bound is reached: inline
        assert not exists(name) and not mapped(name)
        assert _shm.async_release_stats()["refused"] == 1
        assert len(shm_maps()) == 3  # memory held by pending releases is bounded

        _shm._hold_async_release(False)
        for n in pending:
            wait_gone(n)
        st = settle()
        assert st["deferred"] == 3 and st["unlink_errors"] == 0, st
        assert not shm_maps()
    """)


def test_second_call_adds_no_thread_and_sets_the_bound():
    run("""
        warm_up()
        before = threads()
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=10)
        assert threads() == before + 2
        SharedMemoryArray.enable_async_del(num_threads=6, max_outstanding_requests=30)
        assert threads() == before + 2
        st = _shm.async_release_stats()
        assert (st["num_threads"], st["max_outstanding"]) == (2, 30), st

        # A lower bound takes effect at once; queued releases stay queued.
        _shm._hold_async_release(True)
        pending = [released() for _ in range(5)]
        SharedMemoryArray.enable_async_del(max_outstanding_requests=2)
        name = released()
        assert not exists(name) and all(exists(n) for n in pending)
        _shm._hold_async_release(False)
        for n in pending:
            wait_gone(n)
        assert threads() == before + 2
    """)


def test_disable_finishes_pending_and_stops_threads():
    run("""
        warm_up()
        before = threads()
        SharedMemoryArray.enable_async_del(num_threads=3, max_outstanding_requests=100)
        _shm._hold_async_release(True)
        pending = [released() for _ in range(20)]
        assert all(exists(n) for n in pending)
        SharedMemoryArray._disable_async_del()
        assert not any(exists(n) for n in pending)  # finished before it returns
        assert threads() == before
        name = released()  # inline again
        assert not exists(name)
        SharedMemoryArray.enable_async_del(num_threads=1, max_outstanding_requests=5)
        assert threads() == before + 1
        for n in [released() for _ in range(20)]:
            wait_gone(n)
    """)


# -- fork --------------------------------------------------------------------


def test_fork_with_full_queue_child_unmaps_but_never_unlinks():
    # The parent's queue is full and held at fork. The child must unmap what
    # it inherited from those pending releases, leave their names alone, and
    # have a working deleter of its own (threads started on first use).
    run("""
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=10)
        _shm._hold_async_release(True)
        pending = [released((4096,), np.uint8) for _ in range(10)]
        assert _shm.async_release_stats()["queued"] == 10
        keep = SharedMemoryArray((8,), np.uint8)
        keep.unlink_on_del()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                st = _shm.async_release_stats()
                assert st["queued"] == 0 and st["running"] == 0, st
                assert not any(mapped(n) for n in pending)
                assert all(exists(n) for n in pending)
                own = [released((4096,), np.uint8) for _ in range(30)]
                for n in own:
                    wait_gone(n)
                assert _shm.async_release_stats()["running"] == 2
                del keep  # inherited: unmapped, never unlinked by the child
                settle()
                assert not shm_maps(), shm_maps()
                # Exit normally with releases pending: they are finished.
                _shm._hold_async_release(True)
                late = [released() for _ in range(5)]
                os.write(w, " ".join(late).encode())
                os.close(w)
            except BaseException:
                import traceback
                traceback.print_exc()
                os._exit(1)
            sys.exit(0)
        os.close(w)
        assert wait_child(pid) == 0
        late = os.read(r, 4096).decode().split()
        assert len(late) == 5 and not any(exists(n) for n in late)
        assert all(exists(n) and mapped(n) for n in pending)  # still the parent's
        assert exists(keep.metadata.name)
        _shm._hold_async_release(False)
        for n in pending:
            wait_gone(n)
        st = settle()
        assert st["deferred"] == 10 and st["unlink_errors"] == 0, st
    """)


def test_fork_from_a_thread_while_parent_releases():
    # Parent: the main thread releases in a burst (small bound, so the queue
    # is often full) while another thread forks. No deadlock either side; the
    # children's releases complete; no parent name is unlinked by a child.
    run("""
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=8)
        keep = [SharedMemoryArray((64,), np.uint8) for _ in range(20)]
        for a in keep:
            a.unlink_on_del()
        stop = threading.Event()
        statuses = []

        def forker():
            for _ in range(8):
                time.sleep(0.02)
                pid = os.fork()
                if pid == 0:
                    ok = 1
                    try:
                        own = [released((1 << (6 + i % 12),), np.uint8) for i in range(60)]
                        for n in own:
                            wait_gone(n, timeout=10)
                        ok = 0
                    finally:
                        os._exit(ok)
                statuses.append(wait_child(pid))
            stop.set()

        t = threading.Thread(target=forker)
        t.start()
        count = 0
        while not stop.is_set():
            released((1 << (6 + count % 15),), np.uint8)
            count += 1
        t.join()
        assert statuses == [0] * 8, statuses
        assert count > 100, count
        assert all(exists(a.metadata.name) for a in keep)
        st = settle()
        assert st["unlink_errors"] == 0, st  # nobody unlinked a pending name first
        names = [a.metadata.name for a in keep]
        del a, keep
        for n in names:
            wait_gone(n)
    """)


def test_forked_child_releases_inherited_and_own_arrays_in_a_burst():
    # Child: releases every array it inherited (mapped, not owned by it) and
    # its own, from two threads, while the parent keeps releasing too.
    run("""
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=16)
        inherited = []
        for i in range(40):
            a = SharedMemoryArray((256,), np.uint8)
            a.unlink_on_del()
            inherited.append(a)
        opened = [pickle.loads(pickle.dumps(a)) for a in inherited[:10]]  # not owned
        parent_names = [a.metadata.name for a in inherited]
        _shm._hold_async_release(True)
        queued = [released() for _ in range(10)]  # pending in the parent at fork
        _shm._hold_async_release(False)
        pid = os.fork()
        if pid == 0:
            ok = 1
            try:
                own, errors = [], []

                def burst():
                    try:
                        for _ in range(200):
                            own.append(released((512,), np.uint8))
                    except BaseException as e:
                        errors.append(repr(e))

                t = threading.Thread(target=burst)
                t.start()
                del a
                while inherited:
                    inherited.pop()
                opened.clear()
                t.join()
                assert not errors, errors
                for n in own:
                    wait_gone(n)
                settle()
                assert not shm_maps(), shm_maps()  # all inherited mappings gone
                assert all(exists(n) for n in parent_names)
                ok = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(ok)
        mine = [released((1 << (6 + i % 10),), np.uint8) for i in range(500)]
        assert wait_child(pid) == 0
        assert all(exists(n) and mapped(n) for n in parent_names)
        for n in queued + mine:
            wait_gone(n)
        del a, opened
        inherited.clear()
        for n in parent_names:
            wait_gone(n)
        assert settle()["unlink_errors"] == 0
        assert not shm_maps()
    """)


# -- exit --------------------------------------------------------------------


def test_exit_with_pending_releases_loses_none():
    proc = run("""
        SharedMemoryArray.enable_async_del(num_threads=1, max_outstanding_requests=100)
        _shm._hold_async_release(True)  # the workers take nothing: all pending
        names = [released((1 << 20,), np.uint8) for _ in range(30)]
        assert all(exists(n) for n in names)
        assert _shm.async_release_stats()["queued"] == 30
        print(" ".join(names))
    """)
    names = proc.stdout.split("\n")[0].split()
    assert len(names) == 30
    assert not [n for n in names if os.path.exists(os.path.join(SHM_DIR, n))]
    assert proc.stderr == ""


def test_exit_mid_burst_from_threads():
    proc = run("""
        SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=1000)
        names = []

        def burst():
            for i in range(1500):
                names.append(released((1 << (6 + i % 14),), np.uint8))

        ts = [threading.Thread(target=burst) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print(" ".join(names))
    """)
    names = proc.stdout.split("\n")[0].split()
    assert len(names) == 3000
    assert not [n for n in names if os.path.exists(os.path.join(SHM_DIR, n))]
    assert proc.stderr == ""


def test_multiprocessing_worker_exit_finishes_pending_releases():
    # multiprocessing children leave via os._exit; the exit hook runs from
    # multiprocessing's finalizers instead of atexit.
    proc = run("""
        import multiprocessing as mp

        def worker(q):
            SharedMemoryArray.enable_async_del(num_threads=1, max_outstanding_requests=50)
            _shm._hold_async_release(True)
            q.put([released() for _ in range(20)])

        if __name__ == "__main__":
            q = mp.get_context("fork").Queue()
            p = mp.get_context("fork").Process(target=worker, args=(q,))
            p.start()
            names = q.get(timeout=60)
            p.join(60)
            assert p.exitcode == 0
            assert not any(exists(n) for n in names), names
    """)
    assert proc.stderr == ""


# -- Grain's own async-del tests, ported -------------------------------------
# grain/_src/python/ipc/shared_memory_array_test.py. Grain's versions patch
# SharedMemoryArray.close_shm_async; ours hold the C workers and count
# completed releases instead.


def test_grain_async_unlink_limit():
    run("""
        SharedMemoryArray._disable_async_del()
        SharedMemoryArray.enable_async_del(max_outstanding_requests=1)
        _shm._hold_async_release(True)  # Grain: close_shm_async waits on an event
        name = released()
        time.sleep(1)
        # Still there: the unlink request is async and has not progressed.
        assert exists(name)
        # All outstanding requests in use: this one is deleted right away.
        name_2 = released()
        assert not exists(name_2)
        _shm._hold_async_release(False)  # Grain: event.set()
        wait_gone(name)
    """)


def test_grain_del_no_pool():
    run("""
        SharedMemoryArray._disable_async_del()
        data = np.array([[1, 2], [3, 4]], dtype=np.int32)
        shm_array = SharedMemoryArray(data.shape, data.dtype)
        shm_array.unlink_on_del()
        name = shm_array.metadata.name
        del shm_array
        assert not exists(name)
    """)


def test_grain_del_many_async():
    run("""
        SharedMemoryArray._disable_async_del()
        SharedMemoryArray.enable_async_del(num_threads=4, max_outstanding_requests=20)
        names = [released() for _ in range(50)]
        for n in names:
            wait_gone(n)
    """)


def test_grain_del_many_async_reuse_pool():
    run("""
        max_outstanding_requests = 20
        SharedMemoryArray._disable_async_del()
        warm_up()
        SharedMemoryArray.enable_async_del(
            num_threads=4, max_outstanding_requests=max_outstanding_requests
        )
        pool_threads = threads()
        # first round of requests
        names = [released() for _ in range(max_outstanding_requests)]
        for n in names:
            wait_gone(n)
        # Grain counts calls to close_shm_async: here, releases the pool did.
        assert settle()["deferred"] == max_outstanding_requests
        # second round: the same pool is reused
        names = [released() for _ in range(max_outstanding_requests)]
        for n in names:
            wait_gone(n)
        assert settle()["deferred"] == 2 * max_outstanding_requests
        assert threads() == pool_threads
    """)

"""Many threads at once: create, fill, pickle, open, release.

Eight threads each run CYCLES cycles on their own arrays while a ninth forks
now and then, in a fresh interpreter per scenario (a race in the core can
crash it): the pool off and on, and each with the deleter on
(enable_async_del, which is one-way per process). On the default build the
GIL serialises the core and this passes today; on a free-threaded build with
PYTHON_GIL=0 it is the test that the core's process-wide state is guarded
(see "Free-threading" in docs/design.md).

What a user would see is checked, in the child:
- every array's bytes, read through the creator's array, a pickled copy and
  a copy opened from its metadata, after other threads churned meanwhile
  (a block handed out twice, or a mapping released early, changes them);
- every forked child sees an array made before the fork intact and makes
  one of its own, and exits 0;
- afterwards, no segment of the run is left in /dev/shm, no file descriptor
  is left open, and the pool holds no block and gives every arena back.
"""

import os
import sys
import sysconfig

import pytest

from conftest import run_python

# Cycles per thread with the pool on: a cycle is a few atomics there. With
# fresh segments a cycle is about ten system calls and a page fault per
# page, so those scenarios run a quarter of it; the four together add about
# 12 s to the suite here (16 s on the free-threaded build). GRAIN_SHM_THREAD_CYCLES overrides CYCLES (for a
# long run, or a quick look).
CYCLES = int(os.environ.get("GRAIN_SHM_THREAD_CYCLES", "10000"))
FRESH_CYCLES = CYCLES // 4
THREADS = 8
FORKS = 8  # forks during one scenario, spread over its run
LIVE = 4  # arrays each thread keeps alive at once, so releases interleave with creations

CHILD = """\
import gc, os, pickle, sys, threading, time, traceback, warnings
import numpy as np
import grain_shm
from grain_shm import SharedMemoryArray, _shm, session
from grain_shm.names import SHM_DIR

CYCLES, THREADS, FORKS, LIVE, POOL, ASYNC_DEL = (int(a) for a in sys.argv[1:])
# os.fork() with other threads running is what this test does on purpose.
warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)

if POOL:
    SharedMemoryArray.enable_recycling(64 << 20)
else:
    SharedMemoryArray._disable_recycling()  # whatever GRAIN_SHM_RECYCLE says
if ASYNC_DEL:
    SharedMemoryArray.enable_async_del(num_threads=2, max_outstanding_requests=64)

SIZES = (64, 4096, 65536, 200)  # bytes: pool classes 256 B, 4 KiB, 64 KiB; 200 rounds up

def fds():
    return sorted(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))

def own_segments():
    prefix = session.name_prefix()
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)} if os.path.isdir(SHM_DIR) else set()

def value(t, i):
    return (t * 1_000_003 + i) % 251

# The session is joined and its reaper started before anything is counted:
# its socket stays open until exit by design.
anchor = SharedMemoryArray((1000,), np.uint8)
anchor[:] = np.arange(1000) % 256
anchor.unlink_on_del()
session._launched.acquire(); session._launched.release()  # the reaper's launch is settled
gc.collect()
fds_before, segments_before = fds(), own_segments()

failures = []
running = threading.Event()

def check(arr, t, i, where):
    if not (arr == value(t, i)).all():
        failures.append(f"thread {t} cycle {i}: wrong bytes in {where}")

def worker(t):
    try:
        live = []
        for i in range(CYCLES):
            nbytes = SIZES[(t + i) % len(SIZES)]
            a = SharedMemoryArray((nbytes // 8,), np.int64) if i % 2 else SharedMemoryArray((nbytes,), np.uint8)
            a.fill(value(t, i))
            a.unlink_on_del()
            b = pickle.loads(pickle.dumps(a))
            c = SharedMemoryArray.from_metadata(a.metadata)
            check(b, t, i, "the unpickled array")
            check(c[1:], t, i, "the array opened from metadata")
            live.append((i, a, b))
            del a, b, c
            if len(live) > LIVE:  # checked after other threads had their turns
                j, a, b = live.pop(0)
                check(a, t, j, "the creator's array")
                check(b, t, j, "the unpickled array, later")
                del a, b
        for j, a, b in live:
            check(a, t, j, "the creator's array, at the end")
    except BaseException:
        failures.append(f"thread {t}: {traceback.format_exc()}")

EXPECTED_ANCHOR = bytes(range(256)) * 3 + bytes(range(232))

def forker():
    # Forks while the workers run; each child checks the anchor, makes an
    # array of its own, and leaves through os._exit, which skips every exit
    # hook: so it runs the one grain_shm's exit hook would (its own names,
    # then the pool block references it inherited at fork). The child reads
    # and writes arrays through the buffer protocol, not numpy's ufuncs:
    # numpy's free-threaded build guards its ufunc dispatch with a rwlock
    # that another thread may hold at the fork, and the child would wait on
    # it for ever (seen with numpy 2.4 on 3.13t).
    try:
        for k in range(FORKS):
            time.sleep(0.01 + 0.002 * k)
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    mine = SharedMemoryArray((4096,), np.uint8)
                    memoryview(mine)[:] = b"\7" * 4096
                    back = pickle.loads(pickle.dumps(mine))
                    mine.unlink_on_del()
                    if bytes(memoryview(anchor)) == EXPECTED_ANCHOR and bytes(memoryview(back)) == b"\7" * 4096:
                        status = 0
                    del mine, back
                    session._unlink_owned_at_exit(leaving_through_os_exit=True)
                finally:
                    os._exit(status)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failures.append(f"fork {k}: child exited with status {status:#x}")
    except BaseException:
        failures.append(f"forker: {traceback.format_exc()}")

threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
threads.append(threading.Thread(target=forker))
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if not (anchor == np.arange(1000) % 256).all():
    failures.append("the anchor array changed")
del anchor

if ASYNC_DEL:
    SharedMemoryArray._disable_async_del()  # finish every pending release
gc.collect()
stats = _shm.pool_stats()
if stats["blocks_in_use"]:
    failures.append(f"pool blocks still in use: {stats}")
_shm.pool_trim(0.0)
stats = _shm.pool_stats()
if stats["arenas"] or stats["arena_bytes"]:
    failures.append(f"the pool did not return to idle: {stats}")
if POOL and not stats["taken"]:
    failures.append(f"the pool was never used: {stats}")
leaked = own_segments() - segments_before
if leaked:
    failures.append(f"segments left in {SHM_DIR}: {sorted(leaked)}")
if fds() != fds_before:
    failures.append(f"file descriptors before {fds_before}, after {fds()}")
if failures:
    print(f"{len(failures)} failures; the first ones:", *failures[:10], sep="\\n")
    sys.exit(1)
print("ok", sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("async_del", [False, True], ids=["inline-release", "async-del"])
@pytest.mark.parametrize("pool", [False, True], ids=["fresh", "pool"])
def test_threads_create_pickle_open_release_while_forking(pool, async_del):
    cycles = CYCLES if pool else FRESH_CYCLES
    args = [str(n) for n in (cycles, THREADS, FORKS, LIVE, int(pool), int(async_del))]
    proc = run_python(CHILD, args=args, timeout=600)
    assert proc.stdout.startswith("ok"), proc.stdout + proc.stderr


@pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"),
                    reason="needs a free-threaded CPython (3.13t, 3.14t)")
def test_import_leaves_the_gil_off():
    """grain_shm declares itself safe without the GIL: importing it and using
    an array leave the GIL off (an extension that does not declare it turns
    the GIL back on for the whole program, with a RuntimeWarning)."""
    proc = run_python(
        """
        import sys, warnings
        warnings.simplefilter("error", RuntimeWarning)
        import pickle
        import numpy as np
        import grain_shm
        a = grain_shm.SharedMemoryArray((8,), np.int64)
        a[:] = 3
        a.unlink_on_del()
        b = pickle.loads(pickle.dumps(a))
        print(sys._is_gil_enabled(), int(b.sum()))
        """,
        env={"PYTHON_GIL": None},  # the interpreter's own choice, not forced off
    )
    assert proc.stdout.split() == ["False", "24"], proc.stdout + proc.stderr

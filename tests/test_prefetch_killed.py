"""A worker that has to be killed (it ignored SIGTERM past the grace, or the
kernel's OOM killer took it) runs no exit hook: the consumer sweeps its pool
arenas, which would otherwise stay until the session ends (up to the pool's
bound per worker), and the arrays it already took from them stay readable."""

import os
import signal
import time

import numpy as np

from grain_shm import MultiprocessingOptions, SharedMemoryArray, admin, prefetch
from grain_shm.names import SHM_DIR, is_arena


def stubborn(i):
    """Item 0 as usual; then an array of another size class (an arena the
    consumer never maps), SIGTERM blocked, and a long sleep."""
    if i >= 1:
        kept = SharedMemoryArray((300_000,), np.uint8)  # held by the worker, never sent
        kept[:] = 1
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        time.sleep(60)
    return np.full(1000, i, np.int64)


def arenas_of(pid):
    owned = []
    for name in os.listdir(SHM_DIR):
        if is_arena(name):
            arena = admin.read_arena(os.path.join(SHM_DIR, name))
            if arena is not None and arena["owner_pid"] == pid:
                owned.append(name)
    return owned


def test_a_killed_workers_arenas_go_and_its_arrays_stay_readable():
    stream = prefetch(range(4), stubborn, options=MultiprocessingOptions(1, 1),
                      mp_context="fork", recycle=True)  # whatever earlier tests left
    first = next(stream)
    (worker,) = stream._workers.procs
    pid = worker.pid
    deadline = time.monotonic() + 30
    while len(arenas_of(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker is inside the stubborn part
    assert len(arenas_of(pid)) == 2
    started = time.monotonic()
    stream.close()  # SIGTERM is blocked: killed after the grace
    assert time.monotonic() - started >= 0.4  # it was the kill, not an exit
    assert arenas_of(pid) == []
    assert first.metadata.block is not None and (first == 0).all()


EARLY_STOP = """
import gc, os, sys, time
import numpy as np
import grain_shm._prefetch.consumer as consumer
from grain_shm import MultiprocessingOptions, _shm, prefetch, session

real_work = consumer._work

def slow_start(*args):
    time.sleep(0.3)  # a worker still starting (an import, say) when the stop comes
    real_work(*args)

def row(i):
    return np.ones(1000)

def ours():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(session.name_prefix()))

if __name__ == "__main__":
    first = prefetch(range(2), row, options=MultiprocessingOptions(1, 1), mp_context="fork")
    kept = next(first)  # a pooled block this process holds while the next workers fork
    assert kept.metadata.block is not None
    first.close()
    consumer._work = slow_start  # fork: the workers run it too
    second = prefetch(range(2), row, options=MultiprocessingOptions(1, 1), mp_context="fork")
    second._start()
    second.close()  # SIGTERM while the worker sleeps, before its handler is in
    del kept, first, second
    gc.collect()
    _shm.pool_trim(0.0)
    time.sleep(0.2)
    print("left", ours())
"""


def test_a_worker_stopped_before_its_handler_is_in_still_lets_go():
    """A forked worker holds a reference to every block its consumer held at
    the fork; a stop before its SIGTERM handler is installed must still run
    its exit hooks, or that reference keeps the block, and its arena, for
    the rest of the session."""
    from conftest import run_python

    proc = run_python(EARLY_STOP, env={"GRAIN_SHM_RECYCLE": "1"}, timeout=60)
    assert proc.stdout.strip() == "left []", proc.stdout + proc.stderr

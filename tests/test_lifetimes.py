"""Who unlinks, and when: process exit, fork, killed readers, big arrays."""

import signal
import subprocess
import sys
import textwrap

import pickle

import numpy as np
from _names import exists
from conftest import needs_shm_room, run_python

from grain_shm import SharedMemoryArray


def test_owned_arrays_alive_at_exit_are_unlinked_quietly():
    proc = run_python(
        """
        import numpy as np
        from grain_shm import SharedMemoryArray
        keep = []
        for i in range(5):
            arr = SharedMemoryArray((100 + i,), np.int32)
            arr.unlink_on_del()
            keep.append(arr[1:])  # a view keeps it alive to the end
        print(" ".join(pickle.dumps(a.metadata).hex() for a in keep))
        """.replace("import numpy", "import pickle, numpy")
    )
    refs = [pickle.loads(bytes.fromhex(h)) for h in proc.stdout.split()]
    assert len(refs) == 5
    assert not any(exists(md) for md in refs)
    assert proc.stderr == ""


def test_created_but_unowned_arrays_stay_for_the_receiver_after_exit():
    proc = run_python(
        """
        import numpy as np
        from grain_shm import SharedMemoryArray
        import pickle
        arr = SharedMemoryArray((10,), np.int64)
        arr[:] = 7
        print(pickle.dumps(arr.metadata).hex())
        """
    )
    md = pickle.loads(bytes.fromhex(proc.stdout.strip()))
    try:
        assert exists(md)
        assert SharedMemoryArray.from_metadata(md).sum() == 70
    finally:
        md.close_and_unlink_shm()


def test_multiprocessing_worker_exit_unlinks_what_it_owns():
    # multiprocessing children leave through os._exit, which skips atexit.
    run_python(
        """
        import multiprocessing as mp, os
        import numpy as np
        from grain_shm import SharedMemoryArray
        from _names import exists

        kept = []
        def work(queue):
            arr = SharedMemoryArray((64,), np.uint8)
            arr.unlink_on_del()
            kept.append(arr)
            queue.put(arr.metadata)

        if __name__ == "__main__":
            for method in ("spawn", "fork", "forkserver"):
                ctx = mp.get_context(method)
                queue = ctx.Queue()
                child = ctx.Process(target=work, args=(queue,))
                child.start()
                md = queue.get(timeout=60)
                child.join(60)
                assert child.exitcode == 0, (method, child.exitcode)
                assert not exists(md), method
        """,
        timeout=180,
    )


def test_a_forked_child_never_unlinks_the_parents_names():
    run_python(
        """
        import gc, os
        import numpy as np
        from grain_shm import SharedMemoryArray
        from _names import exists
        arr = SharedMemoryArray((32,), np.int32)
        arr.unlink_on_del()
        name = arr.metadata
        pid = os.fork()
        if pid == 0:
            # The child drops its inherited copy and makes one of its own.
            del arr
            gc.collect()
            mine = SharedMemoryArray((8,), np.int32)
            mine.unlink_on_del()
            mine_name = mine.metadata
            del mine
            os._exit(0 if exists(name) and not exists(mine_name) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert exists(name)
        arr[:] = 1  # the parent's mapping is untouched
        """,
        # A session of its own: with the pool on, the child's arena outlives
        # its os._exit (which skips every exit hook) until the session ends.
        env={"GRAIN_SHM_SESSION": ""},
    )


def test_a_child_that_marks_an_inherited_array_owns_it():
    run_python(
        """
        import os
        import numpy as np
        from grain_shm import SharedMemoryArray
        from _names import exists
        arr = SharedMemoryArray((32,), np.int32)
        name = arr.metadata
        pid = os.fork()
        if pid == 0:
            arr.unlink_on_del()
            del arr
            os._exit(0)
        os.waitpid(pid, 0)
        assert not exists(name)
        """
    )


READER = textwrap.dedent(
    """
    import pickle, sys, time
    import numpy as np
    from grain_shm import SharedMemoryArray
    md = pickle.loads(bytes.fromhex(sys.argv[1]))
    arr = SharedMemoryArray.from_metadata(md)
    print(int(arr[::4096].sum()), flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
    """
)


def test_readers_that_exit_or_are_sigkilled_unlink_nothing(fresh_segments):
    # A segment of its own: a killed reader's reference to a pool block stays
    # counted until the session ends (tests/test_pool.py covers that case).
    arr = SharedMemoryArray((1 << 20,), np.uint8)
    arr.unlink_on_del()
    arr[:] = 3
    name = arr.metadata
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, pickle.dumps(name).hex(), how],
                         stdout=subprocess.PIPE, text=True)
        for how in ("wait", "wait", "exit")
    ]
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == str(3 * 256)
        assert readers[2].wait(30) == 0
        for reader in readers[:2]:
            reader.send_signal(signal.SIGKILL)
            assert reader.wait(30) == -signal.SIGKILL
    finally:
        for reader in readers:
            reader.kill()
            reader.stdout.close()
    assert exists(name)
    assert arr.sum() == 3 * (1 << 20)  # the owner still reads its data


@needs_shm_room(1 << 30)
def test_one_gib_array_crosses_a_spawned_process():
    run_python(
        """
        import multiprocessing as mp
        import numpy as np
        from grain_shm import SharedMemoryArray

        def check(arr, queue):
            queue.put((arr.nbytes, int(arr[::4096].sum()), int(arr[-1])))
            arr[0] = 9

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            arr = SharedMemoryArray((1 << 30,), np.uint8)
            arr.unlink_on_del()
            arr[:] = 1
            arr[-1] = 5
            queue = ctx.Queue()
            child = ctx.Process(target=check, args=(arr, queue))
            child.start()
            assert queue.get(timeout=120) == (1 << 30, (1 << 30) // 4096, 5)
            child.join(60)
            assert child.exitcode == 0 and arr[0] == 9
        """,
        timeout=300,
    )


def test_an_owned_array_still_in_a_queue_at_exit_reaches_the_child():
    # multiprocessing joins children and flushes queues at exit; the owner's
    # unlink must come after that, or the child finds no segment.
    proc = run_python(
        """
        import multiprocessing as mp, pickle, sys, time
        import numpy as np
        from grain_shm import SharedMemoryArray

        def late_reader(queue, out):
            out.put("ready")
            time.sleep(1.0)
            arr = queue.get(timeout=30)
            assert float(arr.sum()) == 1000.0

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue, out = ctx.Queue(), ctx.Queue()
            ctx.Process(target=late_reader, args=(queue, out)).start()
            assert out.get(timeout=60) == "ready"  # it holds the queue's semaphores
            arr = SharedMemoryArray((1000,), np.float64)
            arr[:] = 1.0
            arr.unlink_on_del()
            queue.put(arr)
            print(pickle.dumps(arr.metadata).hex(), flush=True)
            # no join: the interpreter's exit joins the reader, which must
            # still find the segment after this process has begun to exit
        """,
        timeout=120,
    )
    assert proc.stderr == "", proc.stderr
    assert not exists(pickle.loads(bytes.fromhex(proc.stdout.split()[0])))


def test_forks_do_not_pile_up_exit_hooks():
    run_python(
        """
        import os
        from multiprocessing import util
        import grain_shm
        from grain_shm import session

        def hooks():
            finalizers = [f for f in list(util._finalizer_registry.values())
                          if f._callback is session._unlink_owned_at_exit
                          and f._pid == os.getpid()]
            return len(finalizers), len(util._afterfork_registry)

        start = hooks()
        for depth in range(3):
            pid = os.fork()
            if pid:
                assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
                break
            assert hooks() == start, (depth, hooks(), start)
        else:
            os._exit(0)
        if depth:
            os._exit(0)
        """
    )

"""References last as long as anything can use them (issue 16).

At exit a receiver used to give up its block references in grain_shm's exit
hook, but atexit handlers registered before it run after it: the owner could
reuse the block meanwhile, and the exiting process read another array's
bytes. With fresh segments the mapping simply stays valid; with the pool the
references are now dropped only after the interpreter is finalized (a C exit
hook, atomics only), so the late handler reads its own bytes.
"""

import pytest

from conftest import run_python

RECEIVER = """
import atexit, sys

def late():
    # Registered before grain_shm's exit hook, so it runs after it.
    sys.stdout.write("hook ran\\n"); sys.stdout.flush()
    sys.stdin.readline()  # the owner has taken every block it could meanwhile
    print("read", int(arr.min()), int(arr.max()), flush=True)

atexit.register(late)
if sys.argv[1] == "multiprocessing":
    import multiprocessing.util  # grain_shm's exit hook is then one of its finalizers
import pickle
import numpy as np
from grain_shm import SharedMemoryArray
arr = pickle.loads(bytes.fromhex(sys.stdin.readline()))
arr.unlink_on_del()
print("opened", flush=True)
"""


@pytest.mark.parametrize("hooked_by", ["atexit", "multiprocessing"])
def test_a_late_exit_handler_reads_its_own_bytes_while_the_owner_reuses_blocks(hooked_by):
    proc = run_python(f"""
        import pickle, subprocess, sys
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm

        SharedMemoryArray.enable_recycling(64 << 20)
        mine = SharedMemoryArray((1 << 20,), np.uint8)  # block 0 of an arena of 4
        mine[:] = 1
        receiver = subprocess.Popen([sys.executable, "-c", {RECEIVER!r}, {hooked_by!r}],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        receiver.stdin.write(pickle.dumps(mine).hex() + "\\n"); receiver.stdin.flush()
        assert receiver.stdout.readline() == "opened\\n"
        del mine  # the receiver's reference is the block's last
        assert receiver.stdout.readline() == "hook ran\\n"
        others = []
        for _ in range(8):  # every free block of the arena, the first again if it is free
            other = SharedMemoryArray((1 << 20,), np.uint8)
            other.unlink_on_del()
            other[:] = 2
            others.append(other)
        receiver.stdin.write("go\\n"); receiver.stdin.flush()
        print(receiver.stdout.readline().strip())
        assert receiver.wait() == 0
    """)
    assert proc.stdout.splitlines()[-1] == "read 1 1", proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_fork_started_worker_still_gives_its_references_back(method):
    """A multiprocessing child started by fork or forkserver leaves through
    os._exit, which skips the C exit hook: its references are dropped in its
    exit handler, or the owner's block would stay taken until the session
    ends. (A forkserver child gets the array by pickle: a reference opened.)"""
    proc = run_python(f"""
        import multiprocessing as mp
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm
        from _names import references

        def read(arr, done):
            assert int(arr[0]) == 4
            done.set()

        if __name__ == "__main__":
            SharedMemoryArray.enable_recycling(64 << 20)
            arr = SharedMemoryArray((4096,), np.uint8)
            arr.unlink_on_del()
            arr[:] = 4
            ctx = mp.get_context({method!r})
            done = ctx.Event()
            worker = ctx.Process(target=read, args=(arr.view(SharedMemoryArray)[:], done))
            worker.start(); worker.join()
            assert worker.exitcode == 0 and done.is_set()
            print(references(arr))
    """)
    assert proc.stdout.split() == ["1"], proc.stdout + proc.stderr

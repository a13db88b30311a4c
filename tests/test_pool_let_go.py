"""Receivers let go of arenas nothing here uses (issue 16).

tmpfs keeps a file's pages while anything maps it, so a receiver that keeps
a retired arena mapped in its cache pins that memory after its owner has
freed it. A foreign arena whose owner retired it or is gone, and in which
this process maps no live array, is unmapped at the next pool operation or
trim; before a full /dev/shm raises MemoryError, every foreign arena without
a live array is unmapped and the creation tried again: the pool never fails
where fresh segments would not.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import TESTS_DIR, run_python

PRIVATE_SHM = ("mount -t tmpfs -o size=64m tmpfs /dev/shm && "
               'exec "$0" "$@"')  # sh -c: $0 and $@ are the interpreter and its arguments


def run_in_private_shm(code, *args):
    """Run `code` in an interpreter with a /dev/shm of its own of 64 MiB
    (Docker's default): a new mount namespace, so nothing of the host's
    /dev/shm is touched or seen. Skips where that is not permitted."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a /dev/shm of its own")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here: {probe.stderr.strip()}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRAIN_SHM_SESSION", "GRAIN_SHM_RECYCLE")}  # a session of its own
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(code))
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_SHM,
             sys.executable, script, *args],
            capture_output=True, text=True, timeout=300, env=env)


AFTER_A_PREFETCHER = """
    import sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, SharedMemoryArray, _shm, prefetch

    def element(i):
        return np.full(2 << 20, i % 251, np.uint8)  # 2 MiB

    if __name__ == "__main__":
        if sys.argv[1] == "on":
            SharedMemoryArray.enable_recycling()
        with prefetch(range(24), element, options=MultiprocessingOptions(2, 2)) as items:
            for i, item in enumerate(items):
                assert item[0] == i % 251 and item[-1] == i % 251
                del item
        print("cached after the prefetcher:", _shm.pool_stats()["cached_arenas"])
        big = SharedMemoryArray((50 << 20,), np.uint8)  # of 64 MiB
        big.unlink_on_del()
        big[:] = 7
        assert int(big[::4096].sum()) == 7 * len(big[::4096])
        print("ok")
"""


@pytest.mark.parametrize("pool", ["off", "on"])
def test_a_large_array_after_a_prefetcher_fits_with_the_pool_as_without(pool):
    proc = run_in_private_shm(AFTER_A_PREFETCHER, pool)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "ok"


def test_a_retired_foreign_arena_is_unmapped_at_the_next_pool_operation():
    """The owner retires its arena (idle, trimmed) after the receiver let go
    of its last array there: the receiver's next pool operation unmaps it,
    so the file's pages are given back."""
    proc = run_python("""
        import os, pickle, subprocess, sys, textwrap
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm
        from grain_shm.names import SHM_DIR

        SharedMemoryArray.enable_recycling(64 << 20)
        owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent('''
            import pickle, sys
            import numpy as np
            from grain_shm import SharedMemoryArray, _shm
            SharedMemoryArray.enable_recycling(64 << 20)
            a = SharedMemoryArray((1 << 20,), np.uint8)
            a[:] = 5
            sys.stdout.buffer.write(pickle.dumps(a) + b"\\\\n")
            sys.stdout.flush()
            sys.stdin.readline()           # the receiver has opened it
            del a                          # not owned here: the receiver unlinks it
            sys.stdin.readline()           # the receiver let go of it
            _shm.pool_trim(0.0)            # all free: retired and unlinked
            print(_shm.pool_stats()["arenas"], flush=True)
            sys.stdin.readline()
        ''')], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        arr = pickle.loads(owner.stdout.readline())
        arr.unlink_on_del()
        name = arr.metadata.name
        assert int(arr[0]) == 5
        owner.stdin.write(b"opened\\n"); owner.stdin.flush()
        del arr
        assert _shm.pool_stats()["cached_arenas"] == 1  # the owner lives: kept
        owner.stdin.write(b"released\\n"); owner.stdin.flush()
        assert owner.stdout.readline().strip() == b"0"  # the owner retired it
        assert not os.path.exists(os.path.join(SHM_DIR, name))
        mine = SharedMemoryArray((100,), np.uint8)  # a pool operation
        mine.unlink_on_del()
        print(_shm.pool_stats()["cached_arenas"])
        owner.stdin.write(b"bye\\n"); owner.stdin.flush()
        owner.wait()
    """)
    assert proc.stdout.split() == ["0"], proc.stdout + proc.stderr


EXITING_OWNER = """
import pickle, sys
import numpy as np
from grain_shm import SharedMemoryArray
SharedMemoryArray.enable_recycling(64 << 20)
a = SharedMemoryArray((1 << 20,), np.uint8)
a[:] = 3
sys.stdout.buffer.write(pickle.dumps(a))
"""


def test_an_ownerless_foreign_arena_is_unmapped_when_its_last_array_here_goes():
    """The owner exits while the receiver still maps an array of its arena:
    the receiver's release of that array frees the arena and unmaps it."""
    proc = run_python(f"""
        import pickle, subprocess, sys
        import numpy as np
        from grain_shm import SharedMemoryArray, _shm

        SharedMemoryArray.enable_recycling(64 << 20)
        data = subprocess.run([sys.executable, "-c", {EXITING_OWNER!r}],
                              capture_output=True, check=True).stdout
        arr = pickle.loads(data)  # the owner has exited: the receiver's reference keeps it
        arr.unlink_on_del()
        assert int(arr[-1]) == 3
        print(_shm.pool_stats()["cached_arenas"])
        del arr
        print(_shm.pool_stats()["cached_arenas"])
    """)
    assert proc.stdout.split() == ["1", "0"], proc.stdout + proc.stderr

"""grain_shm.prefetch and os.fork(): a program that forks a helper (a
checkpoint writer, subprocess with preexec_fn) while a prefetcher runs keeps
its stream. The child's copy of the prefetcher is not the child's to stop:
its exit touches none of the parent's workers or their messages."""

import re

import pytest
from conftest import run_python

# CPython 3.13's ResourceTracker.__del__ waits for the tracker process, which
# a forked child inherits the handle of but is not the parent of: it prints
# an ignored ChildProcessError at that child's exit. The interpreter's noise
# (the spawn context started the tracker), not grain_shm's.
TRACKER_NOISE = re.compile(
    r"Exception ignored in: <function ResourceTracker\.__del__ .*?"
    r"ChildProcessError: \[Errno 10\] No child processes\n", re.S)

FORK_MID_STREAM = """
    import os, sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch

    def row(i):
        return np.full(1024, i, np.float32)

    if __name__ == "__main__":
        stream = prefetch(range(100), row, batch_size=4 if sys.argv[2] == "batches" else None,
                          options=MultiprocessingOptions(2, 2), mp_context=sys.argv[1])
        got = [next(stream) for _ in range(5)]  # the workers run; their buffers fill
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: atexit handlers, finalizers, multiprocessing's
        _, status = os.waitpid(pid, 0)
        print("child exited", os.waitstatus_to_exitcode(status))
        got += list(stream)
        values = [int(v) for item in got for v in np.atleast_2d(item)[:, 0]]
        print("stream", "whole" if values == list(range(100)) else values)
"""


@pytest.mark.parametrize("context, shape", [("fork", "elements"), ("spawn", "batches")])
def test_a_fork_child_that_exits_leaves_the_parents_stream_whole(context, shape):
    proc = run_python(FORK_MID_STREAM, timeout=90, args=(context, shape))
    assert proc.stdout.splitlines() == ["child exited 0", "stream whole"], proc.stderr
    assert TRACKER_NOISE.sub("", proc.stderr) == ""


CHILD_READS_ON = """
    import os, sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch

    if __name__ == "__main__":
        stream = prefetch(np.arange(20), options=MultiprocessingOptions(2, 1),
                          mp_context="fork")
        head = [int(next(stream)) for _ in range(3)]
        pid = os.fork()
        if pid == 0:  # its copy reads on where the stream stood, on workers of its own
            rest = [int(x) for x in stream]
            os._exit(0 if rest == list(range(3, 20)) else 1)
        _, status = os.waitpid(pid, 0)
        rest = [int(x) for x in stream]
        print(os.waitstatus_to_exitcode(status), head + rest == list(range(20)))
"""


def test_a_fork_childs_copy_reads_on_with_workers_of_its_own():
    proc = run_python(CHILD_READS_ON, timeout=90)
    assert proc.stdout == "0 True\n", proc.stderr

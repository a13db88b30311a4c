"""Messages that help (issue 20, 5): what `break` does, profiling a user
sees without configuring logging, a full /dev/shm in a worker, exceptions
that do not pickle, and no internal name printed at shutdown."""

import multiprocessing
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import run_python

from grain_shm import MultiprocessingOptions, prefetch


def row(i):
    return np.full(16, i)


def test_break_leaves_the_workers_until_close():
    """As the README says: `break` stops nothing (the loop may go on where it
    left); close(), the with block's end or collection does."""
    stream = prefetch(list(range(100)), row, options=MultiprocessingOptions(2, 1),
                      mp_context="fork")
    for item in stream:
        if item[0] == 3:
            break
    assert len(multiprocessing.active_children()) == 2
    assert int(next(stream)[0]) == 4  # it goes on where it left
    stream.close()
    assert multiprocessing.active_children() == []


def test_profiling_is_on_stderr_without_any_logging_configured():
    proc = run_python(
        """
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch

        def row(i):
            return np.full(16, i)

        if __name__ == "__main__":
            for _ in prefetch(range(8), row, batch_size=2,
                              options=MultiprocessingOptions(2, 1, enable_profiling=True)):
                pass
        """
    )
    assert "prefetch worker 0 at the end" in proc.stderr, proc.stderr
    assert "prefetch consumer at the end" in proc.stderr


def test_profiling_leaves_a_configured_logging_alone():
    proc = run_python(
        """
        import logging
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch

        def row(i):
            return np.full(16, i)

        if __name__ == "__main__":
            logging.basicConfig(level=logging.WARNING)  # the user's choice: no INFO
            for _ in prefetch(range(8), row, batch_size=2,
                              options=MultiprocessingOptions(2, 1, enable_profiling=True)):
                pass
        """
    )
    assert "prefetch worker" not in proc.stderr, proc.stderr


# -- A full /dev/shm

FULL = """
import numpy as np
from grain_shm import MultiprocessingOptions, prefetch

def big(i):
    return np.full(1 << 20, i, np.float32)   # 4 MiB

if __name__ == "__main__":
    try:
        for _ in prefetch(range(64), big, batch_size=4, options=MultiprocessingOptions(2, 2)):
            pass
    except MemoryError as error:
        print(str(error))
        print("".join(getattr(error, "__notes__", [])))
    else:
        print("no MemoryError")
"""


def _in_a_small_dev_shm(code, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private, small /dev/shm")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=8m tmpfs /dev/shm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here (root in a mount namespace): "
                    f"{probe.stderr.strip()}")
    script = tmp_path / "child.py"
    script.write_text(code)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} {script}"],
        capture_output=True, text=True, timeout=120)


def test_a_full_dev_shm_in_a_worker_names_the_batch_and_what_to_change(tmp_path):
    proc = _in_a_small_dev_shm(FULL, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "item 0" in text and "(4, 1048576) float32" in text and "16.0 MiB" in text, text
    assert "per_worker_buffer_size (2)" in text and "batch_size (4)" in text, text
    assert "python -m grain_shm doctor" in text, text
    assert "at element" not in text  # the batch failed, not an element


# -- Exceptions that do not pickle


class DecodeError(Exception):
    """Carries what cannot travel: pickling it fails in the worker."""

    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle
        self.offset = 17


def fail_with_a_lock(i):
    if i == 2:
        raise DecodeError("bad header", threading.Lock())
    return i


def test_an_exception_that_does_not_pickle_arrives_as_its_own_type():
    with pytest.raises(DecodeError, match="bad header") as error:
        list(prefetch(list(range(5)), fail_with_a_lock, options=MultiprocessingOptions(2),
                      mp_context="fork"))
    assert error.value.offset == 17  # what pickles of it travelled
    assert "fail_with_a_lock" in str(error.value.__cause__)  # the worker's traceback
    notes = "".join(getattr(error.value, "__notes__", []))
    if hasattr(error.value, "add_note"):
        assert "element 2" in notes and "did not pickle" in notes, notes


def fail_with_a_local_type(i):
    class LocalError(Exception):  # no consumer can import it
        pass

    if i == 1:
        raise LocalError("only here", threading.Lock())
    return i


def test_an_exception_of_a_type_the_consumer_cannot_import_names_it():
    with pytest.raises(RuntimeError, match="LocalError: .*only here"):
        list(prefetch(list(range(3)), fail_with_a_local_type, options=MultiprocessingOptions(2),
                      mp_context="fork"))


# -- Shutdown

STOPS = """
import random, sys, time
import numpy as np
from grain_shm import MultiprocessingOptions, prefetch

def row(i):
    return np.full(1024, i, np.float32)

if __name__ == "__main__":
    rng = random.Random(int(sys.argv[1]))
    for run in range(int(sys.argv[2])):
        length = rng.choice([4, 5, 8, 1000])  # short ones end as they are stopped
        stream = prefetch(range(length), row, batch_size=rng.choice([None, 2]),
                          options=MultiprocessingOptions(2, rng.choice([1, 4])),
                          mp_context=sys.argv[3])
        if length < 1000 and rng.random() < 0.5:
            for _ in stream:  # to the end: the workers stop while they finish
                pass
        else:
            next(stream)  # start the workers, then stop them at some moment of their work
            time.sleep(rng.random() * 0.01)
        stream.close()
    print("done")
"""


@pytest.mark.parametrize("context, runs", [("fork", 80), ("spawn", 10)])
def test_stopping_at_any_moment_prints_nothing(context, runs):
    proc = run_python(STOPS, args=("7", str(runs), context), timeout=240)
    assert proc.stdout == "done\n"
    assert proc.stderr == "", proc.stderr


LATE_SIGTERM = """
import os, signal, sys
import numpy as np
import grain_shm._prefetch.worker as worker
from grain_shm import MultiprocessingOptions, prefetch

def row(i):
    return np.full(16, i)

original = worker._discard

def discard_after_a_sigterm(arrays):
    # A SIGTERM (or two) as the worker leaves its loop: after every try of
    # its own, where nothing may catch what the handler raises.
    for _ in range(int(sys.argv[1])):
        os.kill(os.getpid(), signal.SIGTERM)
    original(arrays)

if __name__ == "__main__":
    worker._discard = discard_after_a_sigterm   # fork: the workers have it too
    for _ in range(3):
        assert [int(x[0]) for x in prefetch(range(6), row, options=MultiprocessingOptions(2),
                                            mp_context="fork")] == list(range(6))
    print("done")
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_sigterm_as_a_worker_ends_prints_nothing(signals):
    proc = run_python(LATE_SIGTERM, args=(str(signals),))
    assert proc.stdout == "done\n"
    assert "_Stop" not in proc.stderr and proc.stderr == "", proc.stderr


def test_an_exception_of_the_main_script_arrives_as_its_own_type_under_spawn():
    """A spawned worker knows the consumer's __main__ as __mp_main__, which
    multiprocessing makes importable in the consumer too."""
    proc = run_python(
        """
        import threading
        from grain_shm import MultiprocessingOptions, prefetch

        class BadHeader(Exception):
            pass

        def parse(i):
            if i == 1:
                raise BadHeader("no magic", threading.Lock())
            return i

        if __name__ == "__main__":
            try:
                list(prefetch(range(4), parse, options=MultiprocessingOptions(2)))
            except BadHeader as error:
                print("caught", error.args[0])
        """
    )
    assert proc.stdout == "caught no magic\n", proc.stderr

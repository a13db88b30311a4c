"""grain_shm.prefetch and a `__main__` a spawned worker cannot import
(`python -c`, stdin, an interactive session, a notebook): a transform or
source defined there is refused by `prefetch` itself, with the two fixes,
before any worker starts; from a script, or under fork, it works."""

import subprocess
import sys
import textwrap

import pytest
from conftest import run_python

PROGRAM = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch

    def double(i):
        return np.full(2, 2 * i)

    class Numbers:
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return i

    source, transform = (Numbers(), None) if sys.argv[-1] == "source" else (range(4), double)
    try:
        stream = prefetch(source, transform, options=MultiprocessingOptions(2, 1),
                          mp_context=sys.argv[-2])
    except TypeError as error:
        print("refused:", error)
        print("children", len(multiprocessing.active_children()))
    else:
        print("made", [np.asarray(x).tolist() for x in stream])
""")


def run(how, context, what="transform"):
    """PROGRAM in a fresh interpreter, as `python -c` or from stdin."""
    command = [sys.executable, "-c", PROGRAM] if how == "-c" else [sys.executable, "-"]
    proc = subprocess.run([*command, context, what], input=PROGRAM if how == "stdin" else None,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("how, context, what", [
    ("-c", "spawn", "transform"), ("stdin", "spawn", "transform"),
    ("-c", "forkserver", "transform"), ("-c", "spawn", "source"),
])
def test_a_callable_from_an_unimportable_main_is_refused_up_front(how, context, what):
    out = run(how, context, what)
    assert out.startswith(f"refused: the {what} "), out
    assert "__main__" in out and "define it in a module" in out and "mp_context='fork'" in out
    assert out.endswith("children 0\n")


def test_under_fork_the_same_program_works():
    assert run("-c", "fork") == "made [[0, 0], [2, 2], [4, 4], [6, 6]]\n"


def test_from_a_script_a_main_callable_works_under_spawn():
    proc = run_python(SCRIPT, args=("spawn",))
    assert proc.stdout == "made [[0, 0], [2, 2], [4, 4], [6, 6]]\n"


SCRIPT = """
    import sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch

    def double(i):
        return np.full(2, 2 * i)

    if __name__ == "__main__":
        stream = prefetch(range(4), double, options=MultiprocessingOptions(2, 1),
                          mp_context=sys.argv[1])
        print("made", [x.tolist() for x in stream])
"""

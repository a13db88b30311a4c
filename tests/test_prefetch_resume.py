"""grain_shm.prefetch checkpoints: a state taken after any item resumes at
exactly the next one, whatever the position, worker count, batch size,
shuffle or epoch boundary; and the consumer's check of what a worker sent
is an exception, also under `python -O` (this module runs again under -O).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_python

from grain_shm import MultiprocessingOptions, prefetch

HERE = os.path.dirname(os.path.abspath(__file__))

# 5 elements, 2 epochs, shuffled: 10 positions, so batches of 3 span the
# epoch boundary (positions 3-5) and the last one is short.
SOURCE = list(range(5))
STREAM = dict(shuffle_seed=3, num_epochs=2)


def element(i):
    return {"x": np.full(2, i, np.int64), "name": f"e{i}"}


def plain(tree):
    if isinstance(tree, dict):
        return {key: plain(value) for key, value in tree.items()}
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    return tree


def stream(num_workers, batch_size, context="fork"):
    return prefetch(SOURCE, element, options=MultiprocessingOptions(num_workers, 1),
                    batch_size=batch_size, mp_context=context, **STREAM)


@pytest.mark.parametrize("batch_size", [None, 3], ids=["elements", "batches"])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_a_state_taken_after_any_item_resumes_at_the_next(num_workers, batch_size):
    reference = [plain(item) for item in stream(0, batch_size)]
    assert len(reference) == (10 if batch_size is None else 4)
    states = []
    with stream(num_workers, batch_size) as first:
        states.append(json.loads(json.dumps(first.get_state())))
        for _ in reference:
            next(first)
            states.append(json.loads(json.dumps(first.get_state())))
    for position, state in enumerate(states):
        resumed = stream(num_workers, batch_size)
        resumed.set_state(state)
        with resumed:
            got = [plain(next(resumed)) for _ in reference[position:]]
            assert got == reference[position:], f"resumed at item {position}"
            with pytest.raises(StopIteration):
                next(resumed)


@pytest.mark.parametrize("batch_size", [None, 3], ids=["elements", "batches"])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_close_then_next_resumes_at_the_next_item(num_workers, batch_size):
    reference = [plain(item) for item in stream(0, batch_size)]
    got = []
    with stream(num_workers, batch_size) as restarted:
        for _ in reference:
            got.append(plain(next(restarted)))
            restarted.close()  # the next next() starts the workers again
    assert got == reference


def test_a_state_resumes_under_spawn_at_a_position_that_is_no_multiple_of_the_workers():
    reference = [plain(item) for item in stream(0, 3)]
    with stream(2, 3) as first:
        next(first)
        state = first.get_state()
    resumed = stream(2, 3, context="spawn")
    resumed.set_state(state)
    assert [plain(item) for item in resumed] == reference[1:]


WRONG_ITEM = """
    import sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch
    from grain_shm._prefetch import consumer

    real_work = consumer._work

    def one_item_ahead(worker, num_workers, first_item, *rest):
        real_work(worker, num_workers, first_item + 1, *rest)

    if __name__ == "__main__":
        print("optimize", sys.flags.optimize)
        consumer._work = one_item_ahead  # a worker out of step with the consumer
        try:
            list(prefetch(np.arange(10), options=MultiprocessingOptions(2, 1),
                          mp_context="fork"))
        except RuntimeError as error:
            print("RuntimeError:", error)
"""


@pytest.mark.parametrize("optimize", ["", "1"], ids=["plain", "-O"])
def test_a_worker_sending_the_wrong_item_is_a_runtime_error(optimize):
    proc = run_python(WRONG_ITEM, timeout=60, env={"PYTHONOPTIMIZE": optimize})  # "1": -O
    assert f"optimize {int(optimize or 0)}" in proc.stdout
    assert "RuntimeError: prefetch worker 0 sent item 1 where item 0 was due" in proc.stdout


@pytest.mark.skipif(sys.flags.optimize > 0, reason="this is the run under -O")
def test_this_module_passes_under_python_O():
    """The checks above must not be `assert`s, which -O removes: the same
    tests again, in an interpreter started with -O."""
    proc = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(HERE, "test_prefetch_resume.py"), "-k", "not passes_under_python_O"],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_pytest_checks_its_assertions_under_python_O():
    """What makes the -O run worth something: pytest rewrites a test's
    asserts into code -O keeps."""
    with pytest.raises(AssertionError):
        assert sys.flags.optimize < 0

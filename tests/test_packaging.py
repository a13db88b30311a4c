"""What an installed grain_shm must hold: the compiled core, its type stub,
the PEP 561 marker, metadata that matches the code, and a typed example that
runs. CI runs these against the installed wheel from outside the source
tree, so a file left out of the wheel fails here."""

import ast
import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
import time

import pytest

import grain_shm
from grain_shm import _shm
from grain_shm.names import SHM_DIR

PACKAGE_DIR = os.path.dirname(grain_shm.__file__)
HERE = os.path.dirname(os.path.abspath(__file__))


def test_core_is_a_compiled_extension():
    assert _shm.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert os.path.dirname(_shm.__file__) == PACKAGE_DIR


def test_typing_files_are_installed():
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "py.typed"))
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "_shm.pyi"))


def test_stub_names_the_public_core():
    """Everything the Python layer calls on the core is in the stub (mypy's
    stubtest, in .ci/run, checks the signatures)."""
    with open(os.path.join(PACKAGE_DIR, "_shm.pyi")) as stub:
        tree = ast.parse(stub.read())
    stubbed = {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    used = {"Segment", "create", "open", "unlink", "unlink_owned", "layout",
            "segment_of", "data_offset"}
    assert used <= stubbed
    assert all(callable(getattr(_shm, name)) for name in used)


def test_version_matches_distribution_metadata():
    assert importlib.metadata.version("grain_shm") == grain_shm.__version__


def test_typed_usage_example_runs():
    example = os.path.join(HERE, "typed_usage.py")
    proc = subprocess.run(
        [sys.executable, example], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_the_start_up_hook_is_installed_and_costs_nothing_unset():
    """grain_shm.pth sits in site-packages; without GRAIN_SHM_PATCH_GRAIN an
    interpreter imports nothing of grain_shm, with it grain_shm is loaded."""
    site_dir = os.path.dirname(PACKAGE_DIR)
    with open(os.path.join(site_dir, "grain_shm.pth")) as f:
        (line,) = f.read().splitlines()
    assert line.startswith("import os;") and "GRAIN_SHM_PATCH_GRAIN" in line
    probe = "import sys; print('grain_shm' in sys.modules, 'numpy' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_PATCH_GRAIN"}
    for value, expected in ((None, "False False"), ("0", "False False"), ("1", "True True")):
        if value is not None:
            env["GRAIN_SHM_PATCH_GRAIN"] = value
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip()
        assert out == expected, (value, out)


def test_import_leaves_heavy_modules_unimported():
    """What `import grain_shm` must not cost (issue 11: <= 10 ms beyond numpy,
    measured by benchmarks/fixed_costs.py): modules needed only by the reaper
    launch, the admin commands or multiprocessing are imported when used."""
    probe = ("import numpy, sys; before = set(sys.modules); import grain_shm; "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    env = {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_PATCH_GRAIN"}
    new = set(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.split())
    heavy = {"socket", "subprocess", "multiprocessing", "threading", "numpy.typing",
             "grain_shm.admin", "grain_shm.bench", "ctypes"}
    assert not new & heavy, sorted(new & heavy)


def test_first_array_imports_no_socket_module():
    """The first array joins the session (sockets, the reaper's launch) with
    the extension's own calls: even `_socket` costs 0.7 ms to import, a
    third of the first array's budget (first <= 2 ms more than the second)."""
    probe = ("import numpy, sys, grain_shm; before = set(sys.modules); "
             "a = grain_shm.SharedMemoryArray((4,)); a.unlink_on_del(); "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    env = {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_SESSION"}
    new = set(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.split())
    assert not new & {"_socket", "socket", "subprocess", "threading"}, sorted(new)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_programs():
    """The README's complete Python examples (those with a __main__ guard)."""
    if not os.path.exists(README):  # the tests run from outside the tree (CI, the wheel)
        return []
    import re

    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return [block for block in blocks if 'if __name__ == "__main__":' in block]


@pytest.mark.skipif(not _readme_programs(), reason="no README.md beside the tests")
@pytest.mark.parametrize("index", range(len(_readme_programs()) or 1))
def test_readme_examples_run_as_written(index, tmp_path):
    """What a user copies from the README runs, and leaves /dev/shm as it was."""
    script = tmp_path / "example.py"
    script.write_text(_readme_programs()[index])
    before = set(os.listdir(SHM_DIR))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
    deadline = time.monotonic() + 5  # the session's reaper sweeps what a program leaves
    while set(os.listdir(SHM_DIR)) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(os.listdir(SHM_DIR)) - before

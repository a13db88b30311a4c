"""Shared fixtures: every test must leave /dev/shm as it found it."""

import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from grain_shm import SharedMemoryArray, _shm, session
from grain_shm.names import SHM_DIR, shm_space

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def shm_entries():
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def own_entries():
    """Entries of this test run: its session's segments (children inherit the
    session). Other processes may share /dev/shm; their entries are not ours
    to judge or remove. This process's pool arenas that hold no array are
    returned first: what stays is what is in use."""
    gc.collect()
    _shm.pool_trim(0.0)
    prefix = session.name_prefix()
    return {name for name in shm_entries() if name.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail any test that leaves a segment of its own in /dev/shm (with the
    pool on: an arena that holds an array the test left)."""
    before = own_entries()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = own_entries() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # asynchronous releases and exiting children settle
    for name in leaked:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass
    assert not leaked, f"test left segments in {SHM_DIR}: {sorted(leaked)}"


@pytest.fixture
def fresh_segments():
    """The pool off while the test runs, whatever GRAIN_SHM_RECYCLE says: for
    tests about a segment of its own (its file's size or mode, as another
    program could change them; blocks share their arena's file)."""
    limit = _shm.pool_stats()["max_bytes"]
    _shm.disable_pool()
    yield
    if limit:
        SharedMemoryArray.enable_recycling(limit)


def run_python(code, *, timeout=120, env=None, check=True, args=()):
    """Run `code` as a script in a fresh interpreter (a file, so that
    multiprocessing's spawn can re-import its __main__); a crash (signal) is a
    test failure. In `env`, None removes a variable."""
    full_env = dict(os.environ)
    # The child can import tests/_names.py (exists() in both modes).
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, full_env.get("PYTHONPATH")) if p)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(code))
        proc = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    if check and proc.returncode != 0:
        how = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        pytest.fail(
            f"child interpreter failed ({how})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def needs_shm_room(nbytes):
    """Skip a test that needs `nbytes` free in /dev/shm where it has less
    (a container's 64 MiB): that is the machine's size, not a defect."""
    space = shm_space()
    free = space[1] if space else 0
    return pytest.mark.skipif(
        free < nbytes, reason=f"needs {nbytes >> 20} MiB free in {SHM_DIR}, which has {free >> 20}"
    )

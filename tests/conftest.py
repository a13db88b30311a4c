"""Shared fixtures: every test must leave /dev/shm as it found it."""

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from grain_shm import session
from grain_shm.names import SHM_DIR



def shm_entries():
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def own_entries():
    """Entries of this test run: its session's segments (children inherit the
    session). Other processes may share /dev/shm; their entries are not ours
    to judge or remove."""
    prefix = session.name_prefix()
    return {name for name in shm_entries() if name.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail any test that leaves a segment of its own in /dev/shm."""
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


def run_python(code, *, timeout=120, env=None, check=True, args=()):
    """Run `code` as a script in a fresh interpreter (a file, so that
    multiprocessing's spawn can re-import its __main__); a crash (signal) is a
    test failure."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
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

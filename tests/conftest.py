"""Shared fixtures: every test must leave /dev/shm as it found it."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

SHM_DIR = "/dev/shm"


def shm_entries():
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail any test that leaves a new entry in /dev/shm."""
    before = shm_entries()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = shm_entries() - before
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
    """Run `code` in a fresh interpreter; a crash (signal) is a test failure."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
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
        pytest.fail(f"child interpreter failed ({how})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc

"""Helpers for tests that run whole process trees: start one as a new session,
read what it reports, kill it, and find its reaper.

Every tree runs in its own process group (so a test can Ctrl-C or kill all of
it) with GRAIN_SHM_SESSION removed from its environment (so its root starts a
session of its own instead of joining the test runner's).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

from grain_shm.names import SHM_DIR


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_SESSION"}
    env.update(extra)
    return env


class Tree:
    """A Python script run as the root of a new session, in its own process group."""

    def __init__(self, tmp_path, code: str, *, env: dict | None = None, wrapper=()):
        script = tmp_path / f"root_{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(code))
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or clean_env(),
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def report(self, timeout: float = 60.0) -> dict:
        """The next line the root prints, as JSON."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill_group()
            raise AssertionError(f"the tree reported nothing; stderr:\n{self.proc.stderr.read()}")
        return json.loads(line)

    def finish(self, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Close the root's stdin (its cue to exit) and wait for it."""
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Kill whatever of the tree is left (not its reaper: it has its own group).

        multiprocessing's resource tracker is spared: once the others are gone
        it unlinks the tree's semaphores (/dev/shm/sem.*) and exits."""
        for pid in group_members(self.pid):
            if not _is_resource_tracker(pid):
                _kill(pid)
        try:
            self.proc.communicate(timeout=30)
        except (ValueError, subprocess.TimeoutExpired):
            pass
        deadline = time.monotonic() + 10
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill_group()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _is_resource_tracker(pid: int) -> bool:
    return b"resource_tracker" in _cmdline(pid)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def existing(names) -> list[str]:
    return [n for n in names if os.path.exists(os.path.join(SHM_DIR, n))]


def wait_gone(names, timeout: float = 5.0) -> float | None:
    """Seconds until none of `names` is in /dev/shm, or None if some stay."""
    start = time.monotonic()
    while existing(names):
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.002)
    return time.monotonic() - start


def reapers(session: str) -> list[int]:
    """Pids of the reaper processes of `session`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry)).split(b"\0")
        # Not the sh that launches it (or sh's child before its exec): their
        # argv holds the reaper's command line too.
        if (argv[0] != b"sh" and any(b"reaper.main" in a for a in argv)
                and session.encode() in argv):
            found.append(int(entry))
    return found


def wait_reaper(session: str, timeout: float = 10.0) -> list[int]:
    """The pids of `session`'s reaper once it runs: sh starts it in the
    background, so it may come up a little after the first array."""
    deadline = time.monotonic() + timeout
    while not (found := reapers(session)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def wait_reapers_gone(session: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while reapers(session):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

"""`python -m grain_shm ls | gc | doctor`, run as users run them."""

import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from grain_shm import admin, reaper
from grain_shm import names as names_mod

from _trees import (
    SHM_DIR, Tree, clean_env, existing, reapers, wait_gone, wait_reaper, wait_reapers_gone,
)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHM_DIR), reason="ls and gc read /dev/shm (Linux)"
)

# The trees that check segments make segments of their own, even where
# GRAIN_SHM_RECYCLE is set for the test run (arenas have tests of their own).
FRESH = {"GRAIN_SHM_RECYCLE": "0"}
LIVE_TREE = """
import json, sys
import numpy as np
from grain_shm import SharedMemoryArray, session
arrays = [SharedMemoryArray((1024,), np.uint8) for _ in range(3)]
print(json.dumps({"session": session.SESSION,
                  "names": [a.metadata.name for a in arrays]}), flush=True)
sys.stdin.read()
"""


def grain_shm(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "grain_shm", *args],
        capture_output=True, text=True, timeout=timeout, env=env or clean_env(),
    )


def fake_segments(session, count=2, size=4096):
    """Segment files named as `session` would name them, made without grain_shm."""
    names = []
    for _ in range(count):
        name = names_mod.segment_prefix(session) + secrets.token_urlsafe(9)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        names.append(name)
    return names


def dead_session():
    """The session id a process that has exited would have had."""
    proc = subprocess.Popen(["sleep", "60"])
    session = reaper.session_of(proc.pid, reaper.start_time(proc.pid), reaper.pid_namespace())
    proc.kill()
    proc.wait()
    return session


def remove(names):
    for name in existing(names):
        os.unlink(os.path.join(SHM_DIR, name))


@pytest.fixture
def live_tree(tmp_path):
    tree = Tree(tmp_path, LIVE_TREE, env=clean_env(**FRESH))
    info = tree.report()
    yield info
    tree.finish()
    tree.close()
    wait_gone(info["names"])
    wait_reapers_gone(info["session"])


def test_gc_removes_a_dead_sessions_segments_and_leaves_a_live_ones(live_tree):
    dead = fake_segments(dead_session(), size=8192)
    try:
        dry = grain_shm("gc", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert all(f"would free {name}" in dry.stdout for name in dead)
        assert existing(dead) == dead  # a dry run removes nothing

        gc = grain_shm("gc")
        assert gc.returncode == 0, gc.stderr
        assert existing(dead) == []
        assert all(f"freed {name}" in gc.stdout for name in dead)
        assert existing(live_tree["names"]) == live_tree["names"]
        for name in live_tree["names"]:
            assert name not in gc.stdout
    finally:
        remove(dead)


NEW_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


def _can_nest_pid_namespaces():
    if reaper.pid_namespace() != 0xEFFFFFFC or shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*NEW_PID_NAMESPACE, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_gc_judges_a_container_session_only_from_the_host(tmp_path):
    """A tree in its own pid namespace (a container sharing /dev/shm, as with
    `docker --ipc=host`): from the initial namespace gc sees its processes and
    so whether it lives; so does any namespace that shares its network
    namespace (the session's sockets); from another it cannot, and keeps it."""
    if not _can_nest_pid_namespaces():
        pytest.skip("needs root in the initial pid namespace, with unshare --pid")
    tree = Tree(tmp_path, LIVE_TREE, env=clean_env(**FRESH), wrapper=NEW_PID_NAMESPACE)
    try:
        info = tree.report()
        names = info["names"]
        assert reaper.root_alive(info["session"]) is None  # not our pids
        records = {r["name"]: r for r in json.loads(grain_shm("ls", "--json").stdout)}
        assert all(records[n]["alive"] is True for n in names)
        assert all(n not in grain_shm("gc").stdout for n in names)
        nested = subprocess.run(
            [*NEW_PID_NAMESPACE, sys.executable, "-m", "grain_shm", "ls", "--json"],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )
        records = {r["name"]: r for r in json.loads(nested.stdout)}
        assert all(records[n]["alive"] is True for n in names)  # by its sockets
        isolated = subprocess.run(
            [*NEW_PID_NAMESPACE, "--net", sys.executable, "-m", "grain_shm", "ls", "--json"],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )
        records = {r["name"]: r for r in json.loads(isolated.stdout)}
        assert all(records[n]["alive"] is None for n in names)  # unknown there
        assert all(records[n]["reaper"] is False for n in names)
        assert existing(names) == names
        # Its root is PID 1 there: no reaper, which would die with it anyway.
        assert not reapers(info["session"])

        # The container goes; gc from the host frees what it left.
        tree.kill_group()
        tree.proc.wait(timeout=30)
        assert existing(names) == names
        gc = grain_shm("gc")
        assert all(f"freed {n}" in gc.stdout for n in names), gc.stdout
        assert existing(names) == []
    finally:
        tree.close()
        remove(names)


def test_ls_json_describes_every_segment(live_tree):
    dead = fake_segments(dead_session(), count=1, size=12345)
    try:
        out = grain_shm("ls", "--json")
        assert out.returncode == 0, out.stderr
        records = {r["name"]: r for r in json.loads(out.stdout)}
        for name in live_tree["names"]:
            r = records[name]
            assert r["session"] == live_tree["session"]
            assert r["size"] == 1024
            assert r["alive"] is True and r["reaper"] is True
            assert r["root_pid"] == reaper.root_of(live_tree["session"])[0]
            assert r["persistent"] is False and r["age_s"] >= 0
        assert records[dead[0]]["alive"] is False
        assert records[dead[0]]["size"] == 12345

        table = grain_shm("ls")
        assert table.returncode == 0
        assert all(name in table.stdout for name in live_tree["names"] + dead)
        assert "DEAD" in table.stdout and "grain_shm gc" in table.stdout
    finally:
        remove(dead)


def test_doctor_on_this_machine():
    out = grain_shm("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "largest array that fits" in out.stdout
    assert "open files" in out.stdout


def _in_private_shm(setup):
    """Run `doctor` in a mount namespace whose /dev/shm is set up by `setup`."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    script = f"{setup} || exit 97; exec {sys.executable} -m grain_shm doctor"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )
    if proc.returncode == 97 or proc.stderr.startswith("unshare:"):
        pytest.skip(f"cannot make a private /dev/shm here: {proc.stderr.strip()}")
    return proc


def test_doctor_on_a_small_tmpfs_advises_enlarging_it():
    proc = _in_private_shm("mount -t tmpfs -o size=16m tmpfs /dev/shm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "16.0 MiB" in proc.stdout
    assert "--shm-size" in proc.stdout and "medium: Memory" in proc.stdout


def test_doctor_fails_on_a_read_only_shm():
    proc = _in_private_shm("mount -t tmpfs -o ro,size=16m tmpfs /dev/shm")
    assert proc.returncode != 0
    assert "read-only" in proc.stdout


def test_doctor_fails_without_shm():
    proc = _in_private_shm("mount -t tmpfs -o size=1m tmpfs /dev")
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout


POOLED_TREE = """
import json, sys
import numpy as np
from grain_shm import SharedMemoryArray, session
arrays = [SharedMemoryArray((1000,), np.uint8) for _ in range(3)]
for a in arrays:
    a.unlink_on_del()
print(json.dumps({"session": session.SESSION,
                  "names": sorted({a.metadata.name for a in arrays})}), flush=True)
sys.stdin.read()
"""


def test_ls_shows_a_pool_arena_with_its_blocks_in_use(tmp_path):
    tree = Tree(tmp_path, POOLED_TREE, env=clean_env(GRAIN_SHM_RECYCLE="1"))
    try:
        info = tree.report()
        (arena,) = info["names"]  # three arrays, one arena
        records = {r["name"]: r for r in json.loads(grain_shm("ls", "--json").stdout)}
        pool = records[arena]["arena"]
        assert pool["blocks_in_use"] == 3 and pool["bytes_in_use"] == 3000
        assert pool["block_bytes"] == 1024 and pool["bytes_wasted"] == 3 * 1024 - 3000
        assert pool["blocks"] == pool["blocks_in_use"] + pool["blocks_free"] > 3
        assert pool["bytes_free"] == pool["blocks_free"] * pool["block_bytes"]
        assert pool["owner_pid"] == tree.pid and pool["owner_gone"] is False
        table = grain_shm("ls").stdout
        assert f"3/{pool['blocks']} blocks of 1.0 KiB in use (2.9 KiB, 72 B wasted)" in table
        assert "1 pool arenas" in table
    finally:
        tree.finish()
        tree.close()
        wait_gone(info["names"])
        wait_reapers_gone(info["session"])


def fake_arena(session, header, size=8192):
    """A segment of `session` that starts with `header` (bytes), made by hand."""
    (name,) = fake_segments(session, count=1, size=size)
    with open(os.path.join(SHM_DIR, name), "r+b") as f:
        f.write(header)
    return name


def arena_header(nblocks, block_bytes, data_start, words, magic=b"grainshm", version=1):
    """gs_arena and its block table as _pool.h lays them out."""
    head = struct.pack("=8sIIQQQqIIQ24x", magic, version, nblocks, block_bytes,
                       data_start, 0, 1234, 0, 0, 0)
    return head + b"".join(struct.pack("=QQ", word, nbytes) for word, nbytes in words)


def test_ls_reads_an_arena_header_without_trusting_it():
    linked, referenced, free = (7 << 32) | 0x80000000, (7 << 32) | 2, 7 << 32
    blocks = [(linked, 100), (referenced, 256), (free, 5)]
    session = dead_session()
    good = fake_arena(session, arena_header(3, 1024, 4096, blocks))
    forged = [
        fake_arena(session, arena_header(3, 1024, 4096, blocks, version=2)),
        fake_arena(session, arena_header(3, 1024, 4096, blocks, magic=b"grainshx")),
        fake_arena(session, arena_header(3, 4096, 4096, blocks)),  # blocks past the end
        fake_arena(session, arena_header(3, 1024, 16384, blocks)),  # data past the end
        fake_arena(session, arena_header(1000, 1, 4096, blocks)),  # table past data_start
        fake_arena(session, arena_header(0, 1024, 4096, [])),
        fake_arena(session, b"grainshm", size=8),  # shorter than a header
    ]
    try:
        records = {r["name"]: r for r in json.loads(grain_shm("ls", "--json").stdout)}
        assert records[good]["arena"] == {
            "blocks": 3, "block_bytes": 1024, "blocks_in_use": 2, "bytes_in_use": 356,
            "bytes_wasted": 2 * 1024 - 356, "blocks_free": 1, "bytes_free": 1024, "owner_pid": 1234, "owner_gone": False,
        }
        for name in forged:
            assert records[name]["arena"] is None, name
    finally:
        remove([good, *forged])


def test_gc_removes_a_dead_sessions_arenas(tmp_path):
    """A pool's owner killed with its reaper: its arenas stay, named as its
    segments are, until gc finds the session dead."""
    tree = Tree(tmp_path, POOLED_TREE, env=clean_env(GRAIN_SHM_RECYCLE="1"))
    names = []
    try:
        info = tree.report()
        names = info["names"]
        for pid in wait_reaper(info["session"]):  # killed, or it would sweep at the end
            os.kill(pid, signal.SIGKILL)
        tree.kill_group()
        tree.proc.wait(timeout=30)
        assert wait_reapers_gone(info["session"])
        assert existing(names) == names
        records = {r["name"]: r for r in json.loads(grain_shm("ls", "--json").stdout)}
        assert all(records[n]["alive"] is False and records[n]["arena"] for n in names)
        gc = grain_shm("gc")
        assert all(f"freed {n}" in gc.stdout for n in names), gc.stdout
        assert existing(names) == []
    finally:
        tree.close()
        remove(names)


def test_doctor_shows_the_pools_bound():
    from grain_shm.array import _default_pool_bytes

    unset = {k: v for k, v in clean_env().items() if k != "GRAIN_SHM_RECYCLE"}
    off = grain_shm("doctor", env=unset).stdout
    assert "GRAIN_SHM_RECYCLE not set" in off
    default = _default_pool_bytes()
    assert f"default bound: {admin._human(default)}" in off
    on = grain_shm("doctor", env=clean_env(GRAIN_SHM_RECYCLE="100000000")).stdout
    assert "GRAIN_SHM_RECYCLE='100000000': on" in on and "bound 95.4 MiB" in on
    bad = grain_shm("doctor", env=clean_env(GRAIN_SHM_RECYCLE="lots"))
    assert "GRAIN_SHM_RECYCLE='lots': off (it takes 1 or a byte count)" in bad.stdout

"""Sessions and the reaper: whatever a process tree leaves in /dev/shm goes
when its root goes, however it goes; readers keep what they mapped."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_python

from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, reaper
from grain_shm import names as names_mod
from grain_shm import session as session_mod
from grain_shm.names import SHM_DIR

from _trees import Tree, clean_env, existing, reapers, wait_gone, wait_reapers_gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the reaper lists /dev/shm (Linux)"
)

# One root holding 20 segments: 10 of its own and 10 from a spawned worker,
# half of each owned (unlink_on_del), half not.
TWENTY = """
import json, multiprocessing as mp, pickle, sys, time
import numpy as np
import grain_shm
from grain_shm import SharedMemoryArray, session

def make(first):
    arrays = []
    for i in range(10):
        a = SharedMemoryArray((1000,), np.int64)
        a[:] = first + i
        if i % 2:
            a.unlink_on_del()
        arrays.append(a)
    return arrays

def worker(queue):
    arrays = make(100)
    queue.put([a.metadata for a in arrays])
    time.sleep(600)  # outlives the root: only the reaper can free its segments

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(queue,))
    proc.start()
    mine = make(0)
    theirs = queue.get()
    print(json.dumps({
        "session": session.SESSION,
        "names": [a.metadata.name for a in mine] + [m.name for m in theirs],
        "refs": [pickle.dumps(m).hex() for m in [a.metadata for a in mine] + theirs],
        "values": list(range(10)) + list(range(100, 110)),
        "worker": proc.pid,
    }), flush=True)
    sys.stdin.read()
"""


def test_a_member_outliving_the_root_keeps_the_session_until_it_dies(tmp_path):
    tree = Tree(tmp_path, TWENTY)
    try:
        info = tree.report()
        names = info["names"]
        assert len(names) == 20 and len(existing(names)) == 20
        assert len(reapers(info["session"])) == 1  # root and worker share one
        # A reader outside the tree (this process, another session) maps them all.
        readers = [
            SharedMemoryArray.from_metadata(pickle.loads(bytes.fromhex(ref)))
            for ref in info["refs"]
        ]
        os.kill(tree.pid, signal.SIGKILL)
        # The worker made segments and lives on: nothing of the session goes,
        # neither by the reaper nor by gc.
        time.sleep(1.5)
        assert len(existing(names)) == 20, "swept while a member lived"
        gc = subprocess.run([sys.executable, "-m", "grain_shm", "gc"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
        assert gc.returncode == 0 and len(existing(names)) == 20, gc.stdout
        os.kill(info["worker"], signal.SIGKILL)  # the last member
        latency = wait_gone(names)
        assert latency is not None, f"not reclaimed: {existing(names)}"
        print(f"reclaimed 20 segments {latency * 1000:.1f} ms after the last member's SIGKILL")
        assert latency < 1.0, f"reclaim took {latency:.2f} s (target: 1 s)"
        for arr, value in zip(readers, info["values"]):
            assert (arr == value).all()  # unlinking removed names, not memory
        del readers
    finally:
        tree.close()
    assert wait_reapers_gone(info["session"])


def test_sigkill_of_the_root_reclaims_within_a_second(tmp_path):
    tree = Tree(tmp_path, KEEP_UNTIL_STDIN_CLOSES)
    try:
        info = tree.report()
        assert len(existing(info["names"])) == 4
        os.kill(tree.pid, signal.SIGKILL)
        latency = wait_gone(info["names"])
        assert latency is not None and latency < 1.0, latency
    finally:
        tree.close()
    assert wait_reapers_gone(info["session"])


def test_sigkill_of_a_worker_leaves_the_tree_alone_until_the_root_exits(tmp_path):
    tree = Tree(tmp_path, """
        import json, multiprocessing as mp, os, signal, sys
        import numpy as np
        import grain_shm
        from grain_shm import SharedMemoryArray, session

        def worker(tag, commands, results):
            while commands.get() == "more":
                a = SharedMemoryArray((64,), np.int32)
                a[:] = tag
                results.put(a.metadata)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            commands = {t: ctx.Queue() for t in (1, 2)}
            procs = {t: ctx.Process(target=worker, args=(t, commands[t], results))
                     for t in (1, 2)}
            for p in procs.values():
                p.start()
            own = SharedMemoryArray((64,), np.int32)
            own[:] = 7
            made = {1: [], 2: []}
            for tag in (1, 2):
                for _ in range(3):
                    commands[tag].put("more")
                    made[tag].append(results.get())
            os.kill(procs[1].pid, signal.SIGKILL)
            procs[1].join()
            commands[2].put("more")  # the other worker goes on
            late = results.get()
            late_arr = SharedMemoryArray.from_metadata(late)
            opened = [SharedMemoryArray.from_metadata(m) for m in made[1] + made[2]]
            print(json.dumps({
                "killed_exitcode": procs[1].exitcode,
                "killed_names": [m.name for m in made[1]],
                "killed_still_there": [os.path.exists("/dev/shm/" + m.name) for m in made[1]],
                "values_ok": bool((own == 7).all() and (late_arr == 2).all()
                                  and all((a == t).all() for a, t in zip(opened, [1]*3 + [2]*3))),
                "all_names": [m.name for m in made[1] + made[2]] + [late.name, own.metadata.name],
            }), flush=True)
            commands[2].put("stop")
            procs[2].join()
    """)
    try:
        info = tree.report()
        assert info["killed_exitcode"] == -signal.SIGKILL
        assert info["values_ok"]
        assert all(info["killed_still_there"]), "reaped while the root lived"
        done = tree.finish()
        assert done.returncode == 0, done.stderr
        assert wait_gone(info["all_names"]) is not None, existing(info["all_names"])
    finally:
        tree.close()


KEEP_UNTIL_STDIN_CLOSES = """
import json, sys
import numpy as np
from grain_shm import SharedMemoryArray, session

arrays = [SharedMemoryArray((256,), np.float32) for _ in range(4)]
arrays[0].unlink_on_del()
print(json.dumps({"session": session.SESSION,
                  "names": [a.metadata.name for a in arrays]}), flush=True)
sys.stdin.read()
"""


def test_normal_exit_of_the_root_reclaims(tmp_path):
    tree = Tree(tmp_path, KEEP_UNTIL_STDIN_CLOSES)
    try:
        info = tree.report()
        assert len(existing(info["names"])) == 4
        assert tree.finish().returncode == 0
        assert wait_gone(info["names"]) is not None, existing(info["names"])
    finally:
        tree.close()
    assert wait_reapers_gone(info["session"])


def test_ctrl_c_of_the_whole_tree_reclaims(tmp_path):
    tree = Tree(tmp_path, KEEP_UNTIL_STDIN_CLOSES)
    try:
        info = tree.report()
        tree.kill_group(signal.SIGINT)  # what Ctrl-C in a terminal does
        tree.proc.wait(timeout=30)
        assert tree.proc.returncode != 0  # it died of KeyboardInterrupt
        assert "KeyboardInterrupt" in tree.proc.stderr.read()
        # The reaper has a process group of its own: the Ctrl-C missed it.
        assert wait_gone(info["names"]) is not None, existing(info["names"])
    finally:
        tree.close()
    assert wait_reapers_gone(info["session"])


def test_members_starting_at_once_share_one_reaper(tmp_path):
    tree = Tree(tmp_path, """
        import json, multiprocessing as mp, sys
        import numpy as np
        from grain_shm import SharedMemoryArray, session

        def worker(barrier, done):
            barrier.wait()
            a = SharedMemoryArray((8,), np.uint8)  # first creation: starts a reaper
            done.wait()

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            barrier, done = ctx.Barrier(5), ctx.Event()
            procs = [ctx.Process(target=worker, args=(barrier, done)) for _ in range(4)]
            for p in procs:
                p.start()
            barrier.wait()
            print(json.dumps({"session": session.SESSION}), flush=True)
            sys.stdin.readline()
            done.set()
            for p in procs:
                p.join()
    """)
    try:
        session = tree.report()["session"]
        deadline = time.monotonic() + 10
        while not reapers(session) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a second reaper, if any, would have started by now
        assert len(reapers(session)) == 1
        assert tree.finish().returncode == 0
    finally:
        tree.close()
    assert wait_reapers_gone(session)


HELPER = """
import json, os, sys, time
import numpy as np
from grain_shm import SharedMemoryArray, session

print("joined", flush=True)
sys.stdin.readline()  # EOF: the root is dead
arrays = []
for _ in range(3):
    a = SharedMemoryArray((16,), np.int16)
    a[:] = 5
    arrays.append(a)
    time.sleep(0.4)
info = {"session": session.SESSION, "names": [a.metadata.name for a in arrays],
        "there": [os.path.exists("/dev/shm/" + a.metadata.name) for a in arrays]}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def test_a_helper_that_outlives_the_root_keeps_its_segments_until_it_dies(tmp_path):
    # The reported case: a program starts a long-lived helper with
    # start_new_session=True, which joins the program's grain_shm session by
    # the environment, and makes its first arrays after the program is gone.
    helper, result = tmp_path / "helper.py", tmp_path / "result.json"
    helper.write_text(HELPER)
    tree = Tree(tmp_path, f"""
        import json, subprocess, sys
        import numpy as np
        from grain_shm import SharedMemoryArray, session
        a = SharedMemoryArray((8,), np.uint8)  # the root's reaper runs
        helper = subprocess.Popen([sys.executable, {str(helper)!r}, {str(result)!r}],
                                  start_new_session=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        helper.stdout.readline()  # it has imported grain_shm: it is of this session
        print(json.dumps({{"session": session.SESSION, "helper": helper.pid,
                           "root_name": a.metadata.name}}), flush=True)
        sys.stdin.read()
    """)
    helper_pid = None
    try:
        info = tree.report()
        helper_pid = info["helper"]
        os.kill(tree.pid, signal.SIGKILL)  # the helper is in another group: it lives
        deadline = time.monotonic() + 30
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        made = json.loads(result.read_text())
        assert made["session"] == info["session"]  # it joined the root's session
        assert all(made["there"]), "swept while the helper used them"
        gc = subprocess.run([sys.executable, "-m", "grain_shm", "gc"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
        assert gc.returncode == 0 and len(existing(made["names"])) == 3, gc.stdout
        ls = subprocess.run([sys.executable, "-m", "grain_shm", "ls", "--json"],
                            env=clean_env(), capture_output=True, text=True, timeout=60)
        records = {r["name"]: r for r in json.loads(ls.stdout)}
        assert all(records[n]["alive"] is True and records[n]["reaper"] for n in made["names"])
        os.kill(helper_pid, signal.SIGKILL)
        latency = wait_gone(made["names"] + [info["root_name"]])
        assert latency is not None and latency < 1.0, latency
    finally:
        if helper_pid:
            try:
                os.kill(helper_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tree.close()
    assert wait_reapers_gone(info["session"])


def test_no_reaper_where_it_would_be_the_roots_own_child():
    # A child subreaper adopts its orphaned descendants: a reaper would be its
    # child, and its reaping loop would wait for it for ever.
    proc = run_python(
        """
        import ctypes, json, os, signal
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
        import numpy as np
        from grain_shm import SharedMemoryArray, session
        arr = SharedMemoryArray((8,), np.uint8)
        signal.alarm(20)  # a hang fails the test instead of blocking it
        reaped = 0
        while True:  # a subreaper's reaping loop ends once no child is left
            try:
                os.wait()
                reaped += 1
            except ChildProcessError:
                break
        print(json.dumps({"session": session.SESSION, "name": arr.metadata.name}))
        """,
        env={"GRAIN_SHM_SESSION": ""},  # a session of its own
        timeout=60,
    )
    info = json.loads(proc.stdout)
    assert not reapers(info["session"])
    try:
        assert existing([info["name"]]) == [info["name"]]  # nobody reaped it...
        gc = subprocess.run([sys.executable, "-m", "grain_shm", "gc"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
        assert f"freed {info['name']}" in gc.stdout  # ...gc does, once the tree is gone
    finally:
        if existing([info["name"]]):
            os.unlink(os.path.join(SHM_DIR, info["name"]))


def test_a_stale_session_in_the_environment_is_not_joined():
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = reaper.session_of(sleeper.pid, reaper.start_time(sleeper.pid), reaper.pid_namespace())
    sleeper.kill()
    sleeper.wait()
    out = subprocess.run(
        [sys.executable, "-c", "import os; from grain_shm import session; "
         "print(session.SESSION, os.environ['GRAIN_SHM_SESSION'], os.getpid())"],
        env=clean_env(GRAIN_SHM_SESSION=dead), capture_output=True, text=True, timeout=60,
    )
    session, in_env, pid = out.stdout.split()
    assert session != dead and session == in_env
    assert reaper.root_of(session)[0] == int(pid)  # a new session rooted there


def test_names_are_short_unguessable_and_carry_the_session(tmp_path):
    tree = Tree(tmp_path, """
        import json, os
        import numpy as np
        from grain_shm import SharedMemoryArray, session
        # Segments of their own (the pool off): each draws a name.
        SharedMemoryArray._disable_recycling()
        names = []
        for _ in range(2000):
            a = SharedMemoryArray((1,), np.uint8)
            names.append(a.metadata.name)
            a.unlink_on_del()
            del a
        kept = SharedMemoryArray((1,), np.uint8)
        mode = os.stat("/dev/shm/" + kept.metadata.name).st_mode & 0o777
        kept.unlink_on_del()
        print(json.dumps({"session": session.SESSION, "pid": os.getpid(),
                          "names": names, "mode": mode}), flush=True)
    """)
    try:
        info = tree.report()
        assert tree.finish().returncode == 0
    finally:
        tree.close()
    session, names = info["session"], info["names"]
    assert info["mode"] == 0o600  # only its user may open it
    assert reaper.root_of(session)[0] == info["pid"]
    for name in names:
        assert len("/" + name) <= 30
        match = names_mod.SEGMENT_RE.fullmatch(name)
        assert match and match.group(1) == session, name
    suffixes = [n[-12:] for n in names]
    assert len(set(suffixes)) == len(suffixes)
    # 6 random bits per character: over 2000 names every position takes
    # (nearly) all 64 symbols; a counter or a clock would not.
    for position in range(12):
        assert len({s[position] for s in suffixes}) >= 56
    assert wait_reapers_gone(session)


def test_user_given_names_are_validated():
    for bad in ["", "/", "a/b", "../x", "a\0b", "x" * 300]:
        with pytest.raises(ValueError):
            SharedMemoryArray.from_metadata(SharedMemoryArrayMetadata(bad, (1,), np.uint8))


def test_a_persistent_segment_outlives_its_tree(tmp_path):
    tree = Tree(tmp_path, """
        import json, sys
        import numpy as np
        from grain_shm import SharedMemoryArray, session
        with session.persistent():
            kept = SharedMemoryArray((32,), np.int32)
        kept[:] = 42
        bound = SharedMemoryArray((32,), np.int32)
        print(json.dumps({"session": session.SESSION, "kept": kept.metadata.name,
                          "bound": bound.metadata.name}), flush=True)
        sys.stdin.read()
    """)
    kept = None
    try:
        info = tree.report()
        kept = info["kept"]
        assert kept.startswith(names_mod.PERSISTENT_PREFIX) and len("/" + kept) <= 30
        os.kill(tree.pid, signal.SIGKILL)
        assert wait_gone([info["bound"]]) is not None
        assert wait_reapers_gone(info["session"])
        gc = subprocess.run([sys.executable, "-m", "grain_shm", "gc"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
        assert gc.returncode == 0 and kept not in gc.stdout
        assert existing([kept]) == [kept]
        opened = SharedMemoryArray.from_metadata(SharedMemoryArrayMetadata(kept, (32,), np.int32))
        assert (opened == 42).all()
        opened.unlink_on_del()  # how its user removes it
        del opened
        assert existing([kept]) == []
    finally:
        tree.close()
        if kept and existing([kept]):
            os.unlink(os.path.join(SHM_DIR, kept))


def test_persistent_restores_the_session_prefix():
    with session_mod.persistent():
        with session_mod.persistent():
            pass
        inner = SharedMemoryArray((1,), np.uint8)
    outer = SharedMemoryArray((1,), np.uint8)
    try:
        assert inner.metadata.name.startswith(names_mod.PERSISTENT_PREFIX)
        assert outer.metadata.name.startswith(session_mod.SESSION_PREFIX)
    finally:
        inner.unlink_on_del()
        outer.unlink_on_del()


def test_persistent_holds_for_its_own_thread_only():
    import threading

    inside, made = threading.Event(), threading.Event()
    names = {}

    def keeper():
        with session_mod.persistent():
            inside.set()
            made.wait(30)  # another thread creates arrays meanwhile
            kept = SharedMemoryArray((1,), np.uint8)
            names["kept"] = kept.metadata.name
            kept.unlink_on_del()

    thread = threading.Thread(target=keeper)
    thread.start()
    assert inside.wait(30)
    others = [SharedMemoryArray((1,), np.uint8) for _ in range(3)]
    for a in others:
        a.unlink_on_del()
    made.set()
    thread.join(30)
    assert names["kept"].startswith(names_mod.PERSISTENT_PREFIX)
    assert all(a.metadata.name.startswith(session_mod.SESSION_PREFIX) for a in others)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_the_reaper_sees_its_root_die_and_not_a_recycled_pid(monkeypatch, pidfd):
    import threading

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        start = reaper.start_time(proc.pid)
        session = reaper.session_of(proc.pid, start, reaper.pid_namespace())
        impostor = reaper.session_of(proc.pid, start + 1, reaper.pid_namespace())
        assert reaper.root_alive(session) is True
        assert reaper.root_alive(impostor) is False  # same pid, other start time
        waiter = threading.Thread(target=reaper.wait_for_exit, args=(session,))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # still waiting: the root lives
        proc.kill()  # left a zombie, not waited for: dead all the same
        waiter.join(10)
        assert not waiter.is_alive()
        assert reaper.root_alive(session) is False
    finally:
        proc.kill()
        proc.wait()


def test_the_reaper_keeps_no_inherited_descriptor_open():
    # A pipe whose write end a program lets be inherited (a worker's
    # sentinel, say) must reach EOF once the program closes it: the reaper,
    # which outlives the program, must not hold it.
    proc = run_python(
        """
        import os, select
        import numpy as np
        from grain_shm import SharedMemoryArray
        r, w = os.pipe()
        os.set_inheritable(w, True)
        arr = SharedMemoryArray((8,), np.uint8)  # starts the reaper
        arr.unlink_on_del()
        os.close(w)
        ready, _, _ = select.select([r], [], [], 10)
        print("eof" if ready and os.read(r, 1) == b"" else "held open")
        """,
        env={"GRAIN_SHM_SESSION": ""},  # a session of its own, with its own reaper
    )
    assert proc.stdout.strip() == "eof"


def test_the_reaper_is_not_a_child_of_the_tree(tmp_path):
    # Code that waits for all its children (`while True: os.wait()`) must not
    # wait for the reaper, which lives as long as the root. (The sh that
    # starts it is a child for a moment, and reaped.)
    proc = run_python(
        """
        import os, time
        import numpy as np
        from grain_shm import SharedMemoryArray, reaper, session
        arr = SharedMemoryArray((8,), np.uint8)
        arr.unlink_on_del()
        deadline = time.monotonic() + 10
        verdict = "has children"
        while time.monotonic() < deadline:
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                verdict = "no children"
                break
            time.sleep(0.01)
        print(verdict)
        # it runs, elsewhere: it holds the session's socket now that sh is gone
        print("reaper" in reaper.registry().get(session.SESSION, ()))
        print(session.SESSION)
        """,
        env={"GRAIN_SHM_SESSION": ""},  # a session of its own, with its own reaper
    )
    verdict, running, session_id = proc.stdout.strip().rsplit("\n", 2)
    assert verdict == "no children" and running == "True"
    assert wait_reapers_gone(session_id)


def test_the_session_sockets_behave_as_pythons_own():
    """join() relies on these: a refused connect starts a reaper, a silent
    reaper times out, a closed one reads as end of file."""
    import socket as socket_mod

    from grain_shm import _shm

    address = f"\0grain_shm.test.{os.getpid()}.{time.monotonic_ns()}"
    fd = _shm.unix_socket()
    try:
        with pytest.raises(ConnectionRefusedError):
            _shm.unix_connect(fd, address)
        assert not os.get_inheritable(fd)  # sh and the reaper must not inherit it
    finally:
        os.close(fd)
    fd = _shm.unix_socket()
    try:
        with pytest.raises(OSError, match="File name too long"):
            _shm.unix_bind(fd, "\0" + "x" * 200)
    finally:
        os.close(fd)
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    fd = _shm.unix_socket()
    try:
        _shm.unix_connect(fd, address)
        peer, _ = listener.accept()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            _shm.recv_byte(fd, 0.05)
        assert time.monotonic() - started >= 0.04
        peer.send(reaper.WELCOME)
        assert _shm.recv_byte(fd, 1.0) == reaper.WELCOME
        peer.close()
        assert _shm.recv_byte(fd, 1.0) == b""
    finally:
        os.close(fd)
        listener.close()

"""Segment naming per process tree, the reaper that cleans up after it, and exit.

A session is a process tree: the first process to import grain_shm without
inheriting a live session is its root, and the session id goes into the
environment (GRAIN_SHM_SESSION), so every process started from the root
afterwards, by fork, spawn, forkserver or `subprocess`, joins it. The id
names the root (pid, start time, pid namespace; see grain_shm.reaper), and
every segment name carries it:

    /gs<13-char session>_<12 random chars>      29 characters with the "/"

The 12 random characters are 72 bits from getrandom, and creation uses
O_EXCL, so a name cannot be guessed or taken over.

The first segment a process creates starts the session's reaper, unless one
runs already (a per-process flag, then one socket bind per process; nothing
per array). The reaper unlinks the session's segments once the root has
exited, however it exited, SIGKILL included. Import grain_shm in the main
process before starting workers: then segments that workers create and send
to the main process live as long as the main process does.

To keep a segment after its tree is gone, create it inside `persistent()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import warnings
from multiprocessing import util
from collections.abc import Iterator

from grain_shm import _shm, reaper

SESSION_ENV = "GRAIN_SHM_SESSION"
NAME_PREFIX = "gs"


def _new_session() -> str:
    pid = os.getpid()
    return reaper.session_of(pid, reaper.start_time(pid) or 0, reaper.pid_namespace())


def _session_id() -> str:
    """The inherited session if its root still runs, else a new one rooted here.

    A dead or foreign root in the environment is a stale variable (exported by
    hand, or passed into a container): joining it would give this process's
    segments to a tree that no reaper watches."""
    inherited = os.environ.get(SESSION_ENV, "")
    if reaper.SESSION_RE.fullmatch(inherited) and reaper.root_alive(inherited):
        return inherited
    session = _new_session()
    os.environ[SESSION_ENV] = session
    return session


SESSION = _session_id()
SESSION_PREFIX = f"{NAME_PREFIX}{SESSION}_"


def name_prefix() -> str:
    """What the names of this session's segments start with (without "/")."""
    return SESSION_PREFIX


_shm.set_name_prefix(SESSION_PREFIX)

# Checked by SharedMemoryArray.__new__ before every creation; a forked child
# inherits True, which is right: it belongs to the same session.
reaper_started = False
_reaper_lock = threading.Lock()


def start_reaper() -> None:
    """Make sure the session's reaper runs; called once per process.

    The socket the reaper holds is bound here first, so of two members that
    get here at once only one starts a reaper. If the root has died already,
    the reaper sweeps at once."""
    global reaper_started
    with _reaper_lock:
        if reaper_started:
            return
        reaper_started = True
        if not sys.platform.startswith("linux") or not os.path.isdir(reaper.SHM_DIR):
            return  # segments cannot be listed here: nothing to sweep by name
        if not sys.executable:  # embedded without an interpreter to run
            warnings.warn("grain_shm: no sys.executable to run the session reaper")
            return
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            lock.bind(reaper.lock_address(SESSION))
        except OSError as e:
            lock.close()
            if e.errno != errno.EADDRINUSE:
                warnings.warn(f"grain_shm: cannot start the session reaper: {e}")
            return  # EADDRINUSE: a reaper runs for this session
        try:
            launcher = subprocess.Popen(
                # -S: the reaper needs only the standard library, and site
                # imports (.pth files) can cost tens of ms.
                [sys.executable, "-I", "-S", reaper.__file__, SESSION, str(lock.fileno())],
                pass_fds=(lock.fileno(),),
                start_new_session=True,  # a Ctrl-C to the tree does not reach it
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # holds no pipe of the tree open
                stderr=subprocess.DEVNULL,
                cwd="/",
            )
            # The launcher forks the reaper and exits at once, so the reaper is
            # not our child: a `while os.wait()` loop, or a tool that waits for
            # all children, never waits for it.
            launcher.wait()
        except OSError as e:
            warnings.warn(
                f"grain_shm: cannot start the session reaper ({e}); segments left "
                "by a crash stay until `python -m grain_shm gc`"
            )
        finally:
            lock.close()  # the reaper holds its own copy


_persistent_lock = threading.RLock()
_persistent_depth = 0


@contextlib.contextmanager
def persistent() -> Iterator[None]:
    """Segments created inside belong to no session: no reaper, no `gc`.

    For a segment that must outlive the process tree that makes it (one job
    fills it, a later one opens it by name). Their names are "/gsk_<12
    random chars>"; remove them with `unlink_shm`, `close_and_unlink_shm()`
    or `rm /dev/shm/gsk_*`. The setting is process-wide while the block runs
    (it changes the name prefix), so create the arrays meant to stay
    session-bound on other threads outside of it.
    """
    global _persistent_depth
    with _persistent_lock:
        if _persistent_depth == 0:
            _shm.set_name_prefix(reaper.PERSISTENT_PREFIX)
        _persistent_depth += 1
    try:
        yield
    finally:
        with _persistent_lock:
            _persistent_depth -= 1
            if _persistent_depth == 0:
                _shm.set_name_prefix(SESSION_PREFIX)


def _unlink_owned_at_exit() -> None:
    _shm.stop_async_release()  # pending releases first: their names are no longer owned
    _shm.unlink_owned()
    _shm.pool_at_exit()  # then this process's block references, and its arenas


def _register_exit_cleanup(*_: object) -> None:
    """Have multiprocessing's exit handler unlink what this process still owns.

    That handler runs at the main process's exit after it has joined its
    children and flushed its queues (which may still carry arrays it owns),
    and in multiprocessing workers, which leave through os._exit and skip
    atexit. Finalizers are per process: a forked multiprocessing worker
    drops the ones it inherited, then runs its after-fork hooks, which
    register ours again; a plain os.fork() child registers at fork."""
    util.Finalize(None, _unlink_owned_at_exit, exitpriority=-100)


def _after_fork_in_child() -> None:
    global _reaper_lock
    _reaper_lock = threading.Lock()  # the forking thread may have held it
    _register_exit_cleanup()


_register_exit_cleanup()
util.register_after_fork(_unlink_owned_at_exit, _register_exit_cleanup)
os.register_at_fork(after_in_child=_after_fork_in_child)

"""Segment naming per process tree, joining the tree's reaper, and exit.

A session is a process tree: the first process to import grain_shm without
inheriting a live session is its root, and the session id goes into the
environment (GRAIN_SHM_SESSION), so every process started from the root
afterwards, by fork, spawn, forkserver or `subprocess`, joins it. The id
names the root (pid, start time, pid namespace; see grain_shm.reaper), and
every segment name carries it (see grain_shm.names).

A process joins the session's registry at its first segment, created or
opened (a per-process flag; nothing per array): it holds one socket
connected to the session's reaper, starting the reaper if none runs. The
reaper unlinks the session's segments once the root and every process that
joined are gone, however they died, SIGKILL included; `gc` spares them
until then too. Import grain_shm in the main process before starting
workers, so that they join its session.

No reaper runs where it could not outlive the root: when the root (or the
process that would start it) is a child subreaper, or PID 1 of a pid
namespace, an orphaned reaper would become the tree's own child (a `while
True: os.wait()` loop would wait for it for ever) or die with PID 1. There,
`python -m grain_shm gc` removes what a dead tree left, and a container's
/dev/shm goes with the container.

To keep a segment after its tree is gone, create it inside `persistent()`.
"""

from __future__ import annotations

import atexit
import contextlib
import _signal  # type: ignore[import-not-found]  # not signal: it builds enums (~0.7 ms)
import _thread  # not threading, which costs ~1 ms to import
import contextvars
import errno
import os
import sys
from collections.abc import Iterator

from grain_shm import _shm, names, reaper

SESSION_ENV = "GRAIN_SHM_SESSION"


def _new_session() -> str:
    pid = os.getpid()
    return reaper.session_of(pid, reaper.start_time(pid) or 0, reaper.pid_namespace())


def _session_id() -> str:
    """The inherited session if it is alive, else a new one rooted here.

    A dead or foreign session in the environment is a stale variable
    (exported by hand, or passed into a container): joining it would give
    this process's segments to a tree that no reaper watches."""
    inherited = os.environ.get(SESSION_ENV, "")
    if names.SESSION_RE.fullmatch(inherited) and (
        reaper.root_alive(inherited) or inherited in reaper.registry()
    ):
        return inherited
    session = _new_session()
    os.environ[SESSION_ENV] = session
    return session


SESSION = _session_id()
SESSION_PREFIX = names.segment_prefix(SESSION)
_PREFIX = contextvars.ContextVar("grain_shm_prefix", default=SESSION_PREFIX.encode())


def name_prefix() -> str:
    """What the names of this session's segments start with (without "/")."""
    return SESSION_PREFIX


def creation_prefix() -> bytes:
    """The prefix for a segment created now, in this thread (see persistent())."""
    return _PREFIX.get()


@contextlib.contextmanager
def persistent() -> Iterator[None]:
    """Segments created inside belong to no session: no reaper, no `gc`.

    For a segment that must outlive the process tree that makes it (one job
    fills it, a later one opens it by name). Their names are "/gsk_<12
    random chars>"; remove them with `unlink_shm`, `close_and_unlink_shm()`
    or `rm /dev/shm/gsk_*`. It holds for the current thread (context) only:
    arrays other threads create meanwhile stay session-bound.
    """
    token = _PREFIX.set(names.PERSISTENT_PREFIX.encode())
    try:
        yield
    finally:
        _PREFIX.reset(token)


# Checked by SharedMemoryArray before every creation and open; a forked child
# inherits True, which is right: it inherits the connection too.
joined = False
_join_lock = _thread.allocate_lock()
_member: int | None = None  # this process's registration (a socket): held until exit


def join() -> None:
    """Join the session's registry; called once per process."""
    global joined, _member
    with _join_lock:
        if joined:
            return
        try:
            _join()
        finally:
            # Only now: the unlocked check before every creation and open
            # must mean "joined", not "another thread is joining" (without
            # the GIL that thread may still be connecting).
            joined = True


def _join() -> None:
    """join() under its lock: connect to the session's reaper, or start it."""
    global _member
    if not sys.platform.startswith("linux") or not os.path.isdir(names.SHM_DIR):
        return  # segments cannot be listed here: nothing to sweep by name
    # Plain file descriptors from the extension: even _socket costs
    # ~0.7 ms to import, a third of this whole first-array path.
    for _ in range(3):  # a reaper may be exiting just now: then start one
        _member = member = _shm.unix_socket()
        try:
            _shm.unix_bind(member, names.member_address(SESSION, os.getpid()))
        except OSError:
            pass  # our pid's name is held by a forked child of a former us
        try:
            _shm.unix_connect(member, names.reaper_address(SESSION))
        except (ConnectionRefusedError, FileNotFoundError):
            if _start_reaper(member):
                return
            os.close(member)
            _member = None
            continue
        except OSError:
            return  # e.g. a full backlog: registered by name only
        if reaper.root_alive(SESSION):
            return  # the reaper cannot be exiting while the root lives
        try:
            if _shm.recv_byte(member, 1.0) == reaper.WELCOME:
                return
        except TimeoutError:
            return  # slow, not exiting: it welcomes us later
        except OSError:
            pass
        os.close(member)
        _member = None


_launched = _thread.allocate_lock()  # held while a launch is under way


def _start_reaper(member: int) -> bool:
    """Bind the session's reaper socket, connect `member` to it, and start
    the reaper on it: False if another process bound it first. The
    connection waits in the socket's backlog until the reaper accepts it, so
    nothing here waits for the reaper, nor for sh to finish: sh is started
    here (once it runs, the reaper starts whatever happens to this process),
    and reaped on a short-lived thread."""
    listener = _shm.unix_socket()
    try:
        _shm.unix_bind(listener, names.reaper_address(SESSION))
        _shm.unix_listen(listener, 4096)
        _shm.unix_connect(member, names.reaper_address(SESSION))
        # PID 1 (of a container, say) would be the orphaned reaper's parent,
        # and kills it when it dies.
        pid_1 = os.getpid() == 1 or reaper.root_of(SESSION)[0] == 1
        if sys.executable and os.path.exists("/bin/sh") and not pid_1:
            sh, pid_pipe = _spawn(listener)
            _launched.acquire()
            # The thread starts with every signal blocked: a Ctrl-C the
            # kernel gave it would not interrupt the main thread's wait.
            # _thread, not threading: Thread.start() waits until the thread runs.
            mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
            try:
                _thread.start_new_thread(_settle, (sh, pid_pipe))
            finally:
                _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:  # someone else just started one
            return False
        import warnings

        warnings.warn(
            f"grain_shm: cannot start the session reaper ({e}); segments left "
            "by a crash stay until `python -m grain_shm gc`",
            stacklevel=4,
        )
    finally:
        os.close(listener)  # sh, then the reaper, hold their own copies
    return True


def _spawn(listener_fd: int) -> tuple[int, int]:
    """Start /bin/sh, which starts the reaper in the background and prints
    its pid: (sh's pid, the pipe to read that from)."""
    read_end, write_end = os.pipe()
    os.set_inheritable(listener_fd, True)
    try:
        sh = os.posix_spawn(
            "/bin/sh",
            ["sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh",
             # -I -S: the reaper needs only the standard library, and site
             # imports (.pth files) can cost tens of ms.
             sys.executable, "-I", "-S", "-c", reaper.BOOTSTRAP,
             os.path.dirname(reaper.__file__), SESSION, str(listener_fd)],
            os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, write_end, 1)],
            setsid=True,  # a Ctrl-C to the tree does not reach it
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        os.set_inheritable(listener_fd, False)
    return sh, read_end


def _settle(sh: int, pid_pipe: int) -> None:
    """Reap sh; and if the orphaned reaper's new parent is this process or
    the root (a child subreaper, or PID 1 of a pid namespace), it would be
    the tree's child: stop it before Python has even started."""
    try:
        # One line, not up to EOF: a process forked meanwhile by another
        # thread may hold the write end.
        with os.fdopen(pid_pipe, "rb") as out:
            pid = int(out.readline() or 0)
        _reap(sh)
        if pid and reaper.parent_of(pid) in (os.getpid(), reaper.root_of(SESSION)[0]):
            os.kill(pid, 9)
            if reaper.parent_of(pid) == os.getpid():
                _reap(pid)
    finally:
        _launched.release()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # the program's own `os.wait()` was first


def _unlink_owned_at_exit(leaving_through_os_exit: bool = False) -> None:
    """grain_shm's exit hook. A forked child about to leave through os._exit
    (which skips the interpreter's end, where block references go) may call
    it itself, saying so."""
    if _launched.acquire(timeout=5):  # a reaper for what this process leaves to others
        _launched.release()
    _shm.stop_async_release()  # pending releases first: their names are no longer owned
    _shm.unlink_owned()
    _shm.pool_at_exit(leaving_through_os_exit)  # then its block references, and its arenas


def _register_exit_cleanup(*_: object) -> None:
    """Have multiprocessing's exit handler unlink what this process still owns.

    That handler runs at the main process's exit after it has joined its
    children and flushed its queues (which may still carry arrays it owns),
    and in multiprocessing workers, which leave through os._exit and skip
    atexit. Finalizers are per process: a forked multiprocessing worker
    drops the ones it inherited, then runs its after-fork hooks, which
    register ours again; a plain os.fork() child registers at fork."""
    util = sys.modules["multiprocessing.util"]
    util.Finalize(None, _unlink_owned_at_exit, exitpriority=-100)


_hooked_multiprocessing = False


def _hook_multiprocessing() -> None:
    """Register with multiprocessing, once it is imported (see above)."""
    global _hooked_multiprocessing
    if "multiprocessing.util" in sys.modules and not _hooked_multiprocessing:
        _hooked_multiprocessing = True
        _register_exit_cleanup()
        sys.modules["multiprocessing.util"].register_after_fork(
            _unlink_owned_at_exit, _register_exit_cleanup
        )


def _after_fork_in_child() -> None:
    global _join_lock, _launched
    _join_lock = _thread.allocate_lock()  # the forking thread may have held it
    _launched = _thread.allocate_lock()  # a launch under way is the parent's
    if _hooked_multiprocessing:
        _register_exit_cleanup()
    else:  # imported since? Then this may be a multiprocessing worker
        _hook_multiprocessing()


# multiprocessing is not imported for this (it costs more than the rest of
# grain_shm's import): without it, atexit, whose handlers run last-registered
# first, so after the exit handler of a multiprocessing imported later.
if "multiprocessing.util" in sys.modules:
    _hook_multiprocessing()
else:
    atexit.register(_unlink_owned_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)

"""The reaper: one small process per session that unlinks what the tree left.

A session is named after its root process, so whether its root is alive can
be read off a segment's name by anyone:

    session = pid (5) + start tag (4) + namespace tag (4), base 36

- pid: the root's process id;
- start tag: the root's start time (clock ticks since boot, from
  /proc/<pid>/stat) modulo 36**4, so a recycled pid does not pass for the
  root (a false match needs the same pid at the same tick modulo 4.6 hours);
- namespace tag: the inode of the root's pid namespace modulo 36**4. A pid
  means nothing in another pid namespace (containers sharing /dev/shm with
  `--ipc=host`), so for this module a session of another namespace is
  "unknown" (root_alive() is None); only `gc` run as root in the initial pid
  namespace, which sees every process, can settle it (see grain_shm.admin).

A session outlives its root while any member lives: every process that
creates or opens a segment first joins the session (see session.join): it
binds its own abstract socket (@grain_shm.member.<session>.<pid>) and
connects it to the reaper's (@grain_shm.reaper.<session>). The kernel closes
both however the member dies. The reaper watches the root (a pidfd where
the kernel has one, else a 50 ms poll of its start time) and those
connections, and once the root and every member are gone it unlinks every
/dev/shm entry of the session and exits. Unlinking removes names only:
processes that map a segment keep reading it. `ls` and `gc` read the same
sockets from /proc/net/unix (registry()), so they judge liveness as the
reaper does, also where no reaper runs.

At most one reaper runs per session: binding its listening socket is the
lock. The member that binds it first connects to it, then starts the reaper
with it (session.join); the others connect. A member that connects after the
root died waits for the reaper's one-byte welcome: a reaper never sweeps
while it has a welcomed member, and one that is about to exit closes the
connection instead, so the member starts a new reaper.

The reaper process loads only this module and grain_shm.names (see
BOOTSTRAP): no numpy, no extension, no site .pth files. It is started through
/bin/sh (`cmd &`), so it is init's child, not the tree's. select, signal and
socket are imported where they are used: `import grain_shm` reads this
module's helpers and must stay cheap.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from grain_shm import names

if TYPE_CHECKING:
    import socket

TAG = 36**4
POLL_INTERVAL = 0.05
_HAVE_PROC = os.path.isdir("/proc/self")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
WELCOME = b"\1"

# `python -I -S -c BOOTSTRAP PACKAGE_DIR SESSION FD` runs main() with only this
# module and names.py of the package: an empty package object stands in for
# grain_shm, so its __init__ (numpy, the extension) never runs.
BOOTSTRAP = (
    "import sys, types; p = types.ModuleType('grain_shm'); p.__path__ = [sys.argv[1]]; "
    "sys.modules['grain_shm'] = p; from grain_shm import reaper; sys.exit(reaper.main(sys.argv))"
)


def _base36(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        out.append(_DIGITS[digit])
    if value:
        raise ValueError("does not fit")
    return "".join(reversed(out))


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (the state) on, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    return stat[stat.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is
    no such live process (a zombie is dead: it has exited, only unreaped).
    Off Linux, where there is no /proc, 0 for any live process."""
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def pid_namespace() -> int:
    """The inode of this process's pid namespace (0 where there is none)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def session_of(pid: int, start: int, namespace: int) -> str:
    """The session id of the tree rooted at `pid`."""
    return _base36(pid, 5) + _base36(start % TAG, 4) + _base36(namespace % TAG, 4)


def root_of(session: str) -> tuple[int, int, int]:
    """(pid, start tag, namespace tag) of a session id."""
    return int(session[:5], 36), int(session[5:9], 36), int(session[9:], 36)


def root_alive(session: str) -> bool | None:
    """Whether the session's root runs; None when it is another pid
    namespace's session, whose pids this process cannot check."""
    pid, start_tag, ns_tag = root_of(session)
    if ns_tag != pid_namespace() % TAG:
        return None
    start = start_time(pid)
    return start is not None and start % TAG == start_tag


def registry() -> dict[str, set[str]]:
    """Sessions that some live process has joined: session -> {"reaper",
    "member"}, from the abstract sockets in /proc/net/unix (this network
    namespace's; empty where it cannot be read)."""
    found: dict[str, set[str]] = {}
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) >= 8:
            parsed = names.parse_socket(fields[7])
            if parsed:
                found.setdefault(parsed[1], set()).add(parsed[0])
    return found


def sweep(session: str, shm_dir: str = names.SHM_DIR) -> list[tuple[str, int]]:
    """Unlink every segment of `session`; (name, size) of each one removed."""
    prefix = names.segment_prefix(session)
    removed: list[tuple[str, int]] = []
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in entries:
        if not name.startswith(prefix):
            continue
        path = os.path.join(shm_dir, name)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:
            continue  # already gone: its owner or another sweep was first
        removed.append((name, size))
    return removed


def open_root(session: str) -> int | None:
    """A pidfd of the session's root, readable once the root exits; None
    where the kernel has none (poll root_alive() then). ProcessLookupError
    if the root is gone already."""
    pid, _, _ = root_of(session)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError) as e:
        if isinstance(e, ProcessLookupError):
            raise
        return None
    # Checked after opening the pidfd: if the root is alive now, the pidfd is
    # the root's, not a process that recycled its pid.
    if not root_alive(session):
        os.close(pidfd)
        raise ProcessLookupError(pid)
    return pidfd


def wait_for_exit(session: str) -> None:
    """Return once the session's root has exited (at once if it already has)."""
    import select

    try:
        pidfd = open_root(session)
    except ProcessLookupError:
        return
    if pidfd is None:
        while root_alive(session):
            time.sleep(POLL_INTERVAL)
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():
            pass
    finally:
        os.close(pidfd)


def serve(session: str, listener: socket.socket) -> None:
    """Hold the members' connections; sweep once the root and all of them are
    gone, then return (the caller closes the listener)."""
    import select

    try:
        pidfd = open_root(session)
        root_gone = False
    except ProcessLookupError:
        pidfd, root_gone = None, True
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    members: dict[int, socket.socket] = {}
    listener.setblocking(False)

    def welcome() -> bool:
        """Accept every pending member; whether there was one."""
        accepted = False
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError:  # e.g. EMFILE: the member stays in the backlog
                return accepted
            try:
                conn.send(WELCOME)
            except OSError:
                conn.close()
                continue
            members[conn.fileno()] = conn
            poller.register(conn, select.POLLIN)
            accepted = True

    welcome()
    while True:
        if root_gone and not members:
            sweep(session)
            if not welcome():  # one that connected during the sweep is welcomed now
                return
            continue
        polling = pidfd is None and not root_gone
        for fd, _ in poller.poll(POLL_INTERVAL * 1000 if polling else None):
            if fd == listener.fileno():
                welcome()
            elif fd == pidfd:
                root_gone = True
                poller.unregister(pidfd)
                os.close(pidfd)
                pidfd = None
            elif fd in members:
                try:
                    data = members[fd].recv(64)
                except OSError:
                    data = b""
                if not data:  # the member is gone: the kernel closed its end
                    poller.unregister(fd)
                    members.pop(fd).close()
        if polling:
            root_gone = not root_alive(session)


def main(argv: list[str]) -> int:
    """`... SESSION LISTENER_FD`: serve the session until it is over, then exit."""
    import signal
    import socket

    session, fd = argv[-2], int(argv[-1])
    # Whatever else the launching process let be inherited (pipes whose end a
    # parent waits for, a worker's sentinel...) is not ours to keep open.
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    listener = socket.socket(fileno=fd)  # bound and listening: the session's lock
    # The tree's Ctrl-C, hang-up or stop signal (systemd sends SIGTERM to the
    # whole cgroup) must not kill the reaper before the tree is gone; it exits
    # by itself right after. SIGKILL still works.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    os.chdir("/")
    if not names.SESSION_RE.fullmatch(session) or root_alive(session) is None:
        return 2  # not a session this process can watch
    serve(session, listener)
    listener.close()
    return 0

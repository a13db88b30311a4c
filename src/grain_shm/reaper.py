"""The reaper: one small process per session that unlinks what the tree left.

A session is named after its root process, so whether a session is alive can
be read off a segment's name by anyone, with no registry to keep up to date:

    /gs<session>_<12 random chars>      29 characters with the "/"
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

The reaper watches the root (a pidfd where the kernel has one, else a 50 ms
poll of the start time) and, once the root is gone for any reason, unlinks
every /dev/shm entry of the session; it sweeps again a second later for
segments that surviving members made meanwhile, then exits. Unlinking removes
names only: processes that map a segment keep reading it.

At most one reaper runs per session: it holds the abstract Unix socket
"\\0grain_shm.reaper.<session>", which the kernel releases when the reaper
dies and which leaves nothing on disk. The member that binds it first
passes it to the reaper it starts (see session.start_reaper); the others see
EADDRINUSE and start nothing.

This file runs as a bare script (`python -I -S reaper.py SESSION FD`) so
the reaper imports neither numpy, the extension nor site's .pth files:
standard library only. It forks at once and the launched process exits, so
the reaper is init's child, not the tree's. The session and admin modules
import its helpers.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import sys
import time

SHM_DIR = "/dev/shm"
SESSION_RE = re.compile(r"[0-9a-z]{13}")
# A segment of a session, and one made under session.persistent().
SEGMENT_RE = re.compile(r"gs([0-9a-z]{13})_[A-Za-z0-9_-]{12}")
PERSISTENT_PREFIX = "gsk_"
PERSISTENT_RE = re.compile(r"gsk_[A-Za-z0-9_-]{12}")

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
TAG = 36**4
POLL_INTERVAL = 0.05
_HAVE_PROC = os.path.isdir("/proc/self")
RESWEEP_AFTER = 1.0


def _base36(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        out.append(_DIGITS[digit])
    if value:
        raise ValueError("does not fit")
    return "".join(reversed(out))


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
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


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


def lock_address(session: str) -> str:
    return f"\0grain_shm.reaper.{session}"


def reaper_running(session: str) -> bool:
    """Whether some process holds the session's reaper socket (without taking it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(lock_address(session))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def sweep(session: str, shm_dir: str = SHM_DIR) -> list[tuple[str, int]]:
    """Unlink every segment of `session`; (name, size) of each one removed."""
    prefix = f"gs{session}_"
    removed: list[tuple[str, int]] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
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


def wait_for_exit(session: str) -> None:
    """Return once the session's root has exited (at once if it already has)."""
    pid, _, _ = root_of(session)
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        pass  # no pidfd here: poll
    try:
        # Checked after opening the pidfd: if the root is alive now, the pidfd
        # is the root's, not a process that recycled its pid.
        if not root_alive(session):
            return
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():
                pass
            return
        while root_alive(session):
            time.sleep(POLL_INTERVAL)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def main(argv: list[str]) -> int:
    """`reaper.py SESSION LOCK_FD`: wait for the root, sweep, sweep again, exit."""
    if os.fork():  # the launcher exits; the reaper goes on as init's child
        os._exit(0)
    session, lock_fd = argv[1], int(argv[2])
    lock = socket.socket(fileno=lock_fd)  # held until this process exits
    # The tree's Ctrl-C, hang-up or stop signal (systemd sends SIGTERM to the
    # whole cgroup) must not kill the reaper before the root is gone; it exits
    # by itself right after. SIGKILL still works.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if not SESSION_RE.fullmatch(session) or root_alive(session) is None:
        return 2  # not a session this process can watch
    wait_for_exit(session)
    sweep(session)
    time.sleep(RESWEEP_AFTER)
    sweep(session)
    lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""What grain_shm calls things: the one definition of its names.

Standard library only, and importing nothing of grain_shm, because the
reaper process loads it without the package (see grain_shm.reaper).

    /gs<session>_<12 random chars>   a session's segment, 29 characters with the "/"
    /gsk_<12 random chars>           a persistent one (session.persistent())

The core (_shm.create) appends the 12 random characters (72 bits, from
getrandom) to the prefix it is given. A session id is 13 base-36 characters naming its root
(see grain_shm.reaper). Abstract Unix sockets (Linux; nothing on disk, gone
with their last holder) say who is alive:

    @grain_shm.reaper.<session>          the session's reaper listens here
    @grain_shm.member.<session>.<pid>    one per process that joined it
"""

from __future__ import annotations

import os
import re

SHM_DIR = "/dev/shm"
SESSION_RE = re.compile(r"[0-9a-z]{13}")
PERSISTENT_PREFIX = "gsk_"
SEGMENT_RE = re.compile(r"gs([0-9a-z]{13})_[A-Za-z0-9_-]{12}")
PERSISTENT_RE = re.compile(r"gsk_[A-Za-z0-9_-]{12}")
_SOCKET_RE = re.compile(r"@grain_shm\.(reaper|member)\.([0-9a-z]{13})(?:\.\d+)?")


def shm_space() -> tuple[int, int] | None:
    """(size, free bytes) of SHM_DIR's filesystem, or None where it has none."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def segment_prefix(session: str) -> str:
    """What the names of `session`'s segments start with (without the "/")."""
    return f"gs{session}_"


def reaper_address(session: str) -> str:
    return f"\0grain_shm.reaper.{session}"


def member_address(session: str, pid: int) -> str:
    return f"\0grain_shm.member.{session}.{pid}"


def parse_socket(path: str) -> tuple[str, str] | None:
    """("reaper" or "member", session) for a path as /proc/net/unix shows it."""
    match = _SOCKET_RE.fullmatch(path)
    return (match.group(1), match.group(2)) if match else None

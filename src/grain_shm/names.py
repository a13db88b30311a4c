"""What grain_shm calls things: the one definition of its names.

Standard library only, and importing nothing of grain_shm, because the
reaper process loads it without the package (see grain_shm.reaper).

    /gs<session>_<12 random chars>   a session's segment, 29 characters with the "/"
    /gs<session>_.<12 random chars>  a session's pool arena, 30 characters
    /gs<session>_~<12 random chars>  a session's grain_shm.Queue ring, 30 characters
    /gsk_<12 random chars>           a persistent one (session.persistent())

The core (_shm.create) appends the 12 random characters (72 bits, from
getrandom) to the prefix it is given. An arena's name has a mark of its own
(the "." the random characters never hold), so that metadata naming an arena
but no block is refused from its name alone, before anything is mapped or
unlinked (an arena holds many arrays and the header that hands blocks out);
a queue's ring has one too ("~"), for the same reason (its cells and claim
words are no array's to map or unlink). Everything that lists a session's names by its prefix (the reaper, `ls`,
`gc`) finds its arenas with its segments. A session id is 13 base-36 characters naming its root
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
ARENA_MARK = "."
QUEUE_MARK = "~"
SEGMENT_RE = re.compile(r"gs([0-9a-z]{13})_[.~]?[A-Za-z0-9_-]{12}")  # arenas and queues too
ARENA_RE = re.compile(r"gs([0-9a-z]{13})_\.[A-Za-z0-9_-]{12}")
QUEUE_RE = re.compile(r"gs([0-9a-z]{13})_~[A-Za-z0-9_-]{12}")
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
    """What the names of `session`'s segments, its arenas too, start with (no "/")."""
    return f"gs{session}_"


def is_arena(name: str) -> bool:
    """Whether `name` (with or without its "/") is a pool arena's; the core's
    _is_arena_path is the same test in C."""
    return ARENA_RE.fullmatch(name.removeprefix("/")) is not None


def is_queue(name: str) -> bool:
    """Whether `name` (with or without its "/") is a grain_shm.Queue's ring;
    the core's _mark_of is the same test in C."""
    return QUEUE_RE.fullmatch(name.removeprefix("/")) is not None


def reaper_address(session: str) -> str:
    return f"\0grain_shm.reaper.{session}"


def member_address(session: str, pid: int) -> str:
    return f"\0grain_shm.member.{session}.{pid}"


def parse_socket(path: str) -> tuple[str, str] | None:
    """("reaper" or "member", session) for a path as /proc/net/unix shows it."""
    match = _SOCKET_RE.fullmatch(path)
    return (match.group(1), match.group(2)) if match else None

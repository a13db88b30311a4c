"""Segment naming per process tree, and what happens to segments at exit.

A session is a process tree: the first process to import grain_shm without
inheriting one starts it, and its id travels in the environment to every
process started afterwards. Every segment name carries it:
"/gs<session>_<12 random chars>", 24 characters with the "/".
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import string

from grain_shm import _shm

SESSION_ENV = "GRAIN_SHM_SESSION"
_SESSION_RE = re.compile(r"[a-z0-9]{8}")
NAME_PREFIX = "gs"


def _session_id() -> str:
    inherited = os.environ.get(SESSION_ENV, "")
    if _SESSION_RE.fullmatch(inherited):
        return inherited
    alphabet = string.ascii_lowercase + string.digits
    session = "".join(secrets.choice(alphabet) for _ in range(8))
    os.environ[SESSION_ENV] = session
    return session


SESSION = _session_id()


def name_prefix() -> str:
    """What the names of this session's segments start with (without "/")."""
    return f"{NAME_PREFIX}{SESSION}_"


_shm.set_name_prefix(name_prefix())


def _unlink_owned_at_exit() -> None:
    _shm.unlink_owned()


class _ExitCleanup:
    """Unlink what this process still owns when it exits normally.

    atexit covers the main interpreter. multiprocessing children leave
    through os._exit, which skips atexit but runs multiprocessing's
    finalizers; a fork-started worker clears the finalizers it inherited,
    then runs its after-fork hooks, which register ours again."""

    def register(self) -> None:
        from multiprocessing import util

        util.Finalize(None, _unlink_owned_at_exit, exitpriority=-100)
        util.register_after_fork(self, _ExitCleanup.register)


_exit_cleanup = _ExitCleanup()
_exit_cleanup.register()
atexit.register(_unlink_owned_at_exit)
os.register_at_fork(after_in_child=_exit_cleanup.register)

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
_shm.set_name_prefix(f"{NAME_PREFIX}{SESSION}_")


def _unlink_owned_at_exit() -> None:
    _shm.stop_async_release()  # pending releases first: their names are no longer owned
    _shm.unlink_owned()


def _register_exit_cleanup() -> None:
    """Unlink what this process still owns when it exits normally.

    atexit covers the main interpreter; multiprocessing children leave via
    os._exit, which skips atexit but runs multiprocessing's finalizers."""
    from multiprocessing import util

    atexit.register(_unlink_owned_at_exit)
    util.Finalize(None, _unlink_owned_at_exit, exitpriority=-100)


_register_exit_cleanup()
os.register_at_fork(after_in_child=_register_exit_cleanup)

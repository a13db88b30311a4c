"""The leak check: what /dev/shm holds after the run that it did not before.

Any entry left behind by the run fails it: a benchmark that leaks shared
memory on the way to its figures has no business reporting them. Each
leftover is attributed to the first cell after which it was seen.

/dev/shm may be shared with other programs (other users' tests, their
multiprocessing semaphores). Once every cell has ended, no process of the run
but this one is left, so an entry that another live process maps or holds
open is that process's, as is a grain_shm name of another session; neither
is this run's leak. Entries that first appear after the last cell are not a
cell's either. Other programs' multiprocessing semaphores (sem.mp-*, unheld
once their processes exit) linger for seconds on a busy machine until their
owner's finalizer or resource tracker removes them (up to 5.5 s seen here,
with other test suites running): the check waits longer for those. A
semaphore this run leaked stays for good, so the wait costs only time, and
only when one is there.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Set, TypedDict

from grain_shm import names, session
SHM_DIR = names.SHM_DIR
SEMAPHORE_PREFIX = "sem.mp-"  # multiprocessing's named semaphores, any program's
SEMAPHORE_SETTLE = 15.0  # seconds to wait for one to go


class Leak(TypedDict):
    name: str  # the entry in SHM_DIR
    after_cell: str  # the label of the cell after which it was first seen


class LeakCheck(TypedDict):
    dir: str
    entries_before: int
    leaked: List[Leak]
    ok: bool


def entries() -> Set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def held_by_others() -> Set[str]:
    """Entries of SHM_DIR another live process maps or has open (Linux /proc;
    processes this one may not read are passed over)."""
    prefix = SHM_DIR + "/"
    held: Set[str] = set()
    me = str(os.getpid())
    try:
        pids = os.listdir("/proc")
    except OSError:  # no /proc (macOS has no /dev/shm either)
        return held
    for pid in pids:
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(None, 5)[-1]
                    if path.startswith(prefix):
                        held.add(path[len(prefix):].removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    held.add(target[len(prefix):])
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return held


class Watch:
    """Snapshots of /dev/shm: at the start, after each cell, at the end."""

    def __init__(self) -> None:
        self.before = entries()
        self.first_seen: Dict[str, str] = {}

    def after(self, label: str) -> None:
        for name in entries() - self.before:
            self.first_seen.setdefault(name, label)

    def _left(self) -> Set[str]:
        """What the run may have left: new entries seen after a cell, that
        belong to no other program (see the module's docstring)."""
        ours = session.name_prefix()
        new = {
            name for name in entries() - self.before
            if name in self.first_seen
            and (name.startswith(ours) or not names.SEGMENT_RE.fullmatch(name))
        }
        return new - held_by_others() if new else new

    def result(self, settle: float = 2.0, semaphore_settle: float = SEMAPHORE_SETTLE) -> LeakCheck:
        """The verdict, after giving in-flight releases `settle` seconds to
        land (a multiprocessing semaphore `semaphore_settle` seconds)."""
        start = time.monotonic()

        def worth_waiting(left: Set[str]) -> bool:
            waited = time.monotonic() - start
            return any(waited < (semaphore_settle if name.startswith(SEMAPHORE_PREFIX)
                                 else settle) for name in left)

        while worth_waiting(self._left()):
            time.sleep(0.05)
        leaked: List[Leak] = [
            {"name": name, "after_cell": self.first_seen[name]} for name in sorted(self._left())
        ]
        return {
            "dir": SHM_DIR,
            "entries_before": len(self.before),
            "leaked": leaked,
            "ok": not leaked,
        }

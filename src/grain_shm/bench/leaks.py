"""The leak check: what /dev/shm holds after the run that it did not before.

Any entry left behind, whoever made it, fails the run: a benchmark that leaks
shared memory on the way to its figures has no business reporting them. Each
leftover is attributed to the first cell after which it was seen.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Set, TypedDict

from grain_shm.names import SHM_DIR


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


class Watch:
    """Snapshots of /dev/shm: at the start, after each cell, at the end."""

    def __init__(self) -> None:
        self.before = entries()
        self.first_seen: Dict[str, str] = {}

    def after(self, label: str) -> None:
        for name in entries() - self.before:
            self.first_seen.setdefault(name, label)

    def result(self, settle: float = 2.0) -> LeakCheck:
        """The verdict, after giving in-flight releases `settle` seconds to land."""
        deadline = time.monotonic() + settle
        while (entries() - self.before) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked: List[Leak] = [
            {"name": name, "after_cell": self.first_seen.get(name, "(end of run)")}
            for name in sorted(entries() - self.before)
        ]
        return {
            "dir": SHM_DIR,
            "entries_before": len(self.before),
            "leaked": leaked,
            "ok": not leaked,
        }

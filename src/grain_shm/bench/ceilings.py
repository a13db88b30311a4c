"""What this machine allows at best, measured without any of the transports.

- memcpy: one thread copying the fill pattern into memory already faulted
  in; nothing that moves bytes can beat it.
- first-touch fill: the same copy into a fresh /dev/shm segment, whose pages
  the kernel must allocate and zero first. Two ways are timed and the faster
  one is the ceiling: letting the copy fault each 4 KiB page in, or having
  the kernel allocate and map them all up front (posix_fallocate and
  MAP_POPULATE, timed with the copy). Any fresh segment pays this: it
  bounds create+fill, and the producer.
- fresh-mapping read: mapping a populated segment (MAP_POPULATE) and
  reading every byte with the consumer's checksum; it bounds the consumer.

The segments are plain files in /dev/shm opened with os.open and mapped with
the mmap module, named with the benchmark's own prefix and always removed.
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from grain_shm import names
from grain_shm.bench import payload
from grain_shm.bench.micro import Step, measure
from grain_shm.bench.runner import Cell, Result, Section
from grain_shm.bench.transports import NAME_PREFIX

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

_counter = itertools.count()
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only


def _new_path() -> str:
    return os.path.join(names.SHM_DIR, f"{NAME_PREFIX}ceiling{os.getpid()}_{next(_counter)}")


def _map_populated(path: str, nbytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE)
    finally:
        os.close(fd)


def _memcpy(nbytes: int, pattern: np.ndarray) -> Step:
    target = np.ones(nbytes, np.uint8)  # faulted in

    def step() -> float:
        start = time.perf_counter()
        np.copyto(target, pattern)
        return time.perf_counter() - start

    return step


def _first_touch_fill(nbytes: int, pattern: np.ndarray, populate: bool) -> Step:
    def step() -> float:
        path = _new_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            if populate:  # the kernel allocates and maps every page: timed
                start = time.perf_counter()
                os.posix_fallocate(fd, 0, nbytes)
                mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE)
            else:  # the copy faults each page in
                mapping = mmap.mmap(fd, nbytes)
                start = time.perf_counter()
            target = np.frombuffer(mapping, np.uint8)
            np.copyto(target, pattern)
            elapsed = time.perf_counter() - start
            del target
            mapping.close()
        finally:
            os.close(fd)
            os.unlink(path)
        return elapsed

    return step


def _fresh_read(nbytes: int, path: str) -> Step:
    def step() -> float:
        start = time.perf_counter()
        mapping = _map_populated(path, nbytes)
        payload.checksum(np.frombuffer(mapping, np.uint8))
        elapsed = time.perf_counter() - start
        mapping.close()
        return elapsed

    return step


def _measure_size(nbytes: int, cell: Cell) -> Result:
    pattern = payload.source(nbytes)

    def timed(step: Step) -> Result:
        figure = measure(step, cell.budget, cell.min_count)
        figure["gbps"] = nbytes / figure["us"]["median"] / 1e3
        return figure

    row: Result = {
        "size": nbytes,
        "memcpy": timed(_memcpy(nbytes, pattern)),
        "fault_fill": timed(_first_touch_fill(nbytes, pattern, populate=False)),
        "populate_fill": timed(_first_touch_fill(nbytes, pattern, populate=True)),
    }
    fastest = max(("fault_fill", "populate_fill"), key=lambda k: row[k]["gbps"])
    row["first_touch_fill"] = {**row[fastest], "method": fastest}
    path = _new_path()
    with open(path, "xb") as segment:
        segment.write(pattern.tobytes())
    try:
        row["fresh_read"] = timed(_fresh_read(nbytes, path))
    finally:
        os.unlink(path)
    return row


def run(cell: Cell, abort: Event) -> Result:
    return {"sizes": [_measure_size(nbytes, cell) for nbytes in cell.sizes]}


SECTION = Section(
    name="ceilings",
    processes=lambda cell, ctx: [("ceilings", run, ())],
    summarize=lambda cell, outputs: outputs["ceilings"],
)

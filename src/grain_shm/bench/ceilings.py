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

Those three run in one process (the cell whose transport is None). A second
cell (transport CROSS_PROCESS) runs two fresh processes, a producer and a
consumer, for what no transport between processes can beat:

- handoff: a ring of n blocks in one shared mapping. The producer fills
  block k % n with the payload (payload.fill) and publishes k + 1 in a
  shared counter; the consumer spins until it sees it, reads the block with
  the checksum (checked, as the transfer does) and publishes its own
  counter; the producer spins while n blocks are unread. No syscall, no
  queue: what moving the bytes from one core to another costs, which bounds
  any shared-memory transport at large sizes. Which n is fastest depends on
  the size (on this 2-core VM: 2 blocks at 16 MiB, 4 at 1 MiB), so each
  size is timed with every ring of ring_sizes(depth) and the best is its
  ceiling.

Each queue's own ceiling (its rate of reference-sized messages and its
latency) is a cell of its own, one per kind of queue: bench.queue_ceilings.

A ceiling is what the machine allows at best, so each is the best of its
repetitions: "best_gbps" (from the fastest repetition) of the single-thread
figures, the "max" of the handoff's segment rates. A transport's median can
then not exceed it by noise alone.

The JSON: the single-thread cell's result is {"sizes": [row]}, one row per
size with "size" and, for "memcpy", "fault_fill", "populate_fill",
"first_touch_fill" (the faster of the two, with its "method") and
"fresh_read": {"us": summary, "cpu_us": float, "gbps": the median's GB/s,
"best_gbps": the fastest repetition's}. The cross-process cell's result is

    {"ring_sizes": [n, ...],
     "sizes": [{"size",
                "handoff": {"ring_blocks" (the best ring's n), "blocks",
                            "timed_blocks", "gbps": summary, "blocks_per_s":
                            summary, "gbps_by_ring": {"n": max}}}]}

where a summary is stats.summary() of the timed segments' rates.

The segments are plain files in /dev/shm opened with os.open and mapped with
the mmap module, named with the benchmark's own prefix and always removed
(the handoff's ring as soon as both processes have mapped it).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import platform
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from grain_shm import names
from grain_shm.bench import payload, queue_ceilings, queues, stats, transfer
from grain_shm.bench.micro import Step, measure
from grain_shm.bench.runner import Aborted, Cell, ProcessSpec, Result, Section
from grain_shm.bench.transports import NAME_PREFIX, Unavailable

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.queues import Queue
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
        figure["best_gbps"] = nbytes / figure["us"]["min"] / 1e3
        return figure

    row: Result = {
        "size": nbytes,
        "memcpy": timed(_memcpy(nbytes, pattern)),
        "fault_fill": timed(_first_touch_fill(nbytes, pattern, populate=False)),
        "populate_fill": timed(_first_touch_fill(nbytes, pattern, populate=True)),
    }
    fastest = max(("fault_fill", "populate_fill"), key=lambda k: row[k]["best_gbps"])
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


# The cross-process ceiling: the handoff of every size.

CROSS_PROCESS = "cross-process"  # the transport column of their cell


def ring_sizes(depth: int) -> tuple[int, ...]:
    """Rings of 2 blocks (double buffering), 4, and as many as the transfer
    has arrays in flight with a Queue `depth` deep."""
    return tuple(sorted({2, 4, depth + 2}))

MAX_BLOCKS = 1_000_000
SPIN_CHECK = 1 << 12  # spins between looks at the abort event
# The ring's first page holds the counters (uint64 words, each on its own
# 128 bytes: no false sharing between the two writers); the blocks follow.
HEADER = 4096
PRODUCED, CONSUMED, TOTAL, ATTACHED = 0, 16, 32, 48  # word indexes in the header


def _spin_until(words: np.ndarray, word: int, value: int, abort: Event) -> None:
    """Spin until words[word] >= value (the other process's counter)."""
    spins = 0
    while words[word] < value:
        spins += 1
        if spins % SPIN_CHECK == 0 and abort.is_set():
            raise Aborted


def _views(
    mapping: mmap.mmap, nbytes: int, ring: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The header's words and the ring's blocks, as numpy views of the mapping."""
    words = np.frombuffer(mapping, np.uint64, HEADER // 8)
    blocks = np.frombuffer(mapping, np.uint8, ring * nbytes, HEADER)
    return words, list(blocks.reshape(ring, nbytes))


def _produce_ring(nbytes: int, ring: int, cell: Cell, abort: Event, q: Queue[Any]) -> int:
    """Fill the ring's blocks for the cell's budget; tell the consumer where it is."""
    pattern = payload.source(nbytes)
    path = _new_path()
    length = HEADER + ring * nbytes
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:  # every page allocated and mapped before the clock starts
            os.ftruncate(fd, length)
            os.posix_fallocate(fd, 0, length)
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        words, blocks = _views(mapping, nbytes, ring)
        transfer._put(q, path, abort)
        _spin_until(words, ATTACHED, 1, abort)  # mapped (and unlinked) by the consumer
        count = 0
        least = cell.min_count + ring
        start = time.perf_counter()
        while count < least or (
            count < MAX_BLOCKS and time.perf_counter() - start < cell.budget
        ):
            if count % transfer.ABORT_CHECK_EVERY == 0 and abort.is_set():
                raise Aborted
            # Block `count` is free once the consumer has read the one
            # `ring` before it.
            if count >= ring:
                _spin_until(words, CONSUMED, count + 1 - ring, abort)
            payload.fill(blocks[count % ring], pattern, count)
            # x86 is TSO: stores are seen in program order, so a consumer that
            # sees this counter sees the block written before it (and loads
            # are not reordered either). Not so on weaker memory models, where
            # this cell is skipped (see _check_ordering).
            words[PRODUCED] = count + 1
            count += 1
        words[TOTAL] = count  # after the last PRODUCED: the end mark
        _spin_until(words, CONSUMED, count, abort)
    finally:
        with contextlib.suppress(FileNotFoundError):  # the consumer's, once mapped
            os.unlink(path)
    return count


def _check_ordering() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        raise Unavailable(
            f"the handoff ring relies on x86's store order (TSO), not {platform.machine()}'s"
        )


def produce_cross(cell: Cell, abort: Event, q: Queue[Any], ready: Event) -> Result:
    _check_ordering()
    try:
        transfer._wait(ready, abort)
        rings = ring_sizes(transfer.depth(cell))
        blocks = [[_produce_ring(nbytes, ring, cell, abort, q) for ring in rings]
                  for nbytes in cell.sizes]
    except BaseException:
        q.cancel_join_thread()
        raise
    return {"blocks": blocks}


def _consume_ring(nbytes: int, ring: int, abort: Event, q: Queue[Any]) -> Result:
    """Read and check every block until the producer's end mark."""
    pattern_sum = payload.checksum(payload.source(nbytes))
    path = transfer._get(q, abort)
    mapping = _map_populated(path, HEADER + ring * nbytes)
    os.unlink(path)  # both processes hold it mapped: nothing can leak now
    words, blocks = _views(mapping, nbytes, ring)
    words[ATTACHED] = 1
    finished: list[float] = []
    index = 0
    while True:
        spins = 0
        while words[PRODUCED] <= index:
            if words[TOTAL]:  # written after the last PRODUCED, so that one is seen
                break
            spins += 1
            if spins % SPIN_CHECK == 0 and abort.is_set():
                raise Aborted
        if words[PRODUCED] <= index:
            break  # every block came
        got = payload.checksum(blocks[index % ring])
        want = payload.expected(pattern_sum, index)
        if got != want:
            raise ValueError(
                f"handoff block {index} of {nbytes} bytes: checksum {got:#x}, expected "
                f"{want:#x}: the consumer saw the counter before the bytes"
            )
        finished.append(time.perf_counter())
        index += 1
        words[CONSUMED] = index  # the block may be overwritten from now on
    rates, timed = stats.segment_rates(
        finished, max(ring, len(finished) // 10), transfer.SEGMENTS
    )
    return {"blocks": len(finished), "timed": timed, "rates": rates.tolist()}


def consume_cross(cell: Cell, abort: Event, q: Queue[Any], ready: Event) -> Result:
    _check_ordering()
    ready.set()
    return {
        "rings": [[_consume_ring(nbytes, ring, abort, q)
                   for ring in ring_sizes(transfer.depth(cell))]
                  for nbytes in cell.sizes],
    }


def _is_queue(cell: Cell) -> bool:
    return str(cell.transport).startswith(queue_ceilings.PREFIX)


def _processes(cell: Cell, ctx: BaseContext) -> list[ProcessSpec]:
    if _is_queue(cell):
        return queue_ceilings.processes(cell, ctx)
    if cell.transport != CROSS_PROCESS:
        return [("ceilings", run, ())]
    q = ctx.Queue()  # the ring's path, once per ring: nothing timed goes through it
    ready = ctx.Event()
    return [
        ("producer", produce_cross, (q, ready)),
        ("consumer", consume_cross, (q, ready)),
    ]


def _summarize(cell: Cell, outputs: dict[str, Result]) -> Result:
    if _is_queue(cell):
        return queue_ceilings.summarize(cell, outputs)
    if cell.transport != CROSS_PROCESS:
        return outputs["ceilings"]
    consumer = outputs["consumer"]
    sizes = []
    ring_counts = ring_sizes(transfer.depth(cell))
    for nbytes, rings in zip(cell.sizes, consumer["rings"]):
        gbps = [stats.summary(np.asarray(r["rates"]) * nbytes / 1e9) for r in rings]
        best = max(range(len(rings)), key=lambda i: gbps[i]["max"])
        sizes.append({
            "size": nbytes,
            "handoff": {
                "ring_blocks": ring_counts[best],
                "blocks": rings[best]["blocks"],
                "timed_blocks": rings[best]["timed"],
                "gbps": gbps[best],
                "blocks_per_s": stats.summary(rings[best]["rates"]),
                "gbps_by_ring": {str(n): g["max"] for n, g in zip(ring_counts, gbps)},
            },
        })
    return {
        "ring_sizes": list(ring_counts),
        "sizes": sizes,
    }


SECTION = Section(
    name="ceilings",
    processes=_processes,
    summarize=_summarize,
    clean_up=queues.clean_up,
)

"""The transfer section: arrays from a producer process to a consumer process.

The producer creates and fills fresh arrays and puts them on a bounded queue
(a prefetch buffer of QUEUE_DEPTH arrays): the transport's own kind
(bench.queues), `multiprocessing.Queue` for most; the consumer gets each
one, reads every byte, checks it, and releases it. Both
are fresh spawned processes. Throughput is taken from the consumer's
completion times (the end of the pipeline) in steady state; CPU time per
array from `time.process_time()` in each process, which counts all its
threads (the queue's feeder thread pickles, deleter threads release).
"""

from __future__ import annotations

import collections
import queue
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, cast

import numpy as np

from grain_shm.bench import payload, queues, stats, transports
from grain_shm.bench.runner import Aborted, Cell, ProcessSpec, Result, Section
from grain_shm.bench.transports import Held

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

QUEUE_DEPTH = 4  # the default; `--queue-depth` sets the cells' own
WARMUP = 2  # arrays at least, 10% at most, before the clock starts
SEGMENTS = 20  # timed segments per cell, for the median and p10/p90
MAX_ARRAYS = 1_000_000
POLL = 0.1  # seconds between looks at the abort event while blocked
ABORT_CHECK_EVERY = 64  # arrays between looks at it while not blocked


def depth(cell: Cell) -> int:
    """The cell's Queue maxsize: the prefetch buffer, in arrays."""
    return cell.queue_depth or QUEUE_DEPTH


def _get(q: Queue[Any], abort: Event) -> Any:
    while True:
        try:
            return q.get(timeout=POLL)
        except queue.Empty:
            if abort.is_set():
                raise Aborted from None


def _put(q: Queue[Any], item: object, abort: Event) -> None:
    while True:
        try:
            return q.put(item, timeout=POLL)
        except queue.Full:
            if abort.is_set():
                raise Aborted from None


def _wait(event: Event, abort: Event) -> None:
    while not event.wait(POLL):
        if abort.is_set():
            raise Aborted


def produce(cell: Cell, abort: Event, q: Queue[Any], ready: Event, done: Event) -> Result:
    """Fill and send arrays for the cell's budget (and at least its minimum)."""
    nbytes = cell.sizes[0]
    transport = transports.get(cast(str, cell.transport))  # transfer cells have one
    pattern = payload.source(nbytes)
    # Arrays sent but perhaps not yet removed by the consumer: on failure
    # they are unlinked here, so an error leaves /dev/shm as it was.
    in_flight: Deque[Any] = collections.deque(maxlen=depth(cell) + 64)
    count = 0
    try:
        _wait(ready, abort)
        q = queues.attach(q, "producer", abort)  # after the consumer's end: nothing is lost
        transport.bind(q)
        cpu = time.process_time()
        start = time.perf_counter()
        least = cell.min_count + WARMUP
        while count < least or (
            count < MAX_ARRAYS and time.perf_counter() - start < cell.budget
        ):
            if count % ABORT_CHECK_EVERY == 0 and abort.is_set():
                raise Aborted
            held = transport.create(nbytes, owner=False)
            payload.fill(held.array, pattern, count)
            in_flight.append(transport.reference(held))
            _put(q, transport.message(held), abort)
            transport.release(held)
            count += 1
        _put(q, None, abort)
        _wait(done, abort)  # everything pickled, sent and consumed
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - start
    except BaseException:
        q.cancel_join_thread()
        for reference in in_flight:
            try:
                transport.unlink(reference)
            except OSError:  # already released by the consumer
                pass
        raise
    return {"arrays": count, "cpu_s": cpu, "wall_s": wall,
            "pool_arena_bytes": transports.pool_bytes(transport)}


def consume(cell: Cell, abort: Event, q: Queue[Any], ready: Event, done: Event) -> Result:
    """Get, read, verify and release arrays until the producer's end mark."""
    nbytes = cell.sizes[0]
    transport = transports.get(cast(str, cell.transport))  # transfer cells have one
    pattern_sum = payload.checksum(payload.source(nbytes))
    finished: List[float] = []  # perf_counter() when each array was done
    held: Optional[Held] = None
    q = queues.attach(q, "consumer", abort)
    transport.bind(q)
    ready.set()
    cpu = time.process_time()
    try:
        while True:
            message = _get(q, abort)
            if message is None:
                break
            held = transport.open(message)
            del message
            got = payload.checksum(held.array)
            transport.release(held)
            held = None
            want = payload.expected(pattern_sum, len(finished))
            if got != want:
                raise ValueError(
                    f"array {len(finished)} of {nbytes} bytes: checksum {got:#x}, "
                    f"expected {want:#x}: the bytes received are not the bytes sent"
                )
            finished.append(time.perf_counter())
    finally:
        if held is not None:
            transport.release(held)
    cpu = time.process_time() - cpu
    done.set()
    rates, timed = stats.segment_rates(
        finished, max(WARMUP, len(finished) // 10), SEGMENTS
    )
    return {"arrays": len(finished), "timed": timed, "rates": rates.tolist(), "cpu_s": cpu}


def processes(cell: Cell, ctx: BaseContext) -> List[ProcessSpec]:
    kind = transports.TRANSPORTS[cast(str, cell.transport)].queue
    # What one message carries, for the queues that size their buffer by it
    # (np.zeros: pages untouched unless a queue pickles it).
    q = queues.make(kind, ctx, depth(cell), np.zeros(cell.sizes[0], np.uint8))
    ready, done = ctx.Event(), ctx.Event()
    return [
        ("producer", produce, (q, ready, done)),
        ("consumer", consume, (q, ready, done)),
    ]


def summarize(cell: Cell, outputs: Dict[str, Result]) -> Result:
    producer, consumer = outputs["producer"], outputs["consumer"]
    nbytes = cell.sizes[0]
    rates = np.asarray(consumer["rates"])
    return {
        "size": nbytes,
        "arrays": consumer["arrays"],
        "timed_arrays": consumer["timed"],
        "gbps": stats.summary(rates * nbytes / 1e9),
        "arrays_per_s": stats.summary(rates),
        "segment_arrays_per_s": consumer["rates"],
        "producer_cpu_us": producer["cpu_s"] / producer["arrays"] * 1e6,
        "consumer_cpu_us": consumer["cpu_s"] / consumer["arrays"] * 1e6,
        "producer_wall_s": producer["wall_s"],
        # The producer's arenas at the end (None: no pool): its resident cost.
        "pool_arena_bytes": producer["pool_arena_bytes"],
    }


SECTION = Section(
    name="transfer",
    processes=processes,
    summarize=summarize,
    clean_up=queues.clean_up,
)

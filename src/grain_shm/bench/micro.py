"""Per-array costs in one process: create+fill+destroy, and release on the caller.

create+fill+destroy is the whole life of an array its creator owns: what a
worker pays per output before any transfer. Release on the caller is what
dropping a received array costs the consumer (the training loop) that owns
it, after it has read it: the latency `enable_async_del` exists to hide.
Both run every transport over all the cell's sizes in one fresh process.
"""

from __future__ import annotations

import time
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Callable, List, cast

from grain_shm.bench import payload, stats, transports
from grain_shm.bench.runner import Cell, Result, Section
from grain_shm.bench.transports import Transport

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

# A timed step: does one repetition, returns the seconds it measured.
Step = Callable[[], float]

WARMUP = 3
MAX_COUNT = 200_000


def measure(step: Step, budget: float, min_count: int) -> Result:
    """Time `step()` (it returns the seconds it measured) for `budget` seconds,
    at least `min_count` times; µs per step, and process CPU µs per step."""
    for _ in range(WARMUP):
        step()
    samples: List[float] = []
    cpu = time.process_time()
    start = time.perf_counter()
    while len(samples) < min_count or (
        len(samples) < MAX_COUNT and time.perf_counter() - start < budget
    ):
        samples.append(step())
    cpu = time.process_time() - cpu
    return {
        "us": stats.summary([s * 1e6 for s in samples]),
        "cpu_us": cpu / len(samples) * 1e6,
    }


def _create_fill_destroy(transport: Transport, nbytes: int) -> Step:
    pattern = payload.source(nbytes)

    def step() -> float:
        start = time.perf_counter()
        held = transport.create(nbytes, owner=True)
        payload.fill(held.array, pattern, 0)
        transport.release(held)
        return time.perf_counter() - start

    return step


def _release(transport: Transport, nbytes: int) -> Step:
    """Received as a queue delivers it (pickled and unpickled), read, then timed: release."""
    pattern = payload.source(nbytes)

    def step() -> float:
        creator = transport.create(nbytes, owner=False)
        payload.fill(creator.array, pattern, 0)
        sent = ForkingPickler.dumps(transport.message(creator))
        transport.release(creator)
        held = transport.open(ForkingPickler.loads(sent))
        payload.checksum(held.array)
        start = time.perf_counter()
        transport.release(held)
        return time.perf_counter() - start

    return step


def _run(make_step: Callable[[Transport, int], Step], cell: Cell) -> Result:
    transport = transports.get(cast(str, cell.transport))  # these sections' cells have one
    return {
        "sizes": [
            {"size": nbytes, **measure(make_step(transport, nbytes), cell.budget, cell.min_count),
             # The arenas held after this size (None: no pool); idle ones of
             # smaller sizes may have gone meanwhile.
             "pool_arena_bytes": transports.pool_bytes(transport)}
            for nbytes in cell.sizes
        ]
    }


def run_create_fill_destroy(cell: Cell, abort: Event) -> Result:
    return _run(_create_fill_destroy, cell)


def run_release(cell: Cell, abort: Event) -> Result:
    return _run(_release, cell)


CREATE_FILL_DESTROY = Section(
    name="cfd",
    processes=lambda cell, ctx: [("cfd", run_create_fill_destroy, ())],
    summarize=lambda cell, outputs: outputs["cfd"],
)

RELEASE = Section(
    name="release",
    processes=lambda cell, ctx: [("release", run_release, ())],
    summarize=lambda cell, outputs: outputs["release"],
)

"""The queues the transfer's messages travel through, one kind per transport.

- "multiprocessing.Queue": the stdlib's; a feeder thread pickles each item
  into a pipe, two semaphores bound it.
- "faster-fifo": faster-fifo's ring in shared memory under a process-shared
  mutex; each item pickled (ForkingPickler) into the ring.
- "grain_shm.Queue": grain_shm's ring in shared memory (issue 17); until the
  package has it, its cells are skipped with the reason.
- "iceoryx2": iceoryx2's publish-subscribe service (bench.iceoryx.Channel),
  whose samples are the arrays themselves.

`make()` builds one in the cell's parent, bounded to `depth` items, so that
both spawned processes get it as a Process argument (the only way the
stdlib's and faster-fifo's queues reach a spawned child); `attach()` gives
each process its end; `clean_up()` removes, once both have ended, what a
queue keeps by design (iceoryx2's management files).

The bench always passes its own timeout to `put` and `get` (faster-fifo's
default of 10 s would otherwise turn a slow cell into an exception).
"""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, List

import numpy as np

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

    from grain_shm.bench.runner import ProcessSpec

KINDS = ("multiprocessing.Queue", "faster-fifo", "iceoryx2", "grain_shm.Queue")
SIZE_WORD = 8  # faster-fifo stores each item's length (a size_t) before it


def item_bytes(example: Any) -> int:
    """What one item takes in a queue that stores it pickled: an array's own
    bytes for iceoryx2, whose samples hold the bytes and nothing else."""
    if isinstance(example, np.ndarray):
        return example.nbytes
    return len(ForkingPickler.dumps(example))


def make(kind: str, ctx: BaseContext, depth: int, example: Any) -> Any:
    """A queue of `kind` that holds `depth` items like `example` (an array
    as the transfer sends it, or a reference-sized tuple)."""
    if kind == "multiprocessing.Queue":
        return ctx.Queue(maxsize=depth)
    if kind == "faster-fifo":
        import faster_fifo

        # faster-fifo bounds bytes, not items, and refuses an item larger
        # than its whole buffer: this one holds exactly `depth` items.
        pickled = len(ForkingPickler.dumps(example))
        return faster_fifo.Queue(max_size_bytes=depth * (SIZE_WORD + pickled))
    if kind == "grain_shm.Queue":
        import grain_shm

        return grain_shm.Queue(depth)
    if kind == "iceoryx2":
        from grain_shm.bench import iceoryx

        return iceoryx.Channel(ctx, depth, item_bytes(example))
    raise ValueError(f"no queue of kind {kind!r}; kinds: {', '.join(KINDS)}")


def attach(queue: Any, role: str, abort: Event) -> Any:
    """This process's end of `queue`, as "producer" or "consumer". The
    consumer attaches before it says it is ready, the producer after."""
    from grain_shm.bench import iceoryx

    if isinstance(queue, iceoryx.Channel):
        return queue.attach(role, abort)
    return queue


def clean_up(specs: List[ProcessSpec]) -> None:
    """After a cell: what its queues keep by design, removed in the parent."""
    from grain_shm.bench import iceoryx

    for _, _, extra in specs:
        for argument in extra:
            if isinstance(argument, iceoryx.Channel):
                argument.clean_up()

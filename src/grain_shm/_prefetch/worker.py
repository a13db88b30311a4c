"""The worker process: it makes items first_item, first_item + num_workers, ...
and sends each as one message on its channel (channel.py), within its
buffer's bound.

Stopping sends SIGTERM: a worker raises `_Stop` at once, except while it
creates an array and records it, or sends a message and forgets what it
held, so every array it made is either sent (drained and unlinked by the
consumer) or unlinked by the worker itself; and no _Stop ever escapes
(see _work). An exception is sent as a failure.Failure, for the consumer
to raise at its position.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import time
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np

from grain_shm import _shm
from grain_shm._prefetch import failure, message
from grain_shm._prefetch.channel import ConsumerGone
from grain_shm._prefetch.maker import _Maker, _Stats
from grain_shm.array import SharedMemoryArray, recycling_chosen

if TYPE_CHECKING:
    from types import FrameType

    from grain_shm._prefetch.channel import Sender

    from grain_shm._prefetch.maker import Transform
    from grain_shm._prefetch.plan import _Plan
    from grain_shm.prefetch import RandomAccessSource



class _Stop(BaseException):
    """The consumer asked this worker to stop (SIGTERM)."""


class _StopGuard:
    """SIGTERM raises _Stop at once, except inside `with guard:`, where it
    waits for the block to end; at most once, and never once disarmed."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.armed = True  # False once _Stop was raised, or the worker's loop has ended

    def on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.depth or not self.armed:
            self.pending = True
        else:
            self._stop()

    def disarm(self) -> None:
        self.armed = False

    def _stop(self) -> None:
        self.armed = False  # once: a second SIGTERM must not interrupt the unwinding
        raise _Stop

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if not self.depth and self.pending and self.armed:
            self._stop()


def pool_for_workers(recycle: Optional[bool]) -> Optional[int]:
    """The pool bound the workers take (0: off; None: the default bound),
    decided by the consumer and sent, whatever the workers' environment says
    (a forkserver may have started before GRAIN_SHM_RECYCLE was set).

    On by default: a worker's arrays are made, sent and released by grain_shm
    and never looked up by name, so a block is a fresh segment nobody can
    tell apart, but for speed. Off with recycle=False, or where
    GRAIN_SHM_RECYCLE is set and left this process's pool off ("0"). The
    consumer's own bound, if it pools."""
    bound: int = _shm.pool_stats()["max_bytes"]
    if recycle is False:
        return 0
    if bound or recycle is None and recycling_chosen():
        return bound
    return None


def _set_pool(bound: Optional[int]) -> None:
    """Turn this worker's pool on (None: the default bound) or off (0)."""
    if bound == 0:
        SharedMemoryArray._disable_recycling()
    else:
        SharedMemoryArray.enable_recycling(bound)


def _work(
    worker: int,
    num_workers: int,
    first_item: int,
    plan: _Plan,
    payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]],
    channel: Sender,
    buffer_size: int,
    profiling: bool,
    pool: Optional[int],
) -> None:
    """A worker: make items first_item, first_item + num_workers, ... and send them.

    No _Stop escapes: the handler is installed inside the outer try, raises
    at most once, and is disarmed as the inner try ends, so a SIGTERM in the
    inner finally (before the disarm) is caught below, and one after it
    (the except and finally here, the interpreter's exit) raises nothing.
    Until the handler is installed, SIGTERM is blocked (the consumer
    started this process so), so a stop that came early is delivered to
    the handler, and the exit hooks run: a forked worker's inherited block
    references go with them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    guard = _StopGuard()
    held: List[SharedMemoryArray] = []  # arrays of the item being made, not yet sent
    try:
        try:
            signal.signal(signal.SIGTERM, guard.on_signal)
            # The consumer started us with SIGTERM blocked: one sent before
            # this point is delivered now, to the handler.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            _serve(worker, num_workers, first_item, plan, payload, channel, buffer_size,
                   profiling, pool, guard, held)
        finally:
            guard.disarm()
    except (_Stop, ConsumerGone, BrokenPipeError):
        pass
    finally:
        _discard(held)


def _serve(
    worker: int,
    num_workers: int,
    item: int,
    plan: _Plan,
    payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]],
    channel: Sender,
    buffer_size: int,
    profiling: bool,
    pool: Optional[int],
    guard: _StopGuard,
    held: List[SharedMemoryArray],
) -> None:
    """The worker's loop; an exception in it is sent as a Failure, and ends it."""
    full: List[str] = []  # what could not be allocated: the item's failure, not an element's

    def allocate(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        try:
            with guard:
                array = SharedMemoryArray(shape, dtype)
                held.append(array)
        except MemoryError as error:  # a full /dev/shm: say what to change
            full.append(_full_message(item, shape, dtype, plan, buffer_size))
            raise MemoryError(f"{full[-1]}: {error}") from None
        return array

    started = time.perf_counter()
    stats = _Stats()
    maker: Optional[_Maker] = None
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    def send(data: bytes) -> None:
        """Send `data`; what `held` had is the consumer's once it is sent."""
        channel.send(data, guard, held.clear)

    try:
        _set_pool(pool)
        source, transform = pickle.loads(payload) if isinstance(payload, bytes) else payload
        maker = _Maker(plan, source, transform, allocate, stats, timed=profiling)
    except Exception as error:
        send(message.dumps(item, failure.capture(worker, error), [], None))
        return
    end = plan.num_items
    while end is None or item < end:
        stats.blocked_s += channel.wait_for_room(parent_alive)
        try:
            tree = maker.make(item)
            stats.alive_s = time.perf_counter() - started
            # Pickled before sending, so that a leaf pickle refuses is this
            # item's error; the arrays in `held` travel as the consumer's own.
            pickled = message.dumps(item, tree, held, stats if profiling else None)
        except Exception as error:
            _discard(held)
            where = "" if full or maker.position < 0 else (
                f"at element {maker.position} of the stream (source index {maker.index})")
            send(message.dumps(item, failure.capture(worker, error, where), [], None))
            return
        send(pickled)
        del tree, pickled
        item += num_workers


def _full_message(item: int, shape: Tuple[int, ...], dtype: np.dtype, plan: _Plan,
                  buffer_size: int) -> str:
    """What a full /dev/shm means here: the item (a batch allocates its
    columns once, so no element is to blame), its array, and what to lower."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    what = "element" if plan.batch_size is None else "batch"
    smaller = f"per_worker_buffer_size ({buffer_size})"
    if plan.batch_size is not None:
        smaller += f" or batch_size ({plan.batch_size})"
    return (f"/dev/shm is full: item {item} (a {what}) needs {shape} {np.dtype(dtype)}, "
            f"{nbytes / (1 << 20):.1f} MiB, for one of its arrays, and each worker holds up "
            f"to per_worker_buffer_size items besides the one it makes; a smaller {smaller} "
            f"needs less; `python -m grain_shm doctor` shows /dev/shm's room and how to "
            f"enlarge it")


def _discard(arrays: List[SharedMemoryArray]) -> None:
    """Unlink arrays never sent (they go when the worker drops them)."""
    for array in arrays:
        array.unlink_on_del()
    arrays.clear()

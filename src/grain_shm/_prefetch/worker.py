"""The worker process: it makes items first_item, first_item + num_workers, ...
and sends each as one message on its channel (channel.py), within its
buffer's bound.

Stopping sends SIGTERM: a worker raises `_Stop` at once, except while it
creates an array and records it, or sends a message and forgets what it
held, so every array it made is either sent (drained and unlinked by the
consumer) or unlinked by the worker itself. An exception is sent as a
`_Failure`, for the consumer to raise at its position.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import signal
import time
import traceback
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np

from grain_shm import _shm
from grain_shm._prefetch import message
from grain_shm._prefetch.channel import ConsumerGone
from grain_shm._prefetch.maker import _Maker, _Stats
from grain_shm.array import SharedMemoryArray

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
    waits for the block to end."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.depth:
            self.pending = True
        else:
            raise _Stop

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if not self.depth and self.pending:
            raise _Stop


@dataclasses.dataclass(frozen=True)
class _Failure:
    """An exception in a worker, for the consumer to raise at its position."""

    worker: int
    position: Optional[int]  # None: the worker failed before its first element
    index: Optional[int]
    error: Optional[bytes]  # the pickled exception, if it pickles
    summary: str  # type and message, for an exception that does not pickle
    text: str  # the worker's traceback


class _RemoteTraceback(Exception):
    """The worker's traceback, as the cause of the exception it raised."""

    def __str__(self) -> str:
        return str(self.args[0])


def _failure(worker: int, maker: Optional[_Maker], error: BaseException) -> _Failure:
    try:
        pickled: Optional[bytes] = pickle.dumps(error)
    except Exception:
        pickled = None
    position = maker.position if maker is not None and maker.position >= 0 else None
    return _Failure(
        worker,
        position,
        maker.index if position is not None and maker is not None else None,
        pickled,
        f"{type(error).__qualname__}: {error}",
        traceback.format_exc(),
    )


def _pool_setting() -> int:
    """This process's pool bound (0: off), for the workers to match whatever
    their environment says."""
    bound: int = _shm.pool_stats()["max_bytes"]
    return bound


def _match_pool(setting: int) -> None:
    """Turn this worker's pool on (with the consumer's bound) or off, as the consumer's is."""
    if setting:
        SharedMemoryArray.enable_recycling(setting)
    else:
        SharedMemoryArray._disable_recycling()


def _work(
    worker: int,
    num_workers: int,
    first_item: int,
    plan: _Plan,
    payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]],
    channel: Sender,
    profiling: bool,
    pool: int,
) -> None:
    """A worker: make items first_item, first_item + num_workers, ... and send them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    guard = _StopGuard()
    signal.signal(signal.SIGTERM, guard.on_signal)
    held: List[SharedMemoryArray] = []  # arrays of the item being made, not yet sent

    def allocate(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with guard:
            array = SharedMemoryArray(shape, dtype)
            held.append(array)
        return array

    started = time.perf_counter()
    stats = _Stats()
    maker: Optional[_Maker] = None
    parent = multiprocessing.parent_process()
    item = first_item

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    def send(data: bytes) -> None:
        """Send `data`; what `held` had is the consumer's once it is sent."""
        channel.send(data, guard, held.clear)

    try:
        try:
            _match_pool(pool)
            source, transform = pickle.loads(payload) if isinstance(payload, bytes) else payload
            maker = _Maker(plan, source, transform, allocate, stats, timed=profiling)
        except Exception as error:
            send(message.dumps(item, _failure(worker, None, error), [], None))
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
                send(message.dumps(item, _failure(worker, maker, error), [], None))
                return
            send(pickled)
            del tree, pickled
            item += num_workers
    except (_Stop, ConsumerGone, BrokenPipeError):
        pass
    finally:
        _discard(held)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing left to stop: exit in peace


def _discard(arrays: List[SharedMemoryArray]) -> None:
    """Unlink arrays never sent (they go when the worker drops them)."""
    for array in arrays:
        array.unlink_on_del()
    arrays.clear()


def _raise(failure: _Failure) -> None:
    where = (
        f"in prefetch worker {failure.worker}"
        if failure.position is None
        else f"in prefetch worker {failure.worker}, at element {failure.position} of the "
        f"stream (source index {failure.index})"
    )
    error: Optional[BaseException] = None
    if failure.error is not None:
        try:
            error = pickle.loads(failure.error)
        except Exception:
            error = None
    if isinstance(error, BaseException):
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(f"(raised {where})")
    else:
        error = RuntimeError(f"{failure.summary} (raised {where})")
    raise error from _RemoteTraceback(failure.text)

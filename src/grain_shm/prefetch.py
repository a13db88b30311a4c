"""The multi-process prefetcher: MultiprocessingOptions put to work.

Item k of the stream (an element, or a batch of `batch_size` consecutive
elements) is made by worker k % num_workers, and the consumer takes item k
from that worker's channel: so the order is the same for every worker count,
0 included (everything in the calling process). A worker writes each array
leaf once, straight into a SharedMemoryArray (a batch is assembled in place,
leaf by leaf), and sends only references; the consumer owns what it
receives, so a batch's memory goes when the consumer drops it.

The channel is a pipe per worker, one pickled message per item (references
and any non-array leaves), and a semaphore per worker holding its
`per_worker_buffer_size` credits. Measured on the 2-core machine, a message
costs 10-15 µs end to end, like a multiprocessing.Queue, which is noise at
one message per batch or per multi-MiB element; but a pipe has no feeder
thread, so a message is in the kernel once send() returns, and stopping can
drain and unlink every reference in flight. A worker's death shows at once
on its sentinel.

Workers take their arrays from the pool of recycled memory exactly when
the consumer does: the consumer's setting is passed to them,
whatever their environment says.

Stopping sends SIGTERM: a worker raises `_Stop` at once, except while it
creates an array and records it, or sends a message and forgets what it
held, so every array it made is either sent (drained and unlinked by the
consumer) or unlinked by the worker itself.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
from multiprocessing.reduction import ForkingPickler
import pickle
import signal
import time
import traceback
import weakref
from collections.abc import Mapping
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterator, List, Optional, Protocol, Tuple, Union,
    cast,
)

import numpy as np

from grain_shm import _shm
from grain_shm.array import SharedMemoryArray
from grain_shm.options import MultiprocessingOptions, checked_int
from grain_shm.tree import _map, _map_builtin

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Semaphore
    from types import FrameType

logger = logging.getLogger("grain_shm.prefetch")

STATE_VERSION = 1
_STOP_GRACE_S = 0.5  # after SIGTERM, before SIGKILL
_PARENT_CHECK_S = 1.0  # how often a worker blocked on a full buffer checks its parent
_PROFILE_EVERY_S = 5.0


class RandomAccessSource(Protocol):
    """What `prefetch` reads: a list, an array, a Grain MapDataset, a torch map dataset."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Any: ...


Transform = Callable[[Any], Any]
Allocate = Callable[[Tuple[int, ...], np.dtype], np.ndarray]


# -- The order: which source index each position reads, which positions each item holds.


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The stream, the same in every process: epochs of the shard (each
    shuffled by its own permutation if seeded), concatenated, then cut into
    items of `batch_size` positions (batches may span epochs)."""

    start: int  # the shard is source[start:start + size]
    size: int
    num_epochs: Optional[int]  # None: for ever
    shuffle_seed: Optional[int]
    batch_size: Optional[int]
    drop_remainder: bool

    @property
    def num_items(self) -> Optional[int]:
        if self.num_epochs is None:
            return None if self.size else 0
        total = self.size * self.num_epochs
        if self.batch_size is None:
            return total
        return total // self.batch_size if self.drop_remainder else -(-total // self.batch_size)

    def positions(self, item: int) -> range:
        if self.batch_size is None:
            return range(item, item + 1)
        start = item * self.batch_size
        stop = start + self.batch_size
        if self.num_epochs is not None:
            stop = min(stop, self.size * self.num_epochs)
        return range(start, stop)


class _Order:
    """Source indices of positions, with the current epoch's permutation cached."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self._epoch = -1
        self._permutation = np.empty(0, np.int64)

    def _permutation_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([cast(int, self._plan.shuffle_seed), epoch])
            self._permutation = rng.permutation(self._plan.size)
            self._epoch = epoch
        return self._permutation

    def source_indices(self, positions: range) -> List[int]:
        """One array operation per batch, not a few Python ones per element."""
        plan = self._plan
        epochs, offsets = np.divmod(np.arange(positions.start, positions.stop), plan.size)
        if plan.shuffle_seed is not None:
            for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
                here = epochs == epoch
                offsets[here] = self._permutation_of(epoch)[offsets[here]]
        indices: List[int] = (offsets + plan.start).tolist()
        return indices


# -- Making items: read, transform, write the array leaves where `allocate` says.


def _structure(tree: Any, leaves: List[Any]) -> Hashable:
    """The tree's shape (container types, keys in order), its leaves appended
    to `leaves` in the order tree._map_builtin visits them (jax's tree_map,
    which tree._map uses where jax is imported, sorts dict keys)."""
    if isinstance(tree, (list, tuple)):
        return type(tree), tuple(_structure(item, leaves) for item in tree)
    if isinstance(tree, Mapping):
        return type(tree), tuple((key, _structure(value, leaves)) for key, value in tree.items())
    leaves.append(tree)
    return None


def _as_array(leaf: Any) -> Optional[np.ndarray]:
    """The leaf as an array if it belongs in shared memory (arrays and numbers
    with a fixed-size, non-object dtype); strings and objects travel pickled."""
    if isinstance(leaf, (np.ndarray, np.number, np.bool_, bool, int, float, complex)):
        value = np.asarray(leaf)
        if value.dtype.kind not in "OUS":
            return value
    return None


class _Maker:
    """Makes item k: reads its elements, applies the transform, and writes
    array leaves (batches, or in a worker every array) into `allocate`'s memory."""

    def __init__(
        self,
        plan: _Plan,
        source: RandomAccessSource,
        transform: Optional[Transform],
        allocate: Optional[Allocate],
        stats: _Stats,
        timed: bool = False,
    ) -> None:
        self._plan = plan
        self._timed = timed  # time reads and transforms (profiling)
        self._order = _Order(plan)
        self._source = source
        self._transform = transform
        self._allocate = allocate  # None: elements stay as the transform made them
        self.stats = stats
        self.position = -1  # of the element being made, for error messages
        self.index = -1

    def make(self, item: int) -> Any:
        positions = self._plan.positions(item)
        indices = self._order.source_indices(positions)
        if self._plan.batch_size is None:
            element = self._element(positions[0], indices[0])
            return element if self._allocate is None else _map(self._share, element)
        return self._batch(positions, indices)

    def _element(self, position: int, index: int) -> Any:
        self.position = position
        self.index = index
        stats = self.stats
        stats.elements += 1
        if not self._timed:
            element = self._source[index]
            return element if self._transform is None else self._transform(element)
        started = time.perf_counter()
        element = self._source[index]
        read = time.perf_counter()
        if self._transform is not None:
            element = self._transform(element)
        stats.read_s += read - started
        stats.transform_s += time.perf_counter() - read
        return element

    def _share(self, leaf: Any) -> Any:
        if not isinstance(leaf, np.ndarray) or leaf.dtype.hasobject:
            return leaf
        assert self._allocate is not None
        shared = self._allocate(leaf.shape, leaf.dtype)
        np.copyto(shared, leaf, casting="no")
        self.stats.bytes += shared.nbytes
        return shared

    def _batch(self, positions: range, indices: List[int]) -> Any:
        allocate = self._allocate or (lambda shape, dtype: np.empty(shape, dtype))
        first = self._element(positions[0], indices[0])
        leaves: List[Any] = []
        structure = _structure(first, leaves)
        bare = structure is None  # the element is its only leaf: no tree to compare
        columns: List[Union[np.ndarray, List[Any]]] = []
        for leaf in leaves:
            value = _as_array(leaf)
            if value is None:
                columns.append([leaf])
            else:
                column = allocate((len(positions),) + value.shape, value.dtype)
                column[0] = value
                columns.append(column)
        for row in range(1, len(positions)):
            element = self._element(positions[row], indices[row])
            these: List[Any] = []
            if bare:
                these.append(element)
            elif _structure(element, these) != structure:
                raise ValueError(
                    f"element {self.position} (source index {self.index}) is not structured "
                    f"like the batch's first element (containers, keys and their order "
                    f"must match)"
                )
            for filling, leaf in zip(columns, these):
                if isinstance(filling, list):
                    filling.append(leaf)
                    continue
                value = np.asarray(leaf)
                if value.shape != filling.shape[1:] or value.dtype != filling.dtype:
                    raise ValueError(
                        f"element {self.position} (source index {self.index}) has a leaf of "
                        f"shape {value.shape} and dtype {value.dtype} where the batch's "
                        f"first element has {filling.shape[1:]} and {filling.dtype}"
                    )
                filling[row] = value
        self.stats.bytes += sum(c.nbytes for c in columns if isinstance(c, np.ndarray))
        filled = iter(columns)  # in _structure's order: rebuilt by the same walk
        return _map_builtin(lambda _: next(filled), first)


@dataclasses.dataclass
class _Stats:
    """A worker's running totals, sent with each item when profiling."""

    elements: int = 0
    bytes: int = 0
    read_s: float = 0.0
    transform_s: float = 0.0
    blocked_s: float = 0.0
    alive_s: float = 0.0


# -- The worker process.


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
    channel: Connection,
    credits: Semaphore,
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
    try:
        try:
            _match_pool(pool)
            source, transform = pickle.loads(payload) if isinstance(payload, bytes) else payload
            maker = _Maker(plan, source, transform, allocate, stats, timed=profiling)
        except Exception as error:
            with guard:
                channel.send((item, _failure(worker, None, error), [], None))
            return
        end = plan.num_items
        while end is None or item < end:
            if not credits.acquire(block=False):
                blocked = time.perf_counter()
                while not credits.acquire(timeout=_PARENT_CHECK_S):
                    if parent is not None and not parent.is_alive():
                        raise _Stop
                stats.blocked_s += time.perf_counter() - blocked
            try:
                tree = maker.make(item)
                stats.alive_s = time.perf_counter() - started
                # Pickled before sending, so that a leaf pickle refuses is this
                # item's error; `held` and the tree share their arrays (memo).
                message = ForkingPickler.dumps((item, tree, held, stats if profiling else None))
            except Exception as error:
                _discard(held)
                with guard:
                    channel.send((item, _failure(worker, maker, error), [], None))
                return
            with guard:
                channel.send_bytes(message)
                held.clear()
            del tree, message
            item += num_workers
    except (_Stop, BrokenPipeError):
        pass
    finally:
        _discard(held)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing left to stop: exit in peace


def _discard(arrays: List[SharedMemoryArray]) -> None:
    """Unlink arrays never sent (they go when the worker drops them)."""
    for array in arrays:
        array.unlink_on_del()
    arrays.clear()


# -- The consumer's side.


class _Profile:
    """Per-worker figures from the stats the workers send, logged every few seconds."""

    def __init__(self, num_workers: int) -> None:
        self.started = time.perf_counter()
        self.last_log = self.started
        self.stats: List[Optional[_Stats]] = [None] * num_workers
        self.waited_s = 0.0

    def update(self, worker: int, stats: _Stats) -> None:
        self.stats[worker] = stats
        if time.perf_counter() - self.last_log >= _PROFILE_EVERY_S:
            self.log()

    def log(self, final: bool = False) -> None:
        now = time.perf_counter()
        self.last_log = now
        when = "at the end" if final else "so far"
        for worker, stats in enumerate(self.stats):
            if stats is None:
                continue
            alive = max(stats.alive_s, 1e-9)
            logger.info(
                "prefetch worker %d %s: %.1f elements/s, %.1f MB/s, %.2f s in transform "
                "(%.0f%%), %.2f s reading the source, %.2f s blocked on a full buffer (%.0f%%)",
                worker, when, stats.elements / alive, stats.bytes / alive / 1e6,
                stats.transform_s, 100 * stats.transform_s / alive, stats.read_s,
                stats.blocked_s, 100 * stats.blocked_s / alive,
            )
        elapsed = max(now - self.started, 1e-9)
        logger.info(
            "prefetch consumer %s: %.2f s waiting for data (%.0f%% of %.2f s)",
            when, self.waited_s, 100 * self.waited_s / elapsed, elapsed,
        )


class _Workers:
    """One run of worker processes: their channels, credits, and how to stop them."""

    def __init__(
        self,
        ctx: BaseContext,
        num_workers: int,
        first_item: int,
        plan: _Plan,
        payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]],
        buffer_size: int,
        profiling: bool,
    ) -> None:
        self.procs: List[BaseProcess] = []
        self.channels: List[Connection] = []
        self.credits: List[Semaphore] = []
        self.exited: set[int] = set()  # workers that ended well (exit code 0)
        self.profile = _Profile(num_workers) if profiling else None
        pool = _pool_setting()
        try:
            for worker in range(num_workers):
                receive, send = ctx.Pipe(duplex=False)
                credits = ctx.Semaphore(buffer_size)
                proc = ctx.Process(  # type: ignore[attr-defined]
                    target=_work,
                    args=(worker, num_workers, first_item + worker, plan, payload, send,
                          credits, profiling, pool),
                    name=f"grain_shm-prefetch-{worker}",
                    daemon=True,
                )
                self.procs.append(proc)
                self.channels.append(receive)
                self.credits.append(credits)
                proc.start()
                send.close()  # the worker's end: only the worker holds it now
        except BaseException:
            self.stop()
            raise

    def receive(self, item: int) -> Any:
        """Item `item`, owned by this process; raises what its worker raised."""
        worker = item % len(self.procs)
        channel = self.channels[worker]
        if not channel.poll():
            waiting = time.perf_counter()
            self._wait_for(worker, item)
            if self.profile is not None:
                self.profile.waited_s += time.perf_counter() - waiting
        try:
            got, tree, arrays, stats = channel.recv()
        except EOFError:
            raise self._death(worker, item) from None
        for array in arrays:
            array.unlink_on_del()
        self.credits[worker].release()
        if isinstance(tree, _Failure):
            _raise(tree)
        assert got == item, f"worker {worker} sent item {got} for {item}"
        if self.profile is not None and stats is not None:
            self.profile.update(worker, stats)
        return tree

    def _wait_for(self, worker: int, item: int) -> None:
        """Until `worker`'s channel is readable; a worker that died is an error now."""
        channel = self.channels[worker]
        while True:
            watched = {
                proc.sentinel: w for w, proc in enumerate(self.procs) if w not in self.exited
            }
            ready = multiprocessing.connection.wait([channel, *watched])
            if channel in ready:
                return
            for sentinel in ready:
                w = watched[sentinel]  # type: ignore[index]
                self.procs[w].join(timeout=1.0)  # its sentinel closes just before it is reaped
                if self.procs[w].exitcode != 0 or (w == worker and not channel.poll()):
                    raise self._death(w, item)
                self.exited.add(w)

    def _death(self, worker: int, item: int) -> RuntimeError:
        proc = self.procs[worker]
        proc.join(timeout=1.0)
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return RuntimeError(
            f"prefetch worker {worker} (pid {proc.pid}) {how}; the consumer was waiting "
            f"for item {item}"
        )

    def stop(self) -> None:
        """Stop every worker (each unlinks what it holds), then unlink whatever
        they sent that the consumer never took. Within about _STOP_GRACE_S."""
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        live = [proc for proc in self.procs if proc.pid is not None]
        while True:
            self._drain()  # a worker blocked on a full pipe gets to finish its send
            live = [proc for proc in live if proc.exitcode is None]
            remaining = deadline - time.monotonic()
            if not live or remaining <= 0:
                break
            multiprocessing.connection.wait(
                [*self.channels, *(proc.sentinel for proc in live)], timeout=remaining
            )
        for proc in live:
            proc.kill()  # what it held stays until the session ends (the reaper)
        for proc in self.procs:
            if proc.pid is not None:
                proc.join()
        self._drain()
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            proc.close()
        self.procs, self.channels, self.credits = [], [], []
        if self.profile is not None:
            self.profile.log(final=True)
            self.profile = None

    def _drain(self) -> None:
        """Take and unlink every message waiting; forget channels at their end."""
        open_channels = []
        for channel in self.channels:
            try:
                while channel.poll():
                    _, _, arrays, _ = channel.recv()
                    for array in arrays:
                        array.unlink_on_del()
                    del arrays
            except (EOFError, OSError):
                channel.close()
                continue
            except Exception:  # a torn message from a killed worker: nothing to take
                pass
            open_channels.append(channel)
        self.channels = open_channels


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


# -- The public API.


class Prefetcher(Iterator[Any]):
    """The stream of elements (or batches) that `prefetch` describes.

    An iterator and a context manager. Workers start at the first `next()`;
    `close()` (also on `with` exit, on garbage collection, and on an error)
    stops them and releases everything in flight. Batches from workers are
    SharedMemoryArrays this process owns: their memory goes when they do.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        transform: Optional[Transform],
        options: MultiprocessingOptions,
        plan: _Plan,
        ctx: BaseContext,
        fingerprint: Dict[str, Any],
    ) -> None:
        self._options = options
        self._plan = plan
        self._ctx = ctx
        self._fingerprint = fingerprint
        self._next = 0
        self._workers: Optional[_Workers] = None
        self._stopper: Optional[weakref.finalize] = None  # type: ignore[type-arg]
        self._inline: Optional[_Maker] = None
        self._payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]]
        if options.num_workers == 0:
            self._inline = _Maker(plan, source, transform, None, _Stats())
        elif ctx.get_start_method() == "fork":
            self._payload = (source, transform)
        else:
            self._payload = _pickled(source, transform, ctx.get_start_method())

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        end = self._plan.num_items
        if end is not None and self._next >= end:
            self.close()
            raise StopIteration
        if self._inline is not None:
            try:
                value = self._inline.make(self._next)
            except Exception as error:
                if hasattr(error, "add_note"):
                    error.add_note(
                        f"(raised at element {self._inline.position} of the stream, "
                        f"source index {self._inline.index})"
                    )
                raise
        else:
            if self._workers is None:
                self._start()
            assert self._workers is not None
            try:
                value = self._workers.receive(self._next)
            except BaseException:  # a worker's error, a dead worker, Ctrl-C
                self.close()
                raise
        self._next += 1
        return value

    def _start(self) -> None:
        self._workers = _Workers(
            self._ctx,
            self._options.num_workers,
            self._next,
            self._plan,
            self._payload,
            self._options.per_worker_buffer_size,
            self._options.enable_profiling,
        )
        self._stopper = weakref.finalize(self, self._workers.stop)

    def close(self) -> None:
        """Stop the workers and release what they made and nobody took. The
        next `next()` starts them again where the stream stands."""
        if self._stopper is not None:
            self._stopper()
        self._stopper = None
        self._workers = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_state(self) -> Dict[str, Any]:
        """Where the stream stands: a small JSON-serialisable dict."""
        return {"version": STATE_VERSION, "next_index": self._next, **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume at the item after the one `state` was taken at, whatever
        num_workers is. The other arguments must be those `state` came from."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"not a prefetcher state of version {STATE_VERSION}: {state!r}")
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise ValueError(
                    f"the state was taken with {key}={state.get(key)!r}; this prefetcher "
                    f"has {key}={value!r}"
                )
        next_index = state.get("next_index")
        if isinstance(next_index, bool) or not isinstance(next_index, int) or next_index < 0:
            raise ValueError(f"next_index must be an int >= 0, not {next_index!r}")
        self.close()
        self._next = next_index


def _pickled(source: RandomAccessSource, transform: Optional[Transform], method: str) -> bytes:
    """(source, transform) pickled once for every worker; TypeError if it cannot be."""
    for what, value in (("source", source), ("transform", transform)):
        try:
            pickle.dumps(value)
        except Exception as error:
            raise TypeError(
                f"the {what} cannot be pickled, which the {method!r} start method needs to "
                f"send it to the workers ({type(error).__name__}: {error}); define it at "
                f"module level, or use mp_context='fork'"
            ) from error
    return pickle.dumps((source, transform))


def _int_or_none(name: str, value: Any, minimum: int) -> Optional[int]:
    return None if value is None else checked_int(name, value, minimum)


def prefetch(
    source: RandomAccessSource,
    transform: Optional[Transform] = None,
    *,
    options: MultiprocessingOptions = MultiprocessingOptions(),
    batch_size: Optional[int] = None,
    drop_remainder: bool = False,
    shuffle_seed: Optional[int] = None,
    num_epochs: Optional[int] = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    mp_context: Union[str, BaseContext] = "spawn",
) -> Prefetcher:
    """`transform(source[i])` for the shard's indices, made in
    `options.num_workers` processes, in an order that does not depend on them.

    Args:
      source: random access, `len()` and `source[i]`.
      transform: applied to each element in the workers; elements are arrays,
        numbers, strings, or dicts/lists/tuples of them.
      options: num_workers (0: in this process), per_worker_buffer_size
        (finished items a worker may hold ahead of the consumer),
        enable_profiling (log per-worker figures on "grain_shm.prefetch").
        Grain's MultiprocessingOptions work too.
      batch_size: stack this many consecutive elements leaf by leaf into one
        array per leaf (in shared memory from workers); non-array leaves
        become lists. Batches may span epochs.
      drop_remainder: drop a last, short batch.
      shuffle_seed: a fixed permutation per epoch (None: source order).
      num_epochs: passes over the shard (None: for ever).
      shard_index, shard_count: read the shard_index-th of shard_count
        contiguous, near-equal parts of the source (one per host).
      mp_context: "spawn", "forkserver", "fork" or a multiprocessing context.

    Raises:
      TypeError: a source or transform that the start method cannot pickle.
      ValueError: enable_profiling with num_workers=0, or bad arguments.
    """
    options = MultiprocessingOptions(  # Grain's options too; validated here
        options.num_workers, options.per_worker_buffer_size, options.enable_profiling
    )
    if options.enable_profiling and options.num_workers == 0:
        raise ValueError("enable_profiling needs num_workers >= 1 (profiling is per worker)")
    batch_size = _int_or_none("batch_size", batch_size, 1)
    num_epochs = _int_or_none("num_epochs", num_epochs, 0)
    shuffle_seed = _int_or_none("shuffle_seed", shuffle_seed, 0)
    shard_count = checked_int("shard_count", shard_count, 1)
    shard_index = checked_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count ({shard_count}), got {shard_index}")
    length = len(source)
    base, extra = divmod(length, shard_count)  # Grain's even split
    start = shard_index * base + min(shard_index, extra)
    size = base + (shard_index < extra)
    plan = _Plan(start, size, num_epochs, shuffle_seed, batch_size, bool(drop_remainder))
    ctx = multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
    fingerprint = {
        "source_length": length,
        "batch_size": batch_size,
        "drop_remainder": bool(drop_remainder),
        "shuffle_seed": shuffle_seed,
        "num_epochs": num_epochs,
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
    return Prefetcher(source, transform, options, plan, ctx, fingerprint)

"""The multi-process prefetcher: MultiprocessingOptions put to work.

Item k of the stream (an element, or a batch of `batch_size` consecutive
elements) is made by worker (k - first) % num_workers, where `first` is the
item the workers started at (0, or where a checkpoint or close() left the
stream), and the consumer takes item k from that worker's channel: so the
order is the same for every worker count, 0 included (everything in the
calling process), and a run resumes at any item. A worker writes each array
leaf once, straight into a SharedMemoryArray (a batch is assembled in place,
leaf by leaf), and sends only references; the consumer owns each array
from the moment it opens it, so a batch's memory goes when the consumer
drops it, or when its item fails halfway through unpickling.

Workers take their arrays from the pool of recycled memory unless
recycle=False or GRAIN_SHM_RECYCLE=0: nobody looks their arrays up by name,
so the pool is invisible there, but for speed. The consumer decides and
tells them, whatever their environment says.

This module is the public API and the stream's position (pass and item);
its parts live in grain_shm._prefetch: the order (plan), making items
(maker), tensors as leaves (tensors), what spawned workers are sent
(payload), the worker process (worker), a worker's exception (failure),
one item's message (message) and the consumer's side (consumer).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Protocol, Tuple, Union

from grain_shm._prefetch.consumer import _Workers
from grain_shm._prefetch.maker import _Maker, _Stats
from grain_shm._prefetch.payload import pickled
from grain_shm._prefetch.plan import _Plan
from grain_shm.options import MultiprocessingOptions, checked_int

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from grain_shm._prefetch.maker import Transform

STATE_VERSION = 1


class RandomAccessSource(Protocol):
    """What `prefetch` reads: a list, an array, a Grain MapDataset, a torch map dataset."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> Any: ...


# -- The public API.


class Prefetcher(Iterator[Any]):
    """The stream of elements (or batches) that `prefetch` describes.

    An iterator and a context manager. Workers start at the first `next()`;
    `close()` (also on `with` exit, on garbage collection, and on an error)
    stops them and releases everything in flight. Batches from workers are
    SharedMemoryArrays this process owns: their memory goes when they do.

    As a DataLoader: `len()` is the number of items a pass yields, and
    iterating again after a pass's last item starts the next pass (the next
    `num_epochs` epochs, each in its own order); `next()` on a finished pass
    keeps raising StopIteration, as an iterator does.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        transform: Optional[Transform],
        options: MultiprocessingOptions,
        plan: _Plan,
        ctx: BaseContext,
        fingerprint: Dict[str, Any],
        recycle: Optional[bool] = None,
    ) -> None:
        self._options = options
        self._recycle = recycle
        self._plan = plan
        self._source, self._transform = source, transform
        self._epoch = 0  # passes begun before this one (each num_epochs epochs of the shard)
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
            self._payload = pickled(source, transform, ctx.get_start_method())

    def __iter__(self) -> Prefetcher:
        end = self._plan.num_items
        if end and self._next >= end:  # a new loop over a finished pass: the next one
            self._seek(self._epoch + 1, 0)
        return self

    def __len__(self) -> int:
        """Items per pass: after sharding, batching and drop_remainder."""
        items = self._plan.num_items
        if items is None:
            raise TypeError("an endless prefetcher (num_epochs=None) has no len()")
        return items

    def __bool__(self) -> bool:
        return True  # an iterator, whatever its len()

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
            if self._workers is not None and self._workers.forgotten:
                self.close()  # a forked child's copy: it reads on with workers of its own
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
            self._recycle,
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
        return {"version": STATE_VERSION, "epoch": self._epoch, "next_index": self._next,
                **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume at the item after the one `state` was taken at, in its pass,
        whatever num_workers is. The other arguments must be those `state`
        came from. (A state of before passes were recorded is pass 0.)"""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"not a prefetcher state of version {STATE_VERSION}: {state!r}")
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise ValueError(
                    f"the state was taken with {key}={state.get(key)!r}; this prefetcher "
                    f"has {key}={value!r}"
                )
        positions = {"next_index": state.get("next_index"), "epoch": state.get("epoch", 0)}
        for key, value in positions.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, not {value!r}")
        self._seek(positions["epoch"], positions["next_index"])

    def _seek(self, epoch: int, next_index: int) -> None:
        """Stand before item `next_index` of pass `epoch`."""
        self.close()
        num_epochs = self._plan.num_epochs or 0  # an endless stream has one pass
        self._plan = dataclasses.replace(self._plan, first_epoch=epoch * num_epochs)
        self._epoch = epoch if num_epochs else 0
        self._next = next_index
        if self._inline is not None:
            self._inline = _Maker(self._plan, self._source, self._transform, None, _Stats())


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
    recycle: Optional[bool] = None,
    rng_seed: Optional[int] = None,
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
      rng_seed: call `transform(element, rng)` with a numpy Generator made
        from (rng_seed, epoch, source index) only: an element draws the same
        numbers whatever num_workers, start method, shard or resume point
        (Grain's random-map contract), and other ones in the next epoch.
        None: `transform(element)`.
      recycle: whether the workers take arrays from the pool of recycled
        memory (None: yes, unless GRAIN_SHM_RECYCLE is set and leaves this
        process's pool off, e.g. "0"; with this process's bound if it pools).
        Invisible but for speed: their arrays are never looked up by name.

    Raises:
      TypeError: a source or transform that the start method cannot pickle,
        or that uses a function or class of a `__main__` its workers cannot
        import (python -c, stdin, an interactive session, a notebook).
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
    rng_seed = _int_or_none("rng_seed", rng_seed, 0)
    if rng_seed is not None and transform is None:
        raise ValueError("rng_seed is for the transform's draws: give a transform")
    shard_count = checked_int("shard_count", shard_count, 1)
    shard_index = checked_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count ({shard_count}), got {shard_index}")
    length = len(source)
    base, extra = divmod(length, shard_count)  # Grain's even split
    start = shard_index * base + min(shard_index, extra)
    size = base + (shard_index < extra)
    plan = _Plan(start, size, num_epochs, shuffle_seed, batch_size, bool(drop_remainder),
                 rng_seed=rng_seed)
    ctx = multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
    fingerprint = {
        "source_length": length,
        "batch_size": batch_size,
        "drop_remainder": bool(drop_remainder),
        "shuffle_seed": shuffle_seed,
        "num_epochs": num_epochs,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "rng_seed": rng_seed,
    }
    if recycle is not None and not isinstance(recycle, bool):
        raise TypeError(f"recycle must be None, True or False, not {recycle!r}")
    return Prefetcher(source, transform, options, plan, ctx, fingerprint, recycle)

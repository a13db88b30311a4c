"""SharedMemoryArray: a thin ndarray subclass over a grain_shm segment.

The array's memory is a `Segment` of the core, reachable through `arr.base`,
so every view keeps the mapping alive and the last one to die releases it.
Pickling sends a reference (name, shape, dtype, strides, byte offset, and
for a pool block its index and generation), never the bytes: a view arrives
as the same elements over the same memory.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Optional, SupportsIndex, Tuple

import numpy as np

if TYPE_CHECKING:  # annotations only: numpy.typing costs ~1 ms to import
    import numpy.typing as npt

from grain_shm import _shm, names, session


@dataclasses.dataclass(slots=True, frozen=True)
class SharedMemoryArrayMetadata:
    """What a process needs to map an array another process put in shared memory.

    `strides` is None for a C-contiguous array; `offset` is the byte offset of
    the first element from the start of the segment. `block` is None for an
    array in a segment of its own, else the (index, generation) of its block
    in the pool arena `name` (see `SharedMemoryArray.enable_recycling`).
    """

    name: str
    shape: Iterable[int]
    dtype: npt.DTypeLike
    strides: Optional[Tuple[int, ...]] = None
    offset: int = 0
    block: Optional[Tuple[int, int]] = None

    def close_and_unlink_shm(self) -> None:
        """Remove the segment's name; processes that map it keep their mappings."""
        if self.block is None:
            _shm.unlink(self.name)
        else:
            _shm.unlink_block(self.name, *self.block)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Grain's way (copy_to_shm, then pickle the structure) sends metadata:
        # the dataclass's own pickling, with its np.dtype, cost 7.4 us a round
        # trip, five times the array's. A flat tuple and the dtype's string.
        if type(self) is not SharedMemoryArrayMetadata or not isinstance(self.dtype, np.dtype):
            return object.__reduce_ex__(self, protocol)  # a subclass, or a user's dtype as given
        return _rebuild_metadata, (self.name, self.shape, _dtype_token(self.dtype),
                                   self.strides, self.offset, self.block)


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(
            f"dtype {dtype} holds Python objects, which cannot live in shared memory"
        )
    return dtype


def _count(name: str, value: Any, limit: int) -> int:
    """`value` as an int from 1 to `limit`; TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be 1 to {limit}, not {value}")
    return int(value)


def _span(
    shape: Tuple[int, ...], strides: Tuple[int, ...], itemsize: int, offset: int
) -> Tuple[int, int]:
    """The bytes [low, high) of the segment the elements reach; ValueError if
    any lies before it."""
    if 0 in shape:
        return offset, offset
    low = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0)
    if low < 0:
        raise ValueError(f"offset {offset} and strides {strides} reach before the segment")
    return low, high + itemsize


class SharedMemoryArray(np.ndarray):
    """A NumPy array in POSIX shared memory that pickles as a reference.

    Send it to another process (pickle, multiprocessing queues) and that
    process maps the same memory, with no copy. The name is unlinked when the
    array marked with `unlink_on_del()`, and every view of it, is gone.

    A new array in a fresh segment starts zeroed (the kernel's new pages),
    padding bytes included; one from the pool (`enable_recycling`) is not
    zeroed: it starts with whatever its block last held, like `np.empty`.
    """

    def __new__(cls, shape: Iterable[int], dtype: npt.DTypeLike = float) -> SharedMemoryArray:
        dtype = _check_dtype(dtype)
        shape, nbytes = _shm.layout(shape, dtype.itemsize)
        if not session.joined:  # the only per-array cost of sessions
            session.join()
        segment = _shm.create(nbytes, session.creation_prefix())
        try:
            return _shm.wrap(cls, segment, shape, dtype, 0, None)
        except BaseException:  # e.g. too many dimensions: leave nothing behind
            segment.mark_unlink_on_release()
            raise

    @classmethod
    def from_metadata(cls, metadata: SharedMemoryArrayMetadata) -> SharedMemoryArray:
        """Map the array `metadata` describes; the result does not own the name."""
        return _map(
            cls,
            metadata.name,
            metadata.shape,
            metadata.dtype,
            getattr(metadata, "strides", None),  # Grain's metadata has none of these
            getattr(metadata, "offset", 0),
            getattr(metadata, "block", None),
        )

    @property
    def metadata(self) -> SharedMemoryArrayMetadata:
        """A picklable reference to exactly these elements."""
        metadata = _metadata_of(self)
        if metadata is None:
            raise ValueError(
                "this SharedMemoryArray is a copy in private memory, not a view "
                "of shared memory (e.g. the result of .copy() or fancy indexing)"
            )
        return metadata

    def unlink_on_del(self) -> None:
        """Make this process unlink the name once this array and its views are gone.

        On a private copy (`.copy()`, `.astype()`) there is no name: nothing
        happens, as in Grain."""
        segment = _shm.segment_of(self)
        if segment is not None:
            segment.mark_unlink_on_release()

    @property
    def _unlink_on_del(self) -> bool:
        segment = _shm.segment_of(self)
        return segment is not None and segment.unlink_on_release

    @classmethod
    def enable_async_del(
        cls, num_threads: int = 1, max_outstanding_requests: int = 50
    ) -> None:
        """Release segments on background threads from now on, in this process.

        When the last array or view over a segment dies, its release (munmap,
        and shm_unlink if this process owns the name) is pushed onto a bounded
        queue in C, served by `num_threads` pthreads that never take the GIL,
        so `del` costs a queue push instead of two system calls. At most
        `max_outstanding_requests` releases are pending (queued or in flight);
        beyond that a release happens inline, so the memory, mappings and
        names held by pending releases stay bounded.

        Calling it again while enabled does not add threads: `num_threads` is
        checked but ignored, and `max_outstanding_requests` becomes the new
        bound (higher or lower; releases already queued stay queued). After
        `fork()` the child keeps these settings with threads of its own.
        Pending releases are finished at interpreter exit.

        Raises:
          TypeError: an argument is not an int (bools are refused too).
          ValueError: `num_threads` is not 1 to 64, or
            `max_outstanding_requests` is not 1 to 2**20.
        """
        _shm.enable_async_release(
            _count("num_threads", num_threads, _shm.MAX_THREADS),
            _count(
                "max_outstanding_requests", max_outstanding_requests, _shm.MAX_OUTSTANDING
            ),
        )

    @classmethod
    def _disable_async_del(cls) -> None:
        """Finish pending releases and stop the threads (Grain's tests call it)."""
        _shm.stop_async_release()

    @classmethod
    def enable_recycling(cls, max_bytes: Optional[int] = None) -> None:
        """Take new arrays from a pool of recycled shared memory, in this process.

        A fresh segment costs about ten system calls and a page fault per
        4 KiB page, the first time its memory is touched; the pool's memory is
        faulted in once, and reused. Each new array is a block of an arena
        (a segment the pool carved up); its metadata names the arena and the
        block. Everything else behaves as with a segment of its own: a block
        is reused only after it has been unlinked (`unlink_on_del()`,
        `close_and_unlink_shm()`) and no process maps it any more, and a
        stale reference raises FileNotFoundError. Receivers need not enable
        anything: they map each arena once and keep it mapped. A pooled
        array's memory is not zeroed: it holds what its block last held,
        like `np.empty` (a fresh segment starts zeroed).

        `max_bytes` bounds this process's arenas (default: a quarter of
        /dev/shm); an arena may take at most half of it. Past it, and for
        arrays too large for an arena, arrays get fresh segments as before:
        the pool never raises where a fresh segment would not. An arena that
        has been all free for two seconds is returned to the system at the
        pool's next use, and at exit. Calling it again sets a new bound.
        GRAIN_SHM_RECYCLE=1 (or a byte count) in the environment turns it
        on at import, in every process that inherits it; GRAIN_SHM_RECYCLE=0
        keeps it off, also where it is on by default (prefetch's workers,
        processes patched for Grain).

        Raises:
          TypeError: `max_bytes` is not an int.
          ValueError: `max_bytes` is below 1.
        """
        _shm.enable_pool(
            _default_pool_bytes() if max_bytes is None else _count("max_bytes", max_bytes, 1 << 62),
            session.SESSION_PREFIX.encode(),  # arenas are the session's segments
        )

    @classmethod
    def _disable_recycling(cls) -> None:
        """New arrays get fresh segments again (for tests); live blocks stay valid."""
        _shm.disable_pool()

    def __reduce_ex__(self, protocol: Any) -> Any:
        reference = _shm.reference(self)
        if reference is None:  # a private copy: send the bytes
            return self.view(np.ndarray).__reduce_ex__(protocol)
        name, shape, dtype, strides, offset, block = reference
        # A flat tuple, not a metadata object: pickling that costs more than
        # the mapping itself.
        args = (name, shape, _dtype_token(dtype), strides, offset)
        subclass = () if type(self) is SharedMemoryArray else (type(self),)
        if block is not None:
            return _rebuild_block, args + block + subclass
        return _rebuild, args + subclass

    # As numpy.memmap: results of ufuncs and reductions are not shared memory
    # (plain ndarrays); in C, since every ufunc call runs it.
    __array_wrap__ = _shm.array_wrap

    # As numpy.memmap: fancy indexing copies, and a copy is a plain ndarray.
    __getitem__ = _shm.array_getitem


_shm.register_array_type(SharedMemoryArray)


def _dtype_token(dtype: np.dtype) -> str | np.dtype:
    """The dtype's string where it rebuilds the very same dtype (five times
    cheaper to pickle), else the dtype itself: structured dtypes, dtypes
    with metadata, and those other packages register (bfloat16 is "<V2").
    No cache: a dtype with metadata compares equal to the one without."""
    if dtype.isbuiltin == 1:  # numpy's own, native order, no metadata
        return dtype.str
    if dtype.isbuiltin == 0 and dtype.metadata is None and np.dtype(dtype.str) == dtype:
        return dtype.str
    return dtype


def _metadata_of(arr: np.ndarray) -> Optional[SharedMemoryArrayMetadata]:
    """The metadata of `arr`'s elements if they are in a segment, else None."""
    reference = _shm.reference(arr)
    return None if reference is None else SharedMemoryArrayMetadata(*reference)


def _map(
    cls: type[SharedMemoryArray],
    name: str,
    shape: SupportsIndex | Iterable[SupportsIndex],
    dtype: npt.DTypeLike,
    strides: Optional[Iterable[SupportsIndex]],
    offset: SupportsIndex,
    block: Optional[Tuple[SupportsIndex, SupportsIndex]] = None,
) -> SharedMemoryArray:
    """Map the elements a reference describes; checks it against the segment
    (or the block)."""
    dtype = _check_dtype(dtype)
    shape, nbytes = _shm.layout(shape, dtype.itemsize)
    offset = operator.index(offset)
    if offset < 0:
        raise ValueError(f"negative offset: {offset}")
    if strides is None:
        low, high = offset, offset + nbytes
    else:
        strides = tuple(operator.index(s) for s in strides)
        if len(strides) != len(shape):
            raise ValueError(f"strides {strides} do not match shape {shape}")
        low, high = _span(shape, strides, dtype.itemsize, offset)
    if not session.joined:
        session.join()
    if block is None:
        segment = _shm.open(name, high)
    else:
        index, generation = block
        segment = _shm.open_block(name, operator.index(index), operator.index(generation), low, high)
        offset -= segment.origin
    return _shm.wrap(cls, segment, shape, dtype, offset, strides)


def _rebuild(
    name: str,
    shape: SupportsIndex | Iterable[SupportsIndex],
    dtype: npt.DTypeLike,
    strides: Optional[Iterable[SupportsIndex]],
    offset: SupportsIndex,
    cls: type[SharedMemoryArray] = SharedMemoryArray,
) -> SharedMemoryArray:
    """Unpickle: map the sender's elements, without taking ownership."""
    return _map(cls, name, shape, dtype, strides, offset)


def _rebuild_block(
    name: str,
    shape: SupportsIndex | Iterable[SupportsIndex],
    dtype: npt.DTypeLike,
    strides: Optional[Iterable[SupportsIndex]],
    offset: SupportsIndex,
    index: SupportsIndex,
    generation: SupportsIndex,
    cls: type[SharedMemoryArray] = SharedMemoryArray,
) -> SharedMemoryArray:
    """Unpickle an array in a pool block: map its arena (once), take a reference."""
    return _map(cls, name, shape, dtype, strides, offset, (index, generation))


def _rebuild_metadata(
    name: str,
    shape: Iterable[int],
    dtype: npt.DTypeLike,
    strides: Optional[Tuple[int, ...]],
    offset: int,
    block: Optional[Tuple[int, int]],
) -> SharedMemoryArrayMetadata:
    """Unpickle metadata whose np.dtype was sent as its string (if it could be)."""
    return SharedMemoryArrayMetadata(
        name, shape, np.dtype(dtype) if type(dtype) is str else dtype, strides, offset, block
    )


def _default_pool_bytes() -> int:
    """A quarter of /dev/shm: room for the pool without starving fresh segments
    (blocks round sizes up by at most a quarter; idle arenas hold memory)."""
    space = names.shm_space()
    return max((space[0] if space else 0) // 4, 1 << 20)


_OFF = ("0", "false", "no", "off")


def recycling_chosen() -> bool:
    """Whether GRAIN_SHM_RECYCLE says anything: then this process's pool is
    what it said (applied at import: "0" or a bad value is off), also where
    grain_shm pools by default (the prefetcher's workers, Grain's pipelines
    under patch_grain())."""
    return bool(os.environ.get("GRAIN_SHM_RECYCLE", "").strip())


def _recycling_from_environment() -> None:
    """GRAIN_SHM_RECYCLE: "1" (the default bound) or a byte count turns the pool
    on at import; "0" (or "off") turns it off, "" leaves the default (off
    here; on in the prefetcher's workers and under patch_grain())."""
    value = os.environ.get("GRAIN_SHM_RECYCLE", "").strip()
    if value.lower() in ("", *_OFF):
        return
    try:
        max_bytes = None if value.lower() in ("1", "true", "yes", "on") else int(value)
        SharedMemoryArray.enable_recycling(max_bytes)
    except (TypeError, ValueError):
        warnings.warn(
            f"grain_shm: GRAIN_SHM_RECYCLE={value!r} is neither 0, 1 nor a byte count; "
            "recycling stays off"
        )


_recycling_from_environment()

"""The transports under comparison, each reduced to the same few moves.

Every section times the same sequence for every transport, so the figures
differ only by what the transport does:

- `create(nbytes, owner)`: a fresh uint8 array this process will fill;
  `owner=True` makes this holder the one that removes it.
- `message(held)`: what goes on a `multiprocessing.Queue` (pickled by it).
- `open(message)`: the receiving side's array, owned (it removes it).
- `release(held)`: what a holder does to let go: drop the array, close,
  and unlink if it owns the name.
- `reference(held)`: what `unlink()` needs to remove the array later, taken
  only where a clean-up may need it (the transfer's producer): the name,
  or for grain_shm the metadata (a pooled array's name is its arena's,
  shared with other arrays), which costs more than the name.
- `unlink(reference)`: error clean-up for arrays sent but maybe never opened.

Each transport also names the queue its messages travel through in the
transfer section (`queue`, a kind of bench.queues: multiprocessing.Queue
unless it says otherwise) and the sections it takes part in (`sections`: a
transport defined by its queue alone has nothing to add to create+fill+destroy
or release). A transport whose arrays live in its queue's own memory
(iceoryx2) is handed that queue's end by `bind()` before the first array.

Each transport is used the way its documentation shows. Imports happen in
`prepare()`, inside the cell's own process, so a missing optional package
(or an unimplemented feature) skips that transport's cells with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Protocol, Tuple, Type

import numpy as np

if TYPE_CHECKING:
    from grain_shm import SharedMemoryArray

# Names the benchmark itself makes in /dev/shm (SharedArray's, the ceilings').
NAME_PREFIX = "grain_shm_bench_"


class Unavailable(Exception):
    """This transport cannot run here; its cells are skipped with this reason."""


class Held:
    """One holder's grip on one array: the array, its name, what release needs."""

    __slots__ = ("array", "name", "handle", "owner")

    # `array`: an ndarray (the transport's own subclass, for some), set to None
    # by release(); `handle`: whatever release() needs (the stdlib's
    # SharedMemory), else None. Both Any: the moves between create()/open()
    # and release() use them without None checks.
    def __init__(
        self, array: Any, name: Optional[str] = None, handle: Any = None, owner: bool = False
    ) -> None:
        self.array = array
        self.name = name
        self.handle = handle
        self.owner = owner


class Transport(Protocol):
    """What every class in TRANSPORTS provides (see the module's docstring)."""

    name: str
    # What it needs, checked by missing(): a module, or "module:attribute".
    requires: Optional[str]
    queue: str  # the transfer's queue, a kind of bench.queues
    sections: Tuple[str, ...]  # the sections it runs in

    def prepare(self) -> None: ...
    def bind(self, end: Any) -> None: ...
    def create(self, nbytes: int, owner: bool) -> Held: ...
    def message(self, held: Held) -> Any: ...
    def open(self, message: Any) -> Held: ...
    def release(self, held: Held) -> None: ...
    def reference(self, held: Held) -> Any: ...
    def unlink(self, reference: Any) -> None: ...


class Base:
    """The defaults: no requirement, multiprocessing.Queue, every section."""

    requires: Optional[str] = None
    queue = "multiprocessing.Queue"
    sections: Tuple[str, ...] = ("transfer", "cfd", "release")

    def bind(self, end: Any) -> None:
        """Most transports need nothing of the queue but put and get."""


class Pickle(Base):
    """The baseline: the ndarray itself goes through the queue, bytes and all."""

    name = "pickle"

    def prepare(self) -> None:
        pass

    def create(self, nbytes: int, owner: bool) -> Held:
        return Held(np.empty(nbytes, np.uint8))

    def message(self, held: Held) -> Any:
        return held.array

    def open(self, message: Any) -> Held:
        return Held(message)

    def release(self, held: Held) -> None:
        held.array = None

    def reference(self, held: Held) -> Any:
        return None

    def unlink(self, reference: Any) -> None:
        pass


class Stdlib(Base):
    """`multiprocessing.shared_memory`: send the name, the receiver maps it.

    The receiver opens, reads, closes, and unlinks once (it is the owner)."""

    name = "stdlib"

    def prepare(self) -> None:
        from multiprocessing import shared_memory

        self._shm = shared_memory

    def create(self, nbytes: int, owner: bool) -> Held:
        shm = self._shm.SharedMemory(create=True, size=nbytes)
        array = np.ndarray(nbytes, np.uint8, buffer=shm.buf)
        return Held(array, shm.name, shm, owner)

    def message(self, held: Held) -> Any:
        return held.name, held.array.nbytes

    def open(self, message: Any) -> Held:
        name, nbytes = message
        shm = self._shm.SharedMemory(name=name)
        return Held(np.ndarray(nbytes, np.uint8, buffer=shm.buf), name, shm, True)

    def release(self, held: Held) -> None:
        held.array = None  # the ndarray exports shm.buf: it must go before close()
        held.handle.close()
        if held.owner:
            held.handle.unlink()

    def reference(self, held: Held) -> Any:
        return held.name

    def unlink(self, reference: Any) -> None:
        shm = self._shm.SharedMemory(name=reference)
        shm.close()
        shm.unlink()


class _GrainApi(Base):
    """A SharedMemoryArray with Grain's API: pickles as a reference; the
    receiver marks it with unlink_on_del()."""
    # Set by the subclass: its SharedMemoryArray class (in prepare()), and
    # what its unlink() takes to remove an array.
    _array_type: Any
    _reference_of: Callable[[Any], Any]

    def create(self, nbytes: int, owner: bool) -> Held:
        array = self._array_type((nbytes,), np.uint8)
        if owner:
            array.unlink_on_del()
        return Held(array)

    def reference(self, held: Held) -> Any:
        return self._reference_of(held.array)

    def message(self, held: Held) -> Any:
        return held.array

    def open(self, message: Any) -> Held:
        message.unlink_on_del()
        return Held(message)

    def release(self, held: Held) -> None:
        held.array = None


class GrainShm(_GrainApi):
    """grain_shm, a fresh segment per array (even where GRAIN_SHM_RECYCLE
    is set), releasing inline."""

    name = "grain_shm"

    def prepare(self) -> None:
        import grain_shm

        self._array_type = grain_shm.SharedMemoryArray
        self._array_type._disable_recycling()

    @staticmethod
    def _reference_of(array: SharedMemoryArray) -> Any:
        return array.metadata

    def unlink(self, reference: Any) -> None:
        reference.close_and_unlink_shm()


class GrainShmAsync(GrainShm):
    """grain_shm with releases handed to its C deleter threads."""

    name = "grain_shm-async"

    def prepare(self) -> None:
        super().prepare()
        self._array_type.enable_async_del(num_threads=1, max_outstanding_requests=50)


class GrainShmRecycle(GrainShm):
    """grain_shm with the pool: arrays are blocks of pre-faulted arenas."""

    name = "grain_shm-recycle"

    def prepare(self) -> None:
        super().prepare()
        self._array_type.enable_recycling()

    @staticmethod
    def pool_bytes() -> int:
        """This process's arenas: the memory the pool holds on to."""
        from grain_shm import _shm

        arena_bytes: int = _shm.pool_stats()["arena_bytes"]
        return arena_bytes


class GrainShmRecycleAsync(GrainShmRecycle):
    """The pool, with the releases that fall back to fresh segments handed
    to the deleter threads (a block's release is a few atomics, inline)."""

    name = "grain_shm-recycle-async"

    def prepare(self) -> None:
        super().prepare()
        self._array_type.enable_async_del(num_threads=1, max_outstanding_requests=50)


class Grain(_GrainApi):
    """Grain's own `grain.multiprocessing.SharedMemoryArray` (stdlib underneath)."""

    name = "grain"
    requires: Optional[str] = "grain"

    def prepare(self) -> None:
        # Grain's import logs a warning when jax (not needed here) is missing.
        logging.getLogger("absl").setLevel(logging.ERROR)
        from grain.multiprocessing import SharedMemoryArray

        self._array_type = SharedMemoryArray
        from multiprocessing import shared_memory

        self._shm = shared_memory

    @staticmethod
    def _reference_of(array: Any) -> Any:
        return array.shm.name  # Grain's SharedMemoryArray is untyped

    def reference(self, held: Held) -> Any:
        return held.name

    def unlink(self, reference: Any) -> None:
        shm = self._shm.SharedMemory(name=reference)
        shm.close()
        shm.unlink()


class SharedArrayTransport(Base):
    """The SharedArray package: named arrays under /dev/shm, attached by name."""

    name = "SharedArray"
    requires: Optional[str] = "SharedArray"

    def prepare(self) -> None:
        import SharedArray

        self._sa = SharedArray
        self._names = (f"{NAME_PREFIX}sa{os.getpid()}_{n}" for n in itertools.count())

    def create(self, nbytes: int, owner: bool) -> Held:
        name = next(self._names)
        return Held(self._sa.create(f"shm://{name}", nbytes, np.uint8), name, None, owner)

    def message(self, held: Held) -> Any:
        return held.name

    def open(self, message: Any) -> Held:
        return Held(self._sa.attach(f"shm://{message}"), message, None, True)

    def release(self, held: Held) -> None:
        held.array = None
        if held.owner:
            self._sa.delete(f"shm://{held.name}")

    def reference(self, held: Held) -> Any:
        return held.name

    def unlink(self, reference: Any) -> None:
        self._sa.delete(f"shm://{reference}")


class GrainShmQueue(GrainShmRecycle):
    """The pool, its arrays through `grain_shm.Queue`: each reference is
    written into a ring in shared memory, no feeder thread, no pipe."""

    name = "grain_shm-queue"
    requires: Optional[str] = None
    queue = "grain_shm.Queue"
    sections: Tuple[str, ...] = ("transfer",)  # its arrays are grain_shm-recycle's


class FasterFifo(Pickle):
    """Pickled arrays through faster-fifo's ring in shared memory, as its
    users send them: `put(array)`, which pickles with ForkingPickler."""

    name = "faster-fifo"
    requires: Optional[str] = "faster_fifo"
    queue = "faster-fifo"
    sections: Tuple[str, ...] = ("transfer",)  # its arrays are pickle's


class Iceoryx2(Base):
    """iceoryx2's zero-copy publish-subscribe of a byte slice: the producer
    loans a sample from the publisher's memory and fills it in place, the
    consumer reads the sample where it lies and gives it back."""

    name = "iceoryx2"
    requires: Optional[str] = "iceoryx2"
    queue = "iceoryx2"
    sections: Tuple[str, ...] = ("transfer",)  # a sample exists only on a service

    def prepare(self) -> None:
        self._end: Any = None

    def bind(self, end: Any) -> None:
        self._end = end  # bench.iceoryx.Channel, attached: it loans the samples

    def create(self, nbytes: int, owner: bool) -> Held:
        sample = self._end.loan(nbytes)
        return Held(np.frombuffer(sample.payload().as_memory_view(), np.uint8), handle=sample)

    def message(self, held: Held) -> Any:
        held.array = None  # no view of the sample outlives its sending
        sample, held.handle = held.handle.assume_init(), None
        return sample

    def open(self, message: Any) -> Held:
        return Held(np.frombuffer(message.payload().as_memory_view(), np.uint8), handle=message)

    def release(self, held: Held) -> None:
        held.array = None
        if held.handle is not None:  # a received sample, or a loan never sent
            held.handle.delete()
            held.handle = None

    def reference(self, held: Held) -> Any:
        return None  # samples are the service's memory: it goes with the service

    def unlink(self, reference: Any) -> None:
        pass


TRANSPORTS: Dict[str, Type[Transport]] = {
    t.name: t for t in (Pickle, Stdlib, GrainShm, GrainShmAsync, GrainShmRecycle,
                        GrainShmRecycleAsync, Grain, SharedArrayTransport, GrainShmQueue,
                        FasterFifo, Iceoryx2)
}


# What each kind of queue (bench.queues) needs, as Transport.requires says it.
QUEUE_REQUIRES: Dict[str, Optional[str]] = {
    "multiprocessing.Queue": None,
    "faster-fifo": "faster_fifo",
    "iceoryx2": "iceoryx2",
    "grain_shm.Queue": None,
}


def _why_missing(requires: Optional[str]) -> Optional[str]:
    """Why the module `requires` is not there, or None."""
    if requires is None or importlib.util.find_spec(requires) is not None:
        return None
    return f"{requires} is not installed (pip install 'grain_shm[compare]')"


def missing(name: str) -> Optional[str]:
    """Why transport `name` (or the queue ceiling "queue:KIND") cannot run
    here, or None; checked without importing optional packages."""
    if name.startswith("queue:"):
        return _why_missing(QUEUE_REQUIRES[name[len("queue:"):]])
    transport = TRANSPORTS.get(name)  # a section may run variants of its own (pipeline)
    return _why_missing(transport.requires if transport is not None else None)


def pool_bytes(transport: Transport) -> Optional[int]:
    """The bytes of this process's pool arenas, for the transports with a pool."""
    return transport.pool_bytes() if isinstance(transport, GrainShmRecycle) else None


def get(name: str) -> Transport:
    """A prepared transport, in the process that will use it."""
    transport = TRANSPORTS[name]()
    transport.prepare()
    return transport

"""One item's message, from the worker that made it to the consumer.

It is `(item, arrays, tree, stats)` pickled, where `arrays` rebuilds as the
list of every array the worker made for the item, opened one after another
by `_open` and owned by the consumer at once (its name, or its pool block,
goes when the consumer drops it), and the tree takes each of its arrays from
that list (`arrays[i]`, a memo reference away). So every array is opened
and owned before any other leaf is unpickled, and an item that fails
halfway (a leaf that cannot be rebuilt here, an array that cannot be
opened, Ctrl-C) releases them all when the failure drops them. Arrays the
worker did not make (a leaf's reference to someone else's array) travel as
they always do, not owned. `reducer_override` picks the worker's arrays out;
the C pickler calls it once per object outside the builtin types, so not for
a message's numbers, strings and containers.
"""

from __future__ import annotations

import io
import operator
import pickle
import signal
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, List, Optional, Tuple

from grain_shm._prefetch import tensors
from grain_shm.array import SharedMemoryArray

_SIGINT = {signal.SIGINT}
Reference = Tuple[Callable[..., SharedMemoryArray], Tuple[Any, ...]]


class _Arrays:
    """The worker's arrays of one item, pickled as the references `_open` opens."""

    def __init__(self, arrays: List[SharedMemoryArray]) -> None:
        self.arrays = arrays

    def __reduce__(self) -> Tuple[Any, ...]:
        return _open, ([array.__reduce_ex__(pickle.DEFAULT_PROTOCOL) for array in self.arrays],)


class _Pickler(ForkingPickler):
    """ForkingPickler (with the reducers multiprocessing registers) that
    sends the worker's own arrays as items of the message's `_Arrays`, and
    a torch tensor left in the tree (one tensors.as_array cannot view) by
    value, as plain pickle does, never by the reductions torch registers
    here (see tensors.py)."""

    def __init__(self, file: io.BytesIO, made: List[SharedMemoryArray]) -> None:
        super().__init__(file)
        self.made = _Arrays(made)
        self._index = {id(array): i for i, array in enumerate(made)}

    def reducer_override(self, obj: Any) -> Any:
        i = self._index.get(id(obj))
        if i is None:
            if tensors.is_tensor(obj):
                return pickle.loads, (pickle.dumps(obj),)
            return NotImplemented
        return operator.getitem, (self.made, i)


def dumps(item: int, tree: Any, made: List[SharedMemoryArray], stats: Any) -> bytes:
    """The message for `item`; `made` are the arrays of `tree` the worker made."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, made)
    pickler.dump((item, pickler.made, tree, stats))
    return buffer.getvalue()


def loads(message: bytes) -> Tuple[int, Any, Optional[Any]]:
    """(item, tree, stats), every array the worker made owned by this process.

    SIGINT waits until the message is loaded: a Ctrl-C between an array's
    opening and its marking would leave it owned by nobody. (A KeyboardInterrupt
    raised by a leaf itself, or after this returns, finds every array owned.)
    The two pthread_sigmask calls cost about 2 µs a message here."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
    try:
        item, _, tree, stats = pickle.loads(message)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return item, tree, stats


def _open(references: List[Reference]) -> List[SharedMemoryArray]:
    """Open the worker's arrays, each owned as soon as it is open. One that
    cannot be opened does not stop the others (they are opened, so that
    dropping them releases them); the first such error is raised after."""
    arrays: List[SharedMemoryArray] = []
    failed: Optional[Exception] = None
    for rebuild, arguments in references:
        try:
            arrays.append(rebuild(*arguments))
        except Exception as error:  # its name is the session reaper's now
            failed = failed or error
            continue
        arrays[-1].unlink_on_del()
    if failed is not None:
        arrays.clear()  # released now, not when the error's traceback (this frame) goes
        raise failed
    return arrays

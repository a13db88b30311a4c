"""grain_shm.Queue: multiprocessing.Queue's interface over a ring in shared memory.

A `multiprocessing.Queue` moves every message through a feeder thread, a
pipe and two semaphores: ~10 us of CPU a side, whatever the message. Here a
message is a cell of a ring in one segment of the session (_ring.h has the
layout and the protocol; ring.pyx what a cell carries): a SharedMemoryArray
travels as its reference, in binary, with no pickle call and, with the pool
on, no system call on either side; anything else is pickled into the cell,
or into a shared-memory block when it is larger than a cell. `put` writes
the item before it returns (there is no thread), so an item put is never
lost when the producer exits right after.

Lifetime: the ring's header counts its handles (Queue objects, in any
process) and its pickled references in transit; the handle that takes the
count to zero (close(), garbage collection, or exit) drops what is left in
the ring and unlinks the name. A killed process's handles stay counted: its
queues then go with the session (the reaper, or `python -m grain_shm gc`).

This module imports the standard library's `queue` (for Full and Empty),
which imports threading: `grain_shm.Queue` loads it on first use.
"""

from __future__ import annotations

import multiprocessing.util as _mp_util
import _thread
import operator
import os
import queue as _stdlib_queue
import weakref
from typing import Any, Iterable

from grain_shm import _shm, session
from grain_shm.array import _default_pool_bytes

Full = _stdlib_queue.Full
Empty = _stdlib_queue.Empty

DEFAULT_CAPACITY = 4096
"""Items a Queue(maxsize=0) holds: a ring is finite (4096 cells of 512 bytes: 2 MiB)."""
DEFAULT_CELL_BYTES = 496
"""Payload bytes a cell holds inline (the cell is 512 bytes with its header)."""

_EMPTY = object()
_live: weakref.WeakSet[Queue] = weakref.WeakSet()  # this process's counted handles
# Guards each handle's `_counted` between its check and its clear: two
# threads closing one handle (or close() and __del__ at once, without the
# GIL) must drop its count once, and a fork must count the child's copy of
# a handle exactly when that copy is counted. Held for those steps only.
_release_lock = _thread.allocate_lock()


class Queue:
    """A process-shared FIFO queue with the interface of multiprocessing.Queue.

    `maxsize` items at most (0 or less: DEFAULT_CAPACITY); `cell_bytes` is
    what an item may pickle to and still travel inline (larger ones go
    through a shared-memory block); `max_bytes` bounds the bytes of those
    larger items waiting in the queue (default: a quarter of /dev/shm; an
    item alone may exceed it). Pass it to child processes as a Process
    argument (spawn, forkserver, fork), or pickle it to any process of the
    same session: it is named shared memory.
    """

    def __init__(self, maxsize: int = 0, *, cell_bytes: int = DEFAULT_CELL_BYTES,
                 max_bytes: int | None = None) -> None:
        maxsize = operator.index(maxsize)
        capacity = maxsize if maxsize > 0 else DEFAULT_CAPACITY
        if max_bytes is None:
            max_bytes = _default_pool_bytes()
        if not session.joined:
            session.join()  # the reaper then knows this process: its queues are the session's
        self._ring = _shm.ring_create(capacity, operator.index(cell_bytes),
                                      operator.index(max_bytes), session.SESSION_PREFIX.encode())
        self._maxsize = maxsize
        self._closed = False
        self._counted = True
        _live.add(self)

    # ---- multiprocessing.Queue's interface ----

    def put(self, obj: object, block: bool = True, timeout: float | None = None) -> None:
        """Put `obj` at the end; queue.Full if the queue stays full for
        `timeout` seconds (at once if not `block`; None: wait for ever)."""
        self._check_open()
        if not self._ring.put(obj, _wait_seconds(block, timeout)):
            raise Full

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the first item; queue.Empty if none comes within
        `timeout` seconds (at once if not `block`; None: wait for ever)."""
        self._check_open()
        item = self._ring.get(_wait_seconds(block, timeout), _EMPTY)
        if item is _EMPTY:
            raise Empty
        return item

    def put_nowait(self, obj: object) -> None:
        self.put(obj, False)

    def get_nowait(self) -> Any:
        return self.get(False)

    def put_many(self, items: Iterable[object]) -> None:
        """Put each item in turn, in order, waiting while the queue is full."""
        self._check_open()
        put = self._ring.put
        for item in items:
            put(item, -1.0)

    def get_many(self, max_items: int, block: bool = True,
                 timeout: float | None = None) -> list[Any]:
        """Up to `max_items` items, in order: waits (as get does) for the
        first, then takes what is there without waiting."""
        self._check_open()
        max_items = operator.index(max_items)
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        get = self._ring.get
        first = get(_wait_seconds(block, timeout), _EMPTY)
        if first is _EMPTY:
            raise Empty
        items = [first]
        while len(items) < max_items:
            item = get(0.0, _EMPTY)
            if item is _EMPTY:
                break
            items.append(item)
        return items

    def qsize(self) -> int:
        """Items in the queue now; others may change it before you act on it."""
        return int(self._ring.depth())

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self._ring.capacity

    def close(self) -> None:
        """No more put or get through this handle (ValueError after). Its
        count goes now: the last handle's close empties and unlinks the queue."""
        self._closed = True
        self._release()

    def join_thread(self) -> None:
        """As multiprocessing's, after close(); nothing to join: put writes
        the item into the ring before it returns."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: no thread holds items this process put."""

    # ---- what a handle is ----

    @property
    def name(self) -> str:
        """The segment's name (without "/"), as `python -m grain_shm ls` shows it."""
        return str(self._ring.name)

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        # The receiver's count, taken now: this handle may go before it opens.
        self._ring.add_handle(1)
        return _open, (self._ring.name, self._maxsize)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<grain_shm.Queue {self._ring.name!r} maxsize={self._ring.capacity}{state}>"

    def __del__(self) -> None:
        if getattr(self, "_counted", False):
            self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def _wait_room(self, timeout: float) -> bool:
        """Whether a put would find room within `timeout` seconds, claiming
        nothing: for a queue's only producer (the prefetcher's worker, which
        waits so before making an item)."""
        self._check_open()
        return bool(self._ring.wait_room(timeout))

    def _destroy(self) -> None:
        """Close, then empty the ring and unlink its name now, whatever the
        counts: for an owner that knows no other handle will be used again
        (the prefetcher, once its workers are joined: a killed one's count
        would otherwise keep the ring until the session ends)."""
        self._closed = True
        self._release()
        self._ring.drain()
        try:
            self._ring.unlink()
        except FileNotFoundError:
            pass  # the last count's release, `gc` or the reaper was first

    def _release(self) -> None:
        """Drop this handle's count; the last one empties the ring (large
        items' blocks are unlinked) and unlinks its name."""
        with _release_lock:  # two threads closing one handle drop its count once
            if not self._counted:
                return
            self._counted = False
        _live.discard(self)
        if self._ring.add_handle(-1) == 0:
            self._ring.drain()
            try:
                self._ring.unlink()
            except FileNotFoundError:
                pass  # `gc` or the reaper was first


def _wait_seconds(block: bool, timeout: float | None) -> float:
    """The ring's timeout: 0 (do not wait), < 0 (for ever), else seconds."""
    if not block:
        return 0.0
    if timeout is None:
        return -1.0
    return max(float(timeout), 0.0)


def _open(name: str, maxsize: int) -> Queue:
    """Unpickle: map the ring by name; the count its pickling took is ours."""
    if not session.joined:
        session.join()
    queue = Queue.__new__(Queue)
    queue._closed = False
    queue._counted = False
    queue._ring = _shm.ring_open(name)
    queue._maxsize = maxsize
    queue._counted = True
    _live.add(queue)
    return queue


def _count_for_child() -> None:
    """Before fork(): one more count per handle, for the child's copy (taken
    here, so that this process cannot drop the last count in between)."""
    with _release_lock:
        for queue in list(_live):
            if queue._counted:
                queue._ring.add_handle(1)


def _after_fork_in_child() -> None:
    global _release_lock
    _release_lock = _thread.allocate_lock()  # another thread may have held it
    _register_exit()


def _release_all() -> None:
    """Exit: drop this process's counts."""
    for queue in list(_live):
        queue._release()


def _register_exit() -> None:
    # multiprocessing's exit handler runs it in the main process (at
    # interpreter exit) and in its workers (which leave through os._exit).
    _mp_util.Finalize(None, _release_all, exitpriority=-50)


_register_exit()
os.register_at_fork(before=_count_for_child, after_in_child=_after_fork_in_child)
# A forked multiprocessing worker clears the finalizers it inherited, then runs these.
_mp_util.register_after_fork(_live, lambda _: _register_exit())

"""How one worker's messages reach the consumer: a grain_shm.Queue per
worker, bounded to `per_worker_buffer_size` messages.

A message is the bytes message.py makes (the worker's arrays as references
the consumer owns as they open, and the pickled rest); it goes into the
ring as one item, in a cell when it fits (`_CELL_BYTES`: a batch of a few
dozen arrays does), else through a pooled block or a segment of its own, so
no message is too large. `put` writes the item before it returns, so a
message is in the ring once the worker forgets what it held, and stopping
can drain and unlink every reference in flight; a worker killed in the
middle of a put leaves one cell claimed, which the consumer never waits on:
it sees the death first (below). Against the old pipe and semaphore this
saves the pipe's two system calls and the semaphore's per message, and the
consumer's CPU with them (the bench's pipeline section measures both).

A ring has no file descriptor to wait on beside the workers' sentinels, so
a consumer waiting for a message takes it in slices of `_WAIT_SLICE_S` and
looks at the sentinels in between (without waiting): a worker's death shows
within a slice, and Ctrl-C interrupts the wait within the ring's own slice.

The old channel (`PipeChannel`: a pipe and a semaphore per worker) stays
for comparison only: GRAIN_SHM_PREFETCH_CHANNEL=pipe in the consumer's
environment selects it (the bench's "-pipe" variants); it is not API.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import time
from typing import TYPE_CHECKING, Callable, ContextManager, List, Optional, Tuple, Union

from grain_shm.queue import Empty, Queue

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Semaphore

CHANNEL_ENV = "GRAIN_SHM_PREFETCH_CHANNEL"
"""Environment variable: "pipe" puts the prefetcher back on its old channel (benchmarks)."""

_CELL_BYTES = 8192 - 64  # a cell with its header: 8 KiB; a buffer of 8 maps 64 KiB a worker
_WAIT_SLICE_S = 0.05  # the consumer looks at the workers' sentinels this often while waiting
_PARENT_CHECK_S = 1.0  # how often a worker blocked on a full buffer checks its consumer


class ConsumerGone(Exception):
    """The worker's consumer is gone while the worker waited for room."""


def use_pipe() -> bool:
    """Whether this consumer's environment asks for the old pipe channel."""
    choice = os.environ.get(CHANNEL_ENV, "queue").strip().lower()
    if choice not in ("queue", "pipe", ""):
        raise ValueError(f"{CHANNEL_ENV} must be 'queue' or 'pipe', not {choice!r}")
    return choice == "pipe"


class QueueSender:
    """The worker's end: a handle of its Queue (a Process argument). The
    worker is its queue's only producer, so room it waited for stays."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def wait_for_room(self, parent_alive: Callable[[], bool]) -> float:
        """Until the buffer has room for one more message, as a credit was
        waited for: before the item is made, so that a worker holds at most
        its buffer of items made. The seconds waited. SIGTERM's _Stop is
        raised here (nothing is held then); ConsumerGone if the consumer
        died meanwhile."""
        if self.queue._wait_room(0.0):
            return 0.0
        blocked = time.perf_counter()
        while not self.queue._wait_room(_PARENT_CHECK_S):
            if not parent_alive():
                raise ConsumerGone
        return time.perf_counter() - blocked

    def send(self, data: bytes, guard: ContextManager[None], sent: Callable[[], None]) -> None:
        """Put `data` and call `sent`, both inside `guard` (SIGTERM waits
        for them): the room waited for makes the put immediate."""
        with guard:
            self.queue.put(data)
            sent()


class QueueChannel:
    """The consumer's end of one worker's Queue."""

    def __init__(self, ctx: BaseContext, buffer_size: int) -> None:
        self.queue = Queue(buffer_size, cell_bytes=_CELL_BYTES)
        self.closed = False

    def sender(self) -> QueueSender:
        return QueueSender(self.queue)

    def started(self) -> None:
        """The worker has started (it holds its own handle)."""

    def take(self) -> Optional[bytes]:
        """The next message if one is there, else None."""
        try:
            data: bytes = self.queue.get(block=False)
        except Empty:
            return None
        return data

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message is there (or being put) within `timeout` seconds,
        without taking it, as a pipe's poll (tests look at a run this way)."""
        deadline = time.monotonic() + timeout
        while self.queue.qsize() == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def wait(self, sentinels: List[int]) -> Tuple[Optional[bytes], List[int]]:
        """The next message, or none and the sentinels that are ready, within a slice."""
        try:
            data: bytes = self.queue.get(timeout=_WAIT_SLICE_S)
        except Empty:
            return None, _ready(sentinels, 0.0)
        return data, []

    def drain(self) -> List[bytes]:
        """Every message there now."""
        messages: List[bytes] = []
        while True:
            data = self.take()
            if data is None:
                return messages
            messages.append(data)

    def close(self) -> None:
        """Unlink the ring now: every worker is joined and its messages
        drained, so no handle elsewhere will touch it, even one a killed
        worker left counted (whose count would otherwise keep the ring
        until the session ends)."""
        if not self.closed:
            self.closed = True
            self.queue._destroy()


class PipeSender:
    """The old channel's worker end: a pipe's sending end and the buffer's credits."""

    def __init__(self, connection: Connection, credits: Semaphore) -> None:
        self.connection = connection
        self.credits = credits

    def wait_for_room(self, parent_alive: Callable[[], bool]) -> float:
        """Until a credit is ours; the seconds waited."""
        if self.credits.acquire(block=False):
            return 0.0
        blocked = time.perf_counter()
        while not self.credits.acquire(timeout=_PARENT_CHECK_S):
            if not parent_alive():
                raise ConsumerGone
        return time.perf_counter() - blocked

    def send(self, data: bytes, guard: ContextManager[None], sent: Callable[[], None]) -> None:
        with guard:
            self.connection.send_bytes(data)
            sent()


class PipeChannel:
    """The old channel's consumer end: a pipe per worker, and a semaphore of
    `buffer_size` credits released as each message is taken."""

    def __init__(self, ctx: BaseContext, buffer_size: int) -> None:
        self.receiving, self._sending = ctx.Pipe(duplex=False)
        self.credits = ctx.Semaphore(buffer_size)

    @property
    def closed(self) -> bool:
        return self.receiving.closed

    def sender(self) -> PipeSender:
        return PipeSender(self._sending, self.credits)

    def started(self) -> None:
        self._sending.close()  # the worker's end: only the worker holds it now

    def poll(self, timeout: float = 0.0) -> bool:
        return self.receiving.poll(timeout)

    def take(self) -> Optional[bytes]:
        """The next message if one is there, else None; EOFError once the
        worker's end is closed with nothing left."""
        if not self.receiving.poll():
            return None
        data = self.receiving.recv_bytes()
        self.credits.release()
        return data

    def wait(self, sentinels: List[int]) -> Tuple[Optional[bytes], List[int]]:
        ready = multiprocessing.connection.wait([self.receiving, *sentinels])
        if self.receiving in ready:
            data = self.receiving.recv_bytes()  # EOFError: the worker's end closed
            self.credits.release()
            return data, []
        return None, ready  # type: ignore[return-value]

    def drain(self) -> List[bytes]:
        messages: List[bytes] = []
        if self.receiving.closed:
            return messages
        try:
            while self.receiving.poll():
                messages.append(self.receiving.recv_bytes())  # a whole message, or EOFError
        except (EOFError, OSError):  # the worker's end is closed (a killed worker: torn)
            self.receiving.close()
        return messages

    def close(self) -> None:
        self.receiving.close()
        self._sending.close()


Channel = Union[QueueChannel, PipeChannel]
Sender = Union[QueueSender, PipeSender]


def make_channel(ctx: BaseContext, buffer_size: int, pipe: bool) -> Channel:
    return PipeChannel(ctx, buffer_size) if pipe else QueueChannel(ctx, buffer_size)


def _ready(sentinels: List[int], timeout: float) -> List[int]:
    if not sentinels:
        return []
    return multiprocessing.connection.wait(sentinels, timeout)  # type: ignore[return-value]

"""iceoryx2's publish-subscribe as a queue: put a loaned sample, get a received one.

iceoryx2 (0.10) has no queue object: a service in shared memory, a publisher
that loans samples out of its own data segment, and a subscriber that
receives them where they lie (zero copy). Channel gives the bench the moves
a queue has, used the way iceoryx2's Python examples use them:

- Bounded: the subscriber buffers `depth` samples, no history; a publisher
  with BackpressureStrategy.RetryUntilDelivered (and no safe overflow)
  waits in `send` while that buffer is full, as a full queue blocks `put`.
  In flight at most: `depth` buffered, one loaned by the producer, one
  borrowed by the consumer.
- Blocking: the subscriber cannot block in `receive`, so the service has an
  event beside it (iceoryx2's event-based communication example): the
  producer notifies after each send, the consumer waits on its listener
  when nothing is there. That is how an iceoryx2 consumer sleeps.
- Connected first: a publisher drops what it sends before a subscriber is
  connected. The consumer creates its subscriber before it says it is
  ready; the producer creates the publisher, says so, and sends nothing
  until the consumer's next `receive` has seen it (the `connected` event).
- An empty sample is the end mark (`put(None)`, `get() -> None`).

Its files (the service's segments, a machine-wide management file that
iceoryx2 keeps by design) carry a prefix of this channel's own and its
directories a root of its own, so `clean_up()` removes them all, in the
parent, when both processes have ended, and no other iceoryx2 user's.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import queue
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from grain_shm import names
from grain_shm.bench.runner import Aborted
from grain_shm.bench.transports import NAME_PREFIX

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

POLL = 0.1  # seconds between looks at the abort event while waiting
_counter = itertools.count()


class Channel:
    """A publish-subscribe service of byte slices, one publisher, one subscriber."""

    def __init__(self, ctx: BaseContext, depth: int, max_bytes: int) -> None:
        self.depth = depth
        self.max_bytes = max(max_bytes, 8)
        self.prefix = f"{NAME_PREFIX}iox2_{os.getpid()}_{next(_counter)}_"
        self.root = tempfile.mkdtemp(prefix=self.prefix)
        self._created, self._connected = ctx.Event(), ctx.Event()
        self._ports: Dict[str, Any] = {}  # this process's, once attached

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_ports": {}}  # ports stay in their process

    def attach(self, role: str, abort: Event) -> Channel:
        """Open the service and this process's port ("producer": the
        publisher and a notifier; "consumer": the subscriber and a listener)."""
        import iceoryx2 as iox2

        config = iox2.config.default()
        config.global_cfg.prefix = iox2.FileName.new(self.prefix)
        config.global_cfg.root_path = iox2.Path.new(self.root + "/")
        node = iox2.NodeBuilder.new().config(config).create(iox2.ServiceType.Ipc)
        name = iox2.ServiceName.new("grain_shm_bench/transfer")
        service = (
            node.service_builder(name)
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(self.depth)
            .history_size(0)
            .enable_safe_overflow(False)
            .max_publishers(1)
            .max_subscribers(1)
            .subscriber_max_borrowed_samples(1)
            .open_or_create()
        )
        event = node.service_builder(name).event().open_or_create()
        ports: Dict[str, Any] = {"iox2": iox2, "node": node, "service": service, "event": event}
        self._ports = ports
        if role == "consumer":
            ports["subscriber"] = service.subscriber_builder().create()
            ports["listener"] = event.listener_builder().create()
            ports["linked"] = False
            return self
        ports["publisher"] = (
            service.publisher_builder()
            .initial_max_slice_len(self.max_bytes)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .max_loaned_samples(1)
            .create()
        )
        ports["notifier"] = event.notifier_builder().create()
        self._created.set()
        ports["notifier"].notify()  # wakes the consumer, to connect
        while not self._connected.wait(POLL):
            if abort.is_set():
                raise Aborted
        return self

    def loan(self, nbytes: int) -> Any:
        """An uninitialised sample of `nbytes` in the publisher's memory."""
        return self._ports["publisher"].loan_slice_uninit(nbytes)

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Send a sample (assume_init()'s), or the end mark for None.
        The send waits while the subscriber's buffer is full, without a
        timeout: iceoryx2's retry has none (a dead consumer hangs the cell
        until the runner's deadline stops it)."""
        ports = self._ports
        if item is None:
            item = ports["publisher"].loan_slice_uninit(0).assume_init()
        item.send()
        ports["notifier"].notify()

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """The next sample (the caller delete()s it), or None for the end mark;
        queue.Empty after `timeout` seconds."""
        ports = self._ports
        subscriber, listener, iox2 = ports["subscriber"], ports["listener"], ports["iox2"]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not ports["linked"] and self._created.is_set():
                ports["linked"] = True  # this receive connects to the new publisher
                sample = subscriber.receive()
                self._connected.set()
            else:
                sample = subscriber.receive()
            if sample is not None:
                if sample.payload().len() == 0:
                    sample.delete()
                    return None
                return sample
            left = POLL if deadline is None else deadline - time.monotonic()
            if left <= 0 or not block:
                raise queue.Empty
            listener.timed_wait(iox2.Duration.from_secs_f64(min(left, POLL)))

    def cancel_join_thread(self) -> None:
        """As multiprocessing.Queue's: nothing to flush here."""

    def clean_up(self) -> None:
        """Remove the service's files and the channel's root (in the parent,
        after both processes ended)."""
        for path in glob.glob(os.path.join(names.SHM_DIR, glob.escape(self.prefix) + "*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

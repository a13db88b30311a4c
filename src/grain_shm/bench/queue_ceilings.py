"""Each queue's own ceiling: its rate of reference-sized messages, its one-way latency.

One cell per kind of queue (bench.queues; the cell's transport is
"queue:KIND"), two fresh processes, the queue built and bounded as the
transfer builds it (`depth` deep), carrying no array:

- rate: the producer puts MESSAGE (a tuple the size of the reference a
  pooled transport sends; for iceoryx2 a sample of as many bytes, stamped)
  as fast as the queue takes it, the consumer gets; messages/s from the
  consumer's arrival times in timed segments, as the transfer counts
  arrays/s. Whatever a transport sends per array through this queue, it
  moves no more arrays per second than this: rate x size bounds it.
- latency: an idle queue, the consumer blocked in `get`; every GAP seconds
  the producer reads the clock and puts a message carrying that time, the
  consumer reads the clock when `get` returns. Both read one clock
  (time.monotonic: CLOCK_MONOTONIC, system-wide on Linux and macOS).

The rate's ceiling is the best of its timed segments (summary "max"): the
queue alone, in the transfer's conditions, did that well at least once.

The JSON: {"kind", "depth", "message" (its repr), "messages", "timed_messages",
"messages_per_s": summary, "latency_us": summary, "latency_p99_us": float}.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import numpy as np

from grain_shm.bench import queues, stats, transfer
from grain_shm.bench.runner import Aborted, Cell, ProcessSpec, Result, Section

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

PREFIX = "queue:"  # the cells' transport: PREFIX + kind
# What a pooled transport puts on the queue per array: name, shape, dtype,
# strides, offset, index, generation (the size of grain_shm's pickled
# reference). The first field carries the latency's send time.
MESSAGE = (0.0, "gs001r90kutajuk_TzvuhtQNDXPI", (4096,), "|u1", None, 0, 3, 17)
# The queue's rate jumps between two modes (as much as 2x apart on 2 cores) as
# the scheduler places its threads: it gets this many times the cell's
# budget, so that the figures are the rates it keeps up.
BUDGET_FACTOR = 5
GAP = 0.001  # seconds between the latency's messages: the consumer is asleep in get
MAX_LATENCY_SAMPLES = 2000


def cell_transport(kind: str) -> str:
    return PREFIX + kind


def kind_of(cell: Cell) -> str:
    return str(cell.transport)[len(PREFIX):]


def _sender(kind: str, q: Any, abort: Event) -> Callable[[Optional[float]], None]:
    """send(t): a message stamped t; send(None): the end mark."""
    if kind == "iceoryx2":
        nbytes = queues.item_bytes(MESSAGE)

        def send_sample(stamp: Optional[float]) -> None:
            if stamp is None:
                q.put(None)  # the end mark: an empty sample
                return
            sample = q.loan(nbytes)
            np.frombuffer(sample.payload().as_memory_view(), np.float64, 1)[0] = stamp
            q.put(sample.assume_init())

        return send_sample

    def send(stamp: Optional[float]) -> None:
        transfer._put(q, None if stamp is None else (stamp, *MESSAGE[1:]), abort)

    return send


def _receiver(kind: str, q: Any, abort: Event) -> Callable[[], Optional[float]]:
    """receive(): the stamp of the next message, None at the end mark."""
    if kind == "iceoryx2":

        def receive_sample() -> Optional[float]:
            sample = transfer._get(q, abort)
            if sample is None:
                return None
            stamp = float(np.frombuffer(sample.payload().as_memory_view(), np.float64, 1)[0])
            sample.delete()
            return stamp

        return receive_sample

    def receive() -> Optional[float]:
        message = transfer._get(q, abort)
        return None if message is None else float(message[0])

    return receive


def produce(cell: Cell, abort: Event, q: Any, ready: Event, drained: Event) -> Result:
    try:
        transfer._wait(ready, abort)
        q = queues.attach(q, "producer", abort)
        send = _sender(kind_of(cell), q, abort)
        count = 0
        least = cell.min_count + transfer.WARMUP
        budget = cell.budget * BUDGET_FACTOR
        start = time.perf_counter()
        while count < least or (
            count < transfer.MAX_ARRAYS and time.perf_counter() - start < budget
        ):
            if count % transfer.ABORT_CHECK_EVERY == 0 and abort.is_set():
                raise Aborted
            send(0.0)
            count += 1
        send(None)
        transfer._wait(drained, abort)  # the latency starts on an idle queue
        samples = min(MAX_LATENCY_SAMPLES, max(least, int(budget / GAP)))
        for _ in range(samples):
            if abort.is_set():
                raise Aborted
            time.sleep(GAP)
            send(time.monotonic())
        send(None)
    except BaseException:
        q.cancel_join_thread()
        raise
    return {"messages": count, "latency_samples": samples}


def consume(cell: Cell, abort: Event, q: Any, ready: Event, drained: Event) -> Result:
    q = queues.attach(q, "consumer", abort)
    receive = _receiver(kind_of(cell), q, abort)
    ready.set()
    finished: List[float] = []  # perf_counter() when each message was got
    while receive() is not None:
        finished.append(time.perf_counter())
    drained.set()
    latencies: List[float] = []
    while True:
        stamp = receive()
        if stamp is None:
            break
        latencies.append((time.monotonic() - stamp) * 1e6)
    rates, timed = stats.segment_rates(
        finished, max(transfer.WARMUP, len(finished) // 10), transfer.SEGMENTS
    )
    return {"messages": len(finished), "timed": timed, "rates": rates.tolist(),
            "latency_us": latencies}


def processes(cell: Cell, ctx: BaseContext) -> List[ProcessSpec]:
    q = queues.make(kind_of(cell), ctx, transfer.depth(cell), MESSAGE)
    ready, drained = ctx.Event(), ctx.Event()
    return [
        ("producer", produce, (q, ready, drained)),
        ("consumer", consume, (q, ready, drained)),
    ]


def summarize(cell: Cell, outputs: dict[str, Result]) -> Result:
    consumer = outputs["consumer"]
    latencies = consumer["latency_us"]
    return {
        "kind": kind_of(cell),
        "depth": transfer.depth(cell),
        "message": repr(MESSAGE),
        "messages": consumer["messages"],
        "timed_messages": consumer["timed"],
        "messages_per_s": stats.summary(consumer["rates"]),
        "latency_us": stats.summary(latencies),
        "latency_p99_us": float(np.percentile(latencies, 99)),
    }


SECTION = Section(
    name="ceilings",
    processes=processes,
    summarize=summarize,
    clean_up=queues.clean_up,
)

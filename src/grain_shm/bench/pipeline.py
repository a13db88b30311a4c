"""The pipeline section: a data pipeline's elements from 2 worker processes.

Each worker makes elements (a memcpy of a fixed pattern into a fresh float32
array, its index stamped in, as a decoder would) and the consumer, in the
cell's process, reads every byte of each and checks it. Small elements
travel in batches of BATCH elements, assembled in the workers. Compared:

- grain_shm: `grain_shm.prefetch` (fresh segments), and grain_shm-recycle,
  the same with the pool on; grain_shm-recycle-pipe, the same on the
  prefetcher's old channel (a pipe and a semaphore per worker in place of a
  grain_shm.Queue: GRAIN_SHM_PREFETCH_CHANNEL=pipe), run beside
  grain_shm-recycle whenever that is chosen;
- grain: Grain's `MapDataset.map(...).batch(...).to_iter_dataset().mp_prefetch()`;
- torch: PyTorch's `DataLoader` (spawn context; `batch_size=None` for large
  elements, the default collate for batches, which stacks them into shared
  memory in the worker), where torch is installed: skipped with a note
  elsewhere, and imported only by this variant's cell process;
- pickle: `multiprocessing.Pool.imap`, results pickled through its pipes.

Every one holds at most IN_FLIGHT items per worker ahead of the consumer
(the DataLoader's prefetch_factor; Pool.imap has no bound of its own: its
task feed is throttled to that).
Items/s are taken from the consumer's arrival times in steady state, from
the first item on (start-up, the time to the first item, is reported apart),
and the consumer's share of time spent waiting inside `next()`. The
consumer's CPU per item is its process's CPU time (every thread) over the
timed items, less the check's: what taking an item costs it (the channel,
unpickling, opening and releasing the arrays), the bench's own clock reads
(~1 µs) included.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np

from grain_shm.bench import payload, stats
from grain_shm.bench.runner import Aborted, Cell, ProcessSpec, Result, Section, format_size
from grain_shm.bench.transports import Unavailable

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

    from grain_shm.bench.report import RunRecord

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, 4 * MiB)  # bytes per element
BATCH = 256  # elements per batch, for elements up to BATCHED_UP_TO bytes
BATCHED_UP_TO = 64 * KiB
WORKERS = 2
IN_FLIGHT = 2  # items per worker ahead of the consumer
VARIANTS = ("grain_shm", "grain_shm-recycle", "grain_shm-recycle-pipe", "grain", "torch",
            "pickle")
# Variants of this section only, not transports of the others (the transfer,
# cfd, release): `--transports` names them too.
OWN_VARIANTS = ("grain_shm-recycle-pipe", "torch")
OLD_CHANNEL = "-pipe"  # a grain_shm variant on the prefetcher's old channel
WARMUP = 2  # items before the clock starts (the first one included)
SEGMENTS = 20
ABORT_CHECK_EVERY = 16


def chosen(variant: str, transports: List[str]) -> bool:
    """Whether `variant` runs: chosen, or its base is (the old channel runs
    beside the prefetcher on its Queue)."""
    return variant in transports or variant.removesuffix(OLD_CHANNEL) in transports


def batch_size(nbytes: int) -> Optional[int]:
    return BATCH if nbytes <= BATCHED_UP_TO else None


class MakeElement:
    """The workers' transform: index -> a fresh float32 array of nbytes."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._pattern: Optional[np.ndarray] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"nbytes": self.nbytes}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.nbytes = state["nbytes"]
        self._pattern = None

    def __call__(self, index: int) -> np.ndarray:
        if self._pattern is None:
            self._pattern = payload.source(self.nbytes)
        element = np.empty(self.nbytes // 4, np.float32)
        payload.fill(element.view(np.uint8), self._pattern, int(index))
        return element


class MakeBatch:
    """Pool.imap's task: item -> a batch (np.stack of its elements) or an element."""

    def __init__(self, nbytes: int) -> None:
        self.make = MakeElement(nbytes)
        self.size = batch_size(nbytes)

    def __call__(self, item: int) -> np.ndarray:
        if self.size is None:
            return self.make(item)
        return np.stack([self.make(i) for i in range(item * self.size, (item + 1) * self.size)])


class Checker:
    """Reads every byte of an item and checks every element's stamp and sum."""

    def __init__(self, nbytes: int) -> None:
        self.pattern_sum = np.uint64(payload.checksum(payload.source(nbytes)))
        self.words = nbytes // 8

    def __call__(self, item: Any) -> int:
        words = np.asarray(item).view(np.uint64).reshape(-1, self.words)
        sums = np.add.reduce(words, axis=1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            want = self.pattern_sum + words[:, 0]
        if not np.array_equal(sums, want):
            raise ValueError("an element's bytes are not the bytes its worker wrote")
        return len(words)


Stream = Tuple[Iterator[Any], Callable[[], None]]  # the items, and how to stop


def _grain_shm(nbytes: int, recycle: bool, pipe: bool) -> Stream:
    import grain_shm

    if pipe:  # read by the prefetcher as it starts its workers; the cell is a process of its own
        os.environ["GRAIN_SHM_PREFETCH_CHANNEL"] = "pipe"

    # The workers pool unless told not to (recycle=False: "grain_shm"
    # measures fresh segments, even where GRAIN_SHM_RECYCLE says on).
    if recycle:
        grain_shm.SharedMemoryArray.enable_recycling()
    else:
        grain_shm.SharedMemoryArray._disable_recycling()
    stream = grain_shm.prefetch(
        range(1 << 62), MakeElement(nbytes), batch_size=batch_size(nbytes), num_epochs=None,
        options=grain_shm.MultiprocessingOptions(WORKERS, IN_FLIGHT), recycle=recycle,
    )
    return stream, stream.close


def _grain(nbytes: int) -> Stream:
    logging.getLogger("absl").setLevel(logging.ERROR)  # no jax: a warning at import
    try:
        import grain
    except ImportError:
        raise Unavailable("grain is not installed (pip install 'grain_shm[compare]')") from None
    dataset = grain.MapDataset.range(1 << 40).map(MakeElement(nbytes))
    size = batch_size(nbytes)
    if size is not None:
        dataset = dataset.batch(size)
    iterator = dataset.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=WORKERS, per_worker_buffer_size=IN_FLIGHT)
    ).__iter__()
    return iterator, iterator.close


class TorchSource:
    """The DataLoader's map-style dataset (no torch.utils.data.Dataset base,
    so that this module imports no torch): index -> MakeElement's array."""

    def __init__(self, nbytes: int) -> None:
        self.make = MakeElement(nbytes)

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, index: int) -> np.ndarray:
        return self.make(index)


class _IndicesUntil:
    """The DataLoader's sampler, which runs in the consumer's process: 0, 1,
    2, ... until `stopping` is set."""

    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping

    def __iter__(self) -> Iterator[int]:
        for index in itertools.count():
            if self.stopping.is_set():
                return
            yield index


def _torch(nbytes: int) -> Stream:
    try:  # Any to mypy: the same check with torch installed or not (and no pass over torch)
        data: Any = importlib.import_module("torch.utils.data")
    except ImportError:
        raise Unavailable(
            "torch is not installed (pip install torch; the CPU build is enough: it is not "
            "among grain_shm's extras, where it would pull a CUDA build)"
        ) from None
    stopping = threading.Event()
    loader = data.DataLoader(
        TorchSource(nbytes), batch_size=batch_size(nbytes), sampler=_IndicesUntil(stopping),
        num_workers=WORKERS, prefetch_factor=IN_FLIGHT, multiprocessing_context="spawn",
    )
    iterator = iter(loader)

    def items() -> Iterator[Any]:
        for tensor in iterator:
            yield tensor.numpy()  # a view of the tensor's shared memory: no copy

    def stop() -> None:
        # Ends the indices, takes the few items in flight, and the loader
        # stops its workers once they are idle. Stopped while one of them
        # still sends a 4 MiB tensor, a worker can die of SIGABRT ("terminate
        # called without an active exception"), about one run in four here.
        stopping.set()
        for _ in iterator:
            pass

    return items(), stop


def _pool_imap(nbytes: int) -> Stream:
    pool = multiprocessing.get_context("spawn").Pool(WORKERS)
    credits = threading.Semaphore(WORKERS * IN_FLIGHT)
    stopping = threading.Event()

    def tasks() -> Iterator[int]:  # pulled by the pool's task thread
        for item in itertools.count():
            credits.acquire()
            if stopping.is_set():
                return
            yield item

    results = pool.imap(MakeBatch(nbytes), tasks())

    def items() -> Iterator[Any]:
        for result in results:
            credits.release()
            yield result

    def stop() -> None:
        # Ends the task feed and lets the workers finish the few tasks left:
        # terminate() can deadlock on the task thread's queue lock (seen here).
        stopping.set()
        credits.release()  # the task thread may be waiting for a credit
        pool.close()
        pool.join()

    return items(), stop


def consume(cell: Cell, abort: Event) -> Result:
    """Start the variant's pipeline, take items for the budget, check each."""
    nbytes = cell.sizes[0]
    variant = cast(str, cell.transport)
    check = Checker(nbytes)
    started = time.perf_counter()
    if variant == "grain":
        items, stop = _grain(nbytes)
    elif variant == "torch":
        items, stop = _torch(nbytes)
    elif variant == "pickle":
        items, stop = _pool_imap(nbytes)
    else:
        items, stop = _grain_shm(nbytes, recycle=variant.startswith("grain_shm-recycle"),
                                 pipe=variant.endswith(OLD_CHANNEL))
    arrived: List[float] = []
    waited = 0.0
    elements = 0
    cpu_from = cpu_to = checking = 0.0  # process CPU: at the first timed item, at the last
    try:
        least = cell.min_count + WARMUP
        while True:
            asked = time.perf_counter()
            item = next(items)
            now = time.perf_counter()
            if arrived:
                waited += now - asked
            arrived.append(now)
            checked_from = time.process_time()
            elements += check(item)
            cpu_to = time.process_time()
            del item
            count = len(arrived)
            if count > WARMUP:
                checking += cpu_to - checked_from
            elif count == WARMUP:
                cpu_from = cpu_to
            if count >= least and now - arrived[0] >= cell.budget:
                break
            if count % ABORT_CHECK_EVERY == 0 and abort.is_set():
                raise Aborted
    finally:
        stop()
    rates, timed = stats.segment_rates(arrived, WARMUP, SEGMENTS)
    per_item = elements // len(arrived)
    return {
        "startup_s": arrived[0] - started,
        "items": len(arrived),
        "timed": timed,
        "elements_per_item": per_item,
        "rates": (rates * per_item).tolist(),
        "waited_s": waited,
        "steady_s": arrived[-1] - arrived[0],
        "cpu_per_item_s": (cpu_to - cpu_from - checking) / max(len(arrived) - WARMUP, 1),
    }


def processes(cell: Cell, ctx: BaseContext) -> List[ProcessSpec]:
    return [("consumer", consume, ())]


def summarize(cell: Cell, outputs: Dict[str, Result]) -> Result:
    consumer = outputs["consumer"]
    rates = np.asarray(consumer["rates"])
    nbytes = cell.sizes[0]
    return {
        "size": nbytes,
        "batch_size": batch_size(nbytes),
        "workers": WORKERS,
        "items": consumer["items"],
        "timed_items": consumer["timed"],
        "elements_per_s": stats.summary(rates),
        "gbps": stats.summary(rates * nbytes / 1e9),
        "startup_s": consumer["startup_s"],
        "consumer_waiting": consumer["waited_s"] / max(consumer["steady_s"], 1e-9),
        "consumer_cpu_us_per_item": consumer["cpu_per_item_s"] * 1e6,
    }


SECTION = Section(name="pipeline", processes=processes, summarize=summarize)

TITLE = (
    f"Pipeline: {WORKERS} worker processes -> consumer, which reads and checks every byte; "
    f"elements up to {format_size(BATCHED_UP_TO)} in batches of {BATCH}, {IN_FLIGHT} items "
    "per worker in flight. Elements/s: median of timed segments in steady state; start-up "
    "= time to the first item; waiting = consumer's share of time inside next(); "
    "consumer µs = the consumer's CPU per item, less the check's; -pipe = the prefetcher's "
    "old channel; torch = PyTorch's DataLoader; pickle = multiprocessing.Pool.imap"
)


def table(doc: RunRecord) -> Tuple[List[str], List[List[str]]]:
    cells = {(c["transport"], c["sizes"][0]): c for c in doc["cells"]
             if c["section"] == "pipeline"}
    headers = ["element", "variant", "elements/s", "p10-p90", "GB/s", "start-up s", "waiting",
               "consumer µs", "× grain", "× DataLoader", "× Pool.imap"]
    rows = []
    for size in doc["config"].get("pipeline_sizes", []):
        label = format_size(size) + (f" ×{batch_size(size)}" if batch_size(size) else "")

        def median(variant: str) -> Optional[float]:
            record = cells.get((variant, size))
            if record is None or record["status"] != "ok":
                return None
            value: float = record["result"]["elements_per_s"]["median"]
            return value

        for variant in VARIANTS:
            record = cells.get((variant, size))
            if record is None:
                continue
            if record["status"] != "ok":
                rows.append([label, variant, record["status"]] + [""] * (len(headers) - 3))
                continue
            result = record["result"]
            rate = result["elements_per_s"]
            grain, loader, imap = median("grain"), median("torch"), median("pickle")
            rows.append([
                label,
                variant,
                f"{rate['median']:,.0f}",
                f"{rate['p10']:,.0f}-{rate['p90']:,.0f}",
                f"{result['gbps']['median']:.2f}",
                f"{result['startup_s']:.2f}",
                f"{result['consumer_waiting']:.0%}",
                f"{result['consumer_cpu_us_per_item']:,.1f}",
                f"{rate['median'] / grain:.2f}" if grain else "",
                f"{rate['median'] / loader:.2f}" if loader else "",
                f"{rate['median'] / imap:.2f}" if imap else "",
            ])
    return headers, rows

"""Grain pipelines for the drop-in proof, run in a child interpreter.

`python -c "import pipelines; pipelines.main()" OUT.json NAME...`
runs each named pipeline with 2 worker processes, consumes it, shuts it down,
and writes what it saw to OUT.json: the elements as plain lists, and the facts
the test judges (types and segment names of the arrays the consumer got,
worker pids, what is left in /dev/shm and which workers are left).

Whether Grain's own shared-memory arrays or grain_shm's are used is decided
outside, by GRAIN_SHM_PATCH_GRAIN in the environment (grain_shm.pth runs
grain_shm.patch_grain() at start-up); this module is the same for both runs. It lives on PYTHONPATH so that
spawned workers unpickle its functions and classes by reference.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import sys
import time

import numpy as np

NUM_RECORDS = 22  # not a multiple of the batch size: a short last batch
BATCH_SIZE = 4
NUM_WORKERS = 2


def make_element(i):
    """One record: arrays of two dtypes, a string, and who made it."""
    i = int(i)
    return {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3) + i,
        "y": np.arange(4, dtype=np.int64) + 10 * i,
        "label": f"r{i}",  # varying width: Grain stacks "U" arrays, then copies
        "pid": os.getpid(),
    }


class RangeSource:
    """A random-access source of the record indices 0..n-1."""

    def __init__(self, n):
        self._n = n

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return int(i)

    def __repr__(self):
        return f"RangeSource({self._n})"


def _options(num_workers):
    # grain_shm's MultiprocessingOptions where Grain takes options, when the
    # patch is in place; Grain's own otherwise.
    if _patched():
        import grain_shm

        return grain_shm.MultiprocessingOptions(num_workers=num_workers)
    import grain

    return grain.multiprocessing.MultiprocessingOptions(num_workers=num_workers)


def _patched():
    """Whether Grain's module holds grain_shm's five names (patch_grain())."""
    from grain._src.python.ipc import shared_memory_array as grain_module

    grain_shm = sys.modules.get("grain_shm")  # imported by the patch, if any
    return grain_shm is not None and all(
        getattr(grain_module, name) is getattr(grain_shm, name)
        for name in ("SharedMemoryArray", "SharedMemoryArrayMetadata",
                     "copy_to_shm", "open_from_shm", "unlink_shm")
    )


def dataset_batch():
    """Dataset API; the batch is stacked straight into shared memory by the
    workers (mp_prefetch enables it on the Batch it is called on)."""
    import grain

    ds = grain.MapDataset.range(NUM_RECORDS).map(make_element)
    ds = ds.to_iter_dataset().batch(BATCH_SIZE)
    return iter(ds.mp_prefetch(_options(NUM_WORKERS)))


def dataset_copy():
    """Dataset API without batching: the workers' copy_to_shm copies each
    array leaf to shared memory; the consumer's open_from_shm maps it."""
    import grain

    ds = grain.MapDataset.range(NUM_RECORDS).map(make_element).to_iter_dataset()
    return iter(ds.mp_prefetch(_options(NUM_WORKERS)))


def dataloader():
    """The DataLoader API: sampler, a MapTransform, Batch, worker_count=2."""
    import grain.python as gp

    class MakeElement(gp.MapTransform):
        def map(self, element):
            return make_element(element)

    loader = gp.DataLoader(
        data_source=RangeSource(NUM_RECORDS),
        sampler=gp.IndexSampler(
            num_records=NUM_RECORDS,
            shard_options=gp.NoSharding(),
            shuffle=True,
            seed=7,
            num_epochs=1,
        ),
        operations=[MakeElement(), gp.Batch(batch_size=BATCH_SIZE, drop_remainder=False)],
        worker_count=NUM_WORKERS,
    )
    return iter(loader)


PIPELINES = {f.__name__: f for f in (dataset_batch, dataset_copy, dataloader)}


def _plain(leaf):
    if isinstance(leaf, np.ndarray):
        return {"dtype": leaf.dtype.str, "shape": list(leaf.shape), "values": leaf.tolist()}
    if isinstance(leaf, np.generic):
        return leaf.item()
    return leaf


def _segments_of(session):
    from grain_shm import names

    prefix = names.segment_prefix(session)
    return sorted(e for e in os.listdir(names.SHM_DIR) if e.startswith(prefix))


def _record(element, facts):
    """Note what the consumer got; keep only plain copies of the values."""
    for leaf in element.values():
        if isinstance(leaf, np.ndarray):
            facts["array_types"].add(f"{type(leaf).__module__}.{type(leaf).__qualname__}")
            if _patched():
                md = leaf.metadata  # a pool block: its arena's name and its place
                facts["segment_names"].append(
                    md.name if md.block is None else f"{md.name}@{md.block}")
                facts["opened_as_owner"].append(bool(leaf._unlink_on_del))
    facts["elements"].append(
        {
            "data": {k: _plain(v) for k, v in element.items() if k != "pid"},
            "pids": sorted(set(np.ravel(element["pid"]).tolist())),
        }
    )


def run(name):
    """Consume one pipeline; return its elements and the facts about them."""
    facts = {"elements": [], "array_types": set(), "segment_names": [], "opened_as_owner": []}
    it = PIPELINES[name]()
    for element in it:
        _record(element, facts)
    del element  # the last one would keep its segments
    facts["array_types"] = sorted(facts["array_types"])
    # DataLoader's iterator has no close(); Grain closes it when collected.
    close = getattr(it, "close", None)
    if close is not None:
        close()
    del it, close
    gc.collect()
    facts["children_after_close"] = [p.pid for p in multiprocessing.active_children()]
    if _patched():
        import grain_shm.session

        deadline = time.monotonic() + 5.0  # asynchronous release may lag
        while _segments_of(grain_shm.session.SESSION) and time.monotonic() < deadline:
            time.sleep(0.05)
        facts["session"] = grain_shm.session.SESSION
        facts["segments_after_close"] = _segments_of(grain_shm.session.SESSION)
    return facts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out, names = argv[0], argv[1:]
    report = {"patched": _patched(), "consumer_pid": os.getpid()}
    report["runs"] = {name: run(name) for name in names}
    with open(out, "w") as f:
        json.dump(report, f)

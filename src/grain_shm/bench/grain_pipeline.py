"""The grain-pipeline section: Grain's own DataLoader, stock and on grain_shm.

One cell per transport and element size: a Grain `DataLoader` with 2 worker
processes maps record indices to elements of that many bytes (a uint8 array
filled with the index), and this process reads every byte and checks it.
"grain" is stock Grain (its stdlib-backed arrays); "grain_shm" the same
pipeline with grain_shm put in place by `grain_shm.patch_grain()`, in the
workers too (GRAIN_SHM_PATCH_GRAIN, which they inherit). Each run starts
fresh workers; a cell repeats runs for its budget (at least one) of
`min_count` elements each, and reports the medians over runs of steady
elements/s (from the second element on: the first waits for the workers to
start) and of end-to-end elements/s (from creating the loader).

Stock Grain's DataLoader leaves segments behind at shutdown (its resource
tracker removes them, with a warning, when the last process exits): the cell
counts them (`grain_left_segments`) and removes them itself, so the run's
leak check still judges everything else.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import multiprocessing
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Dict, List

import numpy as np

from grain_shm.names import SHM_DIR
from grain_shm.bench.runner import Cell, ProcessSpec, Result, Section, format_size
from grain_shm.bench.transports import Unavailable

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

    from grain_shm.bench.report import RunRecord, Table

WORKERS = 2
MAX_RUNS = 9
# The environment each transport's workers start with.
TRANSPORTS: Dict[str, Dict[str, str]] = {
    "grain": {"GRAIN_SHM_PATCH_GRAIN": "0", "GRAIN_SHM_RECYCLE": "0"},
    "grain_shm": {"GRAIN_SHM_PATCH_GRAIN": "1", "GRAIN_SHM_RECYCLE": "0"},
    # Grain's workers make the arrays: the pool on in them (the consumer only opens).
    "grain_shm-recycle": {"GRAIN_SHM_PATCH_GRAIN": "1", "GRAIN_SHM_RECYCLE": "1"},
}


class Records:
    """A random-access source of elements of `nbytes` bytes (picklable, for
    Grain's workers): element i is a uint8 array filled with i % 251."""

    def __init__(self, nbytes: int, count: int) -> None:
        self.nbytes, self.count = nbytes, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"x": np.full(self.nbytes, int(index) % 251, np.uint8)}


def _loader(nbytes: int, count: int) -> Any:
    import grain.python as gp

    return gp.DataLoader(
        data_source=Records(nbytes, count),
        sampler=gp.IndexSampler(num_records=count, shard_options=gp.NoSharding(),
                                shuffle=False, num_epochs=1),
        worker_count=WORKERS,
    )


def _one_run(nbytes: int, count: int) -> Dict[str, float]:
    start = time.perf_counter()
    done: List[float] = []
    for index, element in enumerate(_loader(nbytes, count)):
        x = element["x"]
        if x.nbytes != nbytes or int(x.min()) != int(x.max()) or int(x[0]) != index % 251:
            raise ValueError(f"element {index} is not the one sent")
        del x, element
        done.append(time.perf_counter())
    if len(done) != count:
        raise ValueError(f"{len(done)} elements of {count}")
    # The loader's iterator stops its workers when it is collected: let it,
    # so that no run overlaps the next and their queues' semaphores go.
    gc.collect()
    for child in multiprocessing.active_children():
        child.join(10)
    steady = (count - 1) / max(done[-1] - done[0], 1e-9)
    return {"steady": steady, "end_to_end": count / (done[-1] - start)}


def run(cell: Cell, abort: Event) -> Result:
    if importlib.util.find_spec("grain") is None:
        raise Unavailable("grain is not installed (pip install 'grain_shm[compare]')")
    transport = str(cell.transport)
    os.environ.update(TRANSPORTS[transport])  # Grain's workers inherit it
    logging.getLogger("absl").setLevel(logging.ERROR)  # Grain's warnings about jax
    if os.environ["GRAIN_SHM_PATCH_GRAIN"] == "1":
        import grain_shm

        grain_shm.patch_grain()
    nbytes, count = cell.sizes[0], max(2, cell.min_count)
    before = set(os.listdir(SHM_DIR))
    runs: List[Dict[str, float]] = []
    started = time.perf_counter()
    while not runs or (len(runs) < MAX_RUNS and time.perf_counter() - started < cell.budget):
        runs.append(_one_run(nbytes, count))
    left = _grain_leftovers(before) if transport == "grain" else []
    return {
        "grain_left_segments": len(left),
        "size": nbytes,
        "elements_per_run": count,
        "runs": len(runs),
        "steady_elements_per_s": statistics.median(r["steady"] for r in runs),
        "end_to_end_elements_per_s": statistics.median(r["end_to_end"] for r in runs),
        "samples": runs,
    }


def _grain_leftovers(before: set[str], settle: float = 2.0) -> List[str]:
    """Stock Grain's segments ("psm_...", the stdlib's) still there after a
    run: removed here, and returned."""
    deadline = time.monotonic() + settle
    while True:
        left = [n for n in set(os.listdir(SHM_DIR)) - before if n.startswith("psm_")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in left:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    return left


def processes(cell: Cell, ctx: BaseContext) -> List[ProcessSpec]:
    return [("pipeline", run, ())]


def table(doc: RunRecord) -> Table:
    """One row per size: each transport's medians, and grain_shm's ratio to stock Grain."""
    cells = {(c["transport"], c["sizes"][0]): c for c in doc["cells"]
             if c["section"] == "grain-pipeline"}
    chosen = [t for t in doc["config"]["transports"] if t in TRANSPORTS]
    headers = ["size", *(f"{t} elements/s" for t in chosen),
               *(f"{t} end-to-end" for t in chosen)]
    ours = [t for t in chosen if t != "grain"]
    if "grain" in chosen:
        headers += [f"{t} ÷ grain" for t in ours]
    rows = []
    for size in sorted({size for _, size in cells}):
        row = [format_size(size)]
        values: Dict[str, float] = {}
        for key in ("steady_elements_per_s", "end_to_end_elements_per_s"):
            for t in chosen:
                cell = cells.get((t, size))
                if cell is not None and cell["status"] == "ok":
                    row.append(f"{cell['result'][key]:,.0f}")
                    if key.startswith("steady"):
                        values[t] = cell["result"][key]
                else:
                    row.append("-" if cell is None else cell["status"])
        if "grain" in chosen:
            row += [f"{values[t] / values['grain']:.2f}" if t in values and "grain" in values
                    else "" for t in ours]
        rows.append(row)
    return headers, rows


SECTION = Section(
    name="grain-pipeline",
    processes=processes,
    summarize=lambda cell, outputs: outputs["pipeline"],
)

"""Runs each cell in fresh `spawn`ed processes and collects what they report.

A fresh interpreter per cell means no cell inherits another's heap, page
cache of mappings, deleter threads or imports. Every process of a cell gets
the same `abort` event: when one fails, skips or hangs, the others stop at
their next wait and clean up after themselves, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import sys
import time
import traceback
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, List, Literal, Mapping, Optional, TextIO, Tuple, TypedDict,
)

from grain_shm.bench import leaks, transports
from grain_shm.bench.transports import Unavailable

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

# What a cell's process returns, and what a section makes of them: JSON-ready
# dicts whose keys differ by section (`--json` shows them).
Result = Dict[str, Any]
# (role, target, extra args) of one process of a cell; see Section.
ProcessSpec = Tuple[str, Callable[..., Result], Tuple[object, ...]]
# (role, status, value) as a cell process reports it; see _entry().
Outcome = Tuple[str, str, Any]


class Aborted(Exception):
    """Another process of this cell failed; stop and clean up."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of measurement: a section, a transport (or None), its sizes."""

    section: str
    transport: Optional[str]
    sizes: Tuple[int, ...]
    budget: float  # seconds of measurement (per cell for transfer, per size otherwise)
    min_count: int  # measured repetitions at least, whatever the budget
    queue_depth: Optional[int] = None  # the transfer's Queue maxsize (and its ceilings')

    @property
    def label(self) -> str:
        sizes = ",".join(format_size(n) for n in self.sizes)
        return " ".join(filter(None, [self.section, self.transport, sizes]))

    def timeout(self) -> float:
        """Seconds after which the cell is declared hung and stopped."""
        return 60.0 + 20.0 * self.budget * len(self.sizes)


@dataclasses.dataclass(frozen=True)
class Section:
    """A kind of measurement.

    `processes(cell, ctx)` gives the cell's processes as (role, target, extra
    args); each target is called as `target(cell, abort, *extra)` in its own
    spawned process and returns a dict. `summarize(cell, {role: dict})` turns
    those into the cell's result. `clean_up(specs)` runs in the parent once
    the processes have ended (what their queues keep by design)."""

    name: str
    processes: Callable[[Cell, BaseContext], List[ProcessSpec]]
    summarize: Callable[[Cell, Dict[str, Result]], Result]
    clean_up: Callable[[List[ProcessSpec]], None] = lambda specs: None


class CellRecord(TypedDict, total=False):
    """One cell's entry in the run's record (`cells` in the JSON).

    Every record has the keys of its Cell, `status` and `elapsed_s`; then
    `result` if ok, `reason` if skipped, `error` if it failed. total=False
    because run_cell() builds it in steps."""

    section: str
    transport: Optional[str]
    sizes: List[int]
    budget_s: float
    min_count: int
    queue_depth: Optional[int]
    status: Literal["ok", "skipped", "error"]
    elapsed_s: float
    result: Result
    reason: str
    error: str


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _entry(
    role: str,
    target: Callable[..., Result],
    cell: Cell,
    extra: Tuple[object, ...],
    results: Queue[Outcome],
    abort: Event,
) -> None:
    """A cell process: run the target, report exactly one outcome."""
    try:
        results.put((role, "ok", target(cell, abort, *extra)))
    except Aborted:
        results.put((role, "aborted", None))
    except Unavailable as reason:
        abort.set()
        results.put((role, "skipped", str(reason)))
    except BaseException:
        abort.set()
        results.put((role, "error", f"{role}: {traceback.format_exc()}"))


def run_cell(cell: Cell, section: Section) -> CellRecord:
    """Run one cell; its record says ok (with the result), skipped or error."""
    record: CellRecord = {
        "section": cell.section,
        "transport": cell.transport,
        "sizes": list(cell.sizes),
        "budget_s": cell.budget,
        "min_count": cell.min_count,
        "queue_depth": cell.queue_depth,
    }
    started = time.perf_counter()
    why_not = cell.transport and transports.missing(cell.transport)
    if why_not:
        return {**record, "status": "skipped", "reason": why_not, "elapsed_s": 0.0}
    ctx = multiprocessing.get_context("spawn")
    try:  # their semaphores live in /dev/shm: a full one fails this cell, not the run
        results = ctx.Queue()
        abort = ctx.Event()
        # Kept until the processes end: Process.start() drops its arguments, and a
        # queue or event nobody holds is unlinked before the child can open it.
        specs = section.processes(cell, ctx)
    except Unavailable as reason:  # a queue that cannot be built here
        return {**record, "status": "skipped", "reason": str(reason), "elapsed_s": 0.0}
    except OSError:
        return {**record, "status": "error", "error": traceback.format_exc(),
                "elapsed_s": time.perf_counter() - started}
    procs = {
        role: ctx.Process(
            target=_entry,
            args=(role, target, cell, extra, results, abort),
            name=f"bench-{role}",
        )
        for role, target, extra in specs
    }
    for proc in procs.values():
        proc.start()
    outcomes, failure = _collect(procs, results, abort, time.monotonic() + cell.timeout())
    _stop(procs)
    section.clean_up(specs)
    del specs
    record["elapsed_s"] = time.perf_counter() - started
    errors = [value for status, value in outcomes.values() if status == "error"]
    skips = [value for status, value in outcomes.values() if status == "skipped"]
    if failure or errors:
        return {**record, "status": "error", "error": failure or errors[0]}
    if skips:
        return {**record, "status": "skipped", "reason": skips[0]}
    try:
        result = section.summarize(cell, {role: value for role, (_, value) in outcomes.items()})
    except Exception:
        return {**record, "status": "error", "error": traceback.format_exc()}
    return {**record, "status": "ok", "result": result}


def _collect(
    procs: Mapping[str, BaseProcess], results: Queue[Outcome], abort: Event, deadline: float
) -> Tuple[Dict[str, Tuple[str, Any]], Optional[str]]:
    """Every role's (status, value); and why the cell failed outside them, if it did."""
    outcomes: Dict[str, Tuple[str, Any]] = {}
    while len(outcomes) < len(procs):
        try:
            role, status, value = results.get(timeout=0.2)
        except queue.Empty:
            pass
        else:
            outcomes[role] = (status, value)
            if status != "ok":
                abort.set()
            continue
        if time.monotonic() > deadline:
            abort.set()
            return outcomes, "timed out: the cell did not finish in time (hung?)"
        gone = [r for r in procs if r not in outcomes and procs[r].exitcode is not None]
        if gone:
            try:  # a result may still be in the pipe behind a fast exit
                role, status, value = results.get(timeout=1.0)
            except queue.Empty:
                abort.set()
                role = gone[0]
                return outcomes, f"{role} died (exit code {procs[role].exitcode}) without a result"
            outcomes[role] = (status, value)
            if status != "ok":
                abort.set()
    return outcomes, None


def _stop(procs: Mapping[str, BaseProcess]) -> None:
    """Join every process, terminating (then killing) any that will not leave."""
    for proc in procs.values():
        proc.join(timeout=10)
    for proc in procs.values():
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


class Progress:
    """The live line on stderr: cell n of N, what it measures, elapsed time."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.started = time.perf_counter()
        self.live = stream.isatty()

    def show(self, index: int, cell: Cell) -> None:
        elapsed = time.perf_counter() - self.started
        line = f"[cell {index}/{self.total}] {cell.label:40} elapsed {elapsed:6.1f} s"
        if self.live:
            self.stream.write(f"\r\033[K{line}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> float:
        elapsed = time.perf_counter() - self.started
        self.note(f"{self.total} cells in {elapsed:.1f} s")
        return elapsed


def run(cells: List[Cell], sections: Dict[str, Section], watch: leaks.Watch) -> List[CellRecord]:
    """Run every cell in order, showing progress and noting new /dev/shm entries."""
    progress = Progress(len(cells))
    records = []
    for index, cell in enumerate(cells, 1):
        progress.show(index, cell)
        record = run_cell(cell, sections[cell.section])
        watch.after(cell.label)
        if record["status"] == "skipped":
            progress.note(f"skipped {cell.label}: {record['reason']}")
        elif record["status"] == "error":
            progress.note(f"FAILED {cell.label}:\n{record['error']}")
        records.append(record)
    progress.done()
    return records

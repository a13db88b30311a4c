"""`python -m grain_shm bench`: grain_shm against pickle and the stdlib, in one run.

Plans the cells (section x transport x size), runs each in fresh spawned
processes, checks /dev/shm for leaks, prints the tables (for --quick only
with --verbose or --markdown: its figures are a smoke test) and last a
summary, and writes the JSON and the plot. Exit status 0 only if every cell
that ran passed its checks and nothing leaked; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

from grain_shm import names
from grain_shm.bench import (
    ceilings, grain_pipeline, leaks, machine, micro, pipeline, plot, queue_ceilings, queues,
    report, runner, summary, transfer,
)
from grain_shm.bench.payload import check_size
from grain_shm.bench.report import RunRecord
from grain_shm.bench.runner import Cell
from grain_shm.bench.transports import TRANSPORTS

SECTIONS = {
    "ceilings": ceilings.SECTION,
    "transfer": transfer.SECTION,
    "cfd": micro.CREATE_FILL_DESTROY,
    "release": micro.RELEASE,
    "grain-pipeline": grain_pipeline.SECTION,
    "pipeline": pipeline.SECTION,
}

KiB, MiB = 1 << 10, 1 << 20
TRANSFER_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 128 * MiB)
MICRO_SIZES = (64, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB)
GRAIN_PIPELINE_SIZES = (4 * MiB,)

# (seconds, minimum count): per transfer cell, per size in the other sections;
# grain-pipeline: (seconds of repeated runs, elements per run).
# The default run takes a few minutes; --quick one to two (it is dominated by
# starting two interpreters per transfer cell, and by pickling 128 MiB arrays).
BUDGETS = {
    "full": {"transfer": (2.5, 10), "cfd": (0.3, 20), "release": (0.3, 20), "ceilings": (0.2, 10),
             "grain-pipeline": (20.0, 96), "pipeline": (3.0, 10)},
    "quick": {"transfer": (0.05, 3), "cfd": (0.005, 3), "release": (0.005, 3), "ceilings": (0.005, 3),
              "grain-pipeline": (0.0, 8), "pipeline": (0.05, 3)},
}

# A size runs only where /dev/shm has room for queue depth + ROOM_SPARE
# arrays of it (the transfer's in flight: the queue's, the one being filled,
# the one being read, with the pool's rounding; the handoff's ring): in a
# container's 64 MiB /dev/shm the large sizes are left out, with a note,
# instead of dying of SIGBUS or ENOSPC half-way.
ROOM_SPARE = 4

# What --transports chooses from: the transports, and the pipeline's peers
# that are none (PyTorch's DataLoader), which only the pipeline runs.
CHOICES = [*TRANSPORTS, *pipeline.OWN_VARIANTS]


def _array_bytes(section: str, size: int) -> int:
    """The bytes of one shared array of a cell of `size`: the pipeline sends
    its small elements in batches."""
    if section == "pipeline":
        return size * (pipeline.batch_size(size) or 1)
    return size


def room_factor(queue_depth: int) -> int:
    """How many arrays of a size must fit in /dev/shm for the size to run."""
    return queue_depth + ROOM_SPARE


def _fitting(
    section: str, sizes: Sequence[int], room: Optional[int], left_out: Dict[str, List[int]],
    factor: int,
) -> Tuple[int, ...]:
    """The sizes of `section` that fit; the others go to `left_out[section]`."""
    kept = []
    for size in sizes:
        if room is None or factor * _array_bytes(section, size) <= room:
            kept.append(size)
        else:
            left_out.setdefault(section, []).append(size)
    return tuple(kept)


def left_out_note(left_out: Dict[str, List[int]], room: Optional[int], factor: int) -> str:
    sections = "; ".join(f"{section} {', '.join(runner.format_size(n) for n in sizes)}"
                         for section, sizes in left_out.items())
    return (f"left out for want of room in /dev/shm ({(room or 0) / MiB:.0f} MiB free, and a "
            f"transfer size needs {factor}x its bytes there, for the arrays in flight): "
            f"{sections}")


_UNITS = {"": 1, "B": 1, "K": KiB, "KB": KiB, "KIB": KiB, "M": MiB, "MB": MiB, "MIB": MiB,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64, 4K, 1MiB)")
    try:
        return check_size(int(match.group(1)) * _UNITS[match.group(2).upper()])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _depth(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"not a queue depth from 1 to 1024: {text!r}")
    return int(text)


def _choices(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        chosen = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(allowed)}"
            )
        return [item for item in allowed if item in chosen]  # canonical order

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grain_shm bench",
        description="Move NumPy arrays between processes with grain_shm, pickle, the "
        "stdlib shared_memory path (and Grain, SharedArray, faster-fifo, iceoryx2 if "
        "installed); compare.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="every section with tiny budgets: a smoke test (CI), under a minute")
    parser.add_argument("--sizes", type=lambda t: sorted({parse_size(s) for s in t.split(",")}),
                        help="array sizes for every section, e.g. 4K,1M,128M "
                        "(default: transfer 4K..128M, the others 64..16M)")
    parser.add_argument("--transports", type=_choices(CHOICES), default=CHOICES,
                        help=f"comma-separated, from {','.join(CHOICES)} (torch: the "
                        "pipeline's DataLoader only)")
    parser.add_argument("--sections", type=_choices(list(SECTIONS)), default=list(SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--queue-depth", type=_depth, default=transfer.QUEUE_DEPTH, metavar="N",
                        help="the transfer's multiprocessing.Queue maxsize, its prefetch buffer "
                        f"in arrays (default {transfer.QUEUE_DEPTH}); the queue's own ceiling "
                        "is measured at the same depth")
    parser.add_argument("--json", metavar="PATH", help="write every figure, machine and versions")
    parser.add_argument("--plot", metavar="PATH.png", help="throughput vs size (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--verbose", action="store_true",
                        help="print every table (a full run always does; --quick prints its "
                        "summary alone otherwise)")
    return parser


def _queue_kinds(chosen: Sequence[str]) -> List[str]:
    """The queues whose own ceilings the run measures: multiprocessing.Queue
    (every other transport's) and those of the chosen transports."""
    used = {"multiprocessing.Queue"} | {TRANSPORTS[t].queue for t in chosen if t in TRANSPORTS}
    return [kind for kind in queues.KINDS if kind in used]


def plan(
    args: argparse.Namespace,
    room: Optional[int] = None,
    left_out: Optional[Dict[str, List[int]]] = None,
) -> List[Cell]:
    """The run's cells. Sizes without room in /dev/shm (`room` bytes free,
    None: no limit) are left out, by section, into `left_out`."""
    budgets = BUDGETS["quick" if args.quick else "full"]
    left_out = {} if left_out is None else left_out
    depth = args.queue_depth
    factor = room_factor(depth)  # the transfer and its ceilings; the others' is fixed
    fixed = room_factor(transfer.QUEUE_DEPTH)
    chosen = set(args.sections)
    cells = []
    for section in args.sections:
        budget, least = budgets[section]
        if section == "ceilings":  # one thread over every size; two processes over the transfer's
            everything = sorted(set(args.sizes or TRANSFER_SIZES) | set(args.sizes or MICRO_SIZES))
            sizes = _fitting(section, everything, room, left_out, factor)
            moved = tuple(n for n in sizes if n in (args.sizes or TRANSFER_SIZES))
            if sizes:
                cells.append(Cell(section, None, sizes, budget, least))
            if moved:
                cells.append(Cell(section, ceilings.CROSS_PROCESS, moved, budget, least, depth))
            cells += [Cell(section, queue_ceilings.cell_transport(kind), (), budget, least, depth)
                      for kind in _queue_kinds(args.transports)]
        elif section == "grain-pipeline":  # its own transports: stock Grain, Grain on grain_shm
            cells += [Cell(section, t, (size,), budget, least)
                      for size in _fitting(section, args.sizes or GRAIN_PIPELINE_SIZES,
                                           room, left_out, fixed)
                      for t in args.transports if t in grain_pipeline.TRANSPORTS]
        elif section == "transfer":  # sizes outside, so drift hits every transport alike
            cells += [Cell(section, t, (size,), budget, least, depth)
                      for size in _fitting(section, args.sizes or TRANSFER_SIZES, room, left_out,
                                           factor)
                      for t in args.transports if t in TRANSPORTS]
        elif section == "pipeline":
            cells += [Cell(section, v, (size,), budget, least)
                      for size in _fitting(section, args.sizes or pipeline.SIZES, room,
                                           left_out, fixed)
                      for v in pipeline.VARIANTS if pipeline.chosen(v, args.transports)]
        else:  # cfd and release share the sizes: left out once, under the first
            sizes = _fitting(section, args.sizes or MICRO_SIZES, room,
                             {} if "cfd" in chosen and section == "release" else left_out,
                             fixed)
            cells += [Cell(section, t, sizes, budget, least) for t in args.transports
                      if t in TRANSPORTS and sizes and section in TRANSPORTS[t].sections]
    return cells


def _output_problem(args: argparse.Namespace) -> Optional[str]:
    for path in filter(None, (args.json, args.plot)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            return f"cannot write {path}: no directory {folder}"
    return plot.problem(args.sections) if args.plot else None


def main(argv: Sequence[str]) -> int:
    """argv[0] is "bench" (as `python -m grain_shm` passes it)."""
    try:
        args = _parser().parse_args(list(argv)[1:])
    except SystemExit as exit_:
        return cast(int, exit_.code)  # argparse exits with 2 (bad arguments) or 0 (--help)
    problem = _output_problem(args)
    if problem:  # found now, not after minutes of measuring
        print(f"python -m grain_shm bench: {problem}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    doc: RunRecord = {
        "schema": 1,
        "argv": ["python", "-m", "grain_shm", *argv],
        "started": started.isoformat(timespec="seconds"),
        "machine": machine.info(),
        "versions": machine.versions(),
    }
    space = names.shm_space()
    room = None if space is None else space[1]  # free bytes in /dev/shm now
    left_out: Dict[str, List[int]] = {}
    cells = plan(args, room, left_out)
    note = left_out_note(left_out, room, room_factor(args.queue_depth)) if left_out else None
    if note:
        print(f"python -m grain_shm bench: {note}", file=sys.stderr)
    doc["config"] = {
        "quick": args.quick,
        "sections": args.sections,
        "transports": [t for t in args.transports if t in TRANSPORTS],  # the tables' columns
        "transfer_sizes": sorted({c.sizes[0] for c in cells if c.section == "transfer"}),
        "micro_sizes": list(_fitting("cfd", args.sizes or MICRO_SIZES, room, {},
                                     room_factor(transfer.QUEUE_DEPTH))),
        "budgets": BUDGETS["quick" if args.quick else "full"],
        "transfer_queue_depth": args.queue_depth,
        "pipeline_sizes": sorted({c.sizes[0] for c in cells if c.section == "pipeline"}),
        "shm_free_bytes": room,
        "left_out_sizes": left_out,
        "left_out": note,
    }
    watch = leaks.Watch()
    doc["cells"] = runner.run(cells, SECTIONS, watch)
    doc["summary"] = summary.headlines(doc["cells"], doc["config"]["transfer_sizes"])
    doc["leak_check"] = watch.result()
    doc["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    doc["ok"] = doc["leak_check"]["ok"] and all(c["status"] != "error" for c in doc["cells"])
    tables = not args.quick or args.verbose or args.markdown
    sys.stdout.write(report.render(doc, markdown=args.markdown, tables=tables))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(doc, out, indent=1)
            out.write("\n")
    if args.plot:
        plot.save(doc, args.plot)
    return 0 if doc["ok"] else 1

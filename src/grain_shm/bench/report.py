"""The tables at the end of a run, as plain text or markdown, from the run's record.

Everything here reads the same dict `--json` writes, so a table is never
computed from anything the JSON does not hold. grain_shm figures are also
shown against the stdlib path, against pickle, and as a fraction of the
machine ceiling that bounds them.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, TypedDict

from grain_shm.bench import ceilings as ceilings_section
from grain_shm.bench import machine, pipeline, queue_ceilings, queues, summary
from grain_shm.bench.transports import TRANSPORTS
from grain_shm.bench.leaks import LeakCheck
from grain_shm.bench.runner import CellRecord, Result, format_size

GRAIN_SHM = ("grain_shm", "grain_shm-async")  # fresh segments: bound by first touch
# The pool: pages already in place, bound by the cross-process handoff and the queue.
RECYCLE = ("grain_shm-recycle", "grain_shm-recycle-async", "grain_shm-queue")


class RunConfig(TypedDict):
    quick: bool
    sections: List[str]
    transports: List[str]
    transfer_sizes: List[int]
    micro_sizes: List[int]
    budgets: Dict[str, Tuple[float, int]]  # section: (seconds, minimum count)
    transfer_queue_depth: int
    pipeline_sizes: List[int]
    shm_free_bytes: Optional[int]  # /dev/shm's free bytes at the start (None: unknown)
    left_out_sizes: Dict[str, List[int]]  # by section: sizes without room for their arrays there
    left_out: Optional[str]  # why, as the run's notes say it


class _RunStart(TypedDict):
    schema: int
    argv: List[str]
    started: str  # ISO 8601, UTC
    machine: machine.MachineInfo
    versions: Dict[str, Optional[str]]


class RunRecord(_RunStart, total=False):
    """The run's record, as `--json` writes it. The keys from `config` on are
    added as the run goes (total=False); a finished run has every one."""

    config: RunConfig
    cells: List[CellRecord]
    summary: List[summary.Headline]
    leak_check: LeakCheck
    elapsed_s: float
    ok: bool


# The cells of a run by what looks them up (see index()).
TransferCells = Dict[Tuple[Optional[str], int], CellRecord]  # (transport, size)
MicroCells = Dict[Tuple[str, Optional[str]], CellRecord]  # (section, transport)
CeilingRows = Dict[int, Result]  # size: the single-thread ceilings cell's row
QueueCeilings = Dict[str, Result]  # kind of queue: its ceilings cell's result
# A table: its headers and its rows of cells.
Table = Tuple[List[str], List[List[str]]]


def _num(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio(x: float) -> str:
    """Two decimals, or two significant digits for ratios far below 1."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


# Marks a share of a ceiling above 100%: the ceiling was under-measured.
OVER = "†"
OVER_NOTE = (
    f"{OVER} above 100% of a ceiling: a ceiling is the best of its repetitions, measured "
    "apart from the transfer; with few of them (--quick takes three) or a busy machine it "
    "was under-measured there, not beaten"
)


def _share(value: float, ceiling: float) -> str:
    """`value` as a share of `ceiling`, marked where it exceeds it."""
    share = value / ceiling
    return f"{share:.0%}{OVER if share > 1 else ''}"


def _status(record: Optional[CellRecord]) -> str:
    if record is None:
        return "-"
    return "skipped" if record["status"] == "skipped" else "FAILED"


def index(doc: RunRecord) -> Tuple[TransferCells, MicroCells, CeilingRows]:
    """The run's cells by what looks them up: transfer by (transport, size),
    cfd/release by (section, transport), ceiling rows by size."""
    transfer: TransferCells
    micro: MicroCells
    ceilings: CeilingRows
    transfer, micro, ceilings = {}, {}, {}
    for record in doc["cells"]:
        if record["section"] == "transfer":
            transfer[record["transport"], record["sizes"][0]] = record
        elif record["section"] == "ceilings":
            if record["status"] == "ok" and record["transport"] is None:
                ceilings = {row["size"]: row for row in record["result"]["sizes"]}
        else:
            micro[record["section"], record["transport"]] = record
    return transfer, micro, ceilings


def _transfer_gbps(transfer: TransferCells, transport: str, size: int) -> Optional[float]:
    record = transfer.get((transport, size))
    if record is None or record["status"] != "ok":
        return None
    median: float = record["result"]["gbps"]["median"]
    return median


def transfer_bound(ceilings: CeilingRows, size: int) -> Optional[float]:
    """The fresh-segment pipeline can go no faster than its slower end."""
    row = ceilings.get(size)
    if row is None:
        return None
    bound: float = min(row["first_touch_fill"]["best_gbps"], row["fresh_read"]["best_gbps"])
    return bound


def queue_figures(doc: RunRecord) -> QueueCeilings:
    """The queue ceilings that ran and passed, by kind of queue."""
    return {
        record["result"]["kind"]: record["result"]
        for record in doc["cells"]
        if record["section"] == "ceilings" and record["status"] == "ok"
        and str(record["transport"]).startswith(queue_ceilings.PREFIX)
    }


def cross_process(doc: RunRecord) -> tuple[Result | None, CeilingRows]:
    """The cross-process ceilings cell's result (None unless it ran and passed),
    and its rows (the handoff) by size."""
    record = _ceilings_record(doc, ceilings_section.CROSS_PROCESS)
    if record is None or record["status"] != "ok":
        return None, {}
    result = record["result"]
    return result, {row["size"]: row for row in result["sizes"]}


def queue_bound(queue: Result | None, size: int) -> float | None:
    """GB/s if every array were an empty message at the queue's best rate."""
    if queue is None:
        return None
    rate: float = queue["messages_per_s"]["max"]
    return rate * size / 1e9


def recycle_bound(cross: CeilingRows, queue: Result | None, size: int) -> float | None:
    """The pool's pipeline can go no faster than handing the bytes from one
    core to the other, nor than its queue (`queue`'s ceilings) passes messages."""
    row, by_queue = cross.get(size), queue_bound(queue, size)
    if row is None or by_queue is None:
        return None
    handoff: float = row["handoff"]["gbps"]["max"]
    return min(handoff, by_queue)


def transfer_table(doc: RunRecord) -> Table:
    transfer, _, ceilings = index(doc)
    _, cross = cross_process(doc)
    by_kind = queue_figures(doc)
    headers = ["size", "transport", "GB/s", "p10-p90", "arrays/s", "producer CPU µs",
               "consumer CPU µs", "× pickle", "× stdlib", "of ceiling", "pool MiB"]
    rows = []
    for size in doc["config"]["transfer_sizes"]:
        for transport in doc["config"]["transports"]:
            record = transfer.get((transport, size))
            if record is None or record["status"] != "ok":
                rows.append([format_size(size), transport, _status(record)] + [""] * 8)
                continue
            result = record["result"]
            gbps = result["gbps"]["median"]
            pickle = _transfer_gbps(transfer, "pickle", size)
            stdlib = _transfer_gbps(transfer, "stdlib", size)
            queue = by_kind.get(TRANSPORTS[transport].queue)
            bound = transfer_bound(ceilings, size) if transport in GRAIN_SHM else (
                recycle_bound(cross, queue, size) if transport in RECYCLE else None)
            pool = result.get("pool_arena_bytes")
            rows.append([
                format_size(size),
                transport,
                _num(gbps),
                f"{_num(result['gbps']['p10'])}-{_num(result['gbps']['p90'])}",
                f"{result['arrays_per_s']['median']:,.0f}",
                _num(result["producer_cpu_us"]),
                _num(result["consumer_cpu_us"]),
                _ratio(gbps / pickle) if pickle else "",
                _ratio(gbps / stdlib) if stdlib else "",
                _share(gbps, bound) if bound else "",
                "" if pool is None else _num(pool / (1 << 20)),
            ])
    return headers, rows


def micro_table(doc: RunRecord, section: str) -> Table:
    _, micro, ceilings = index(doc)
    chosen = [t for t in doc["config"]["transports"] if section in TRANSPORTS[t].sections]
    medians: Dict[str, Dict[int, float]] = {}
    for transport in chosen:
        record = micro.get((section, transport))
        if record is not None and record["status"] == "ok":
            medians[transport] = {
                row["size"]: row["us"]["median"] for row in record["result"]["sizes"]
            }
    ours = [t for t in GRAIN_SHM + RECYCLE if t in medians]
    headers = ["size", *chosen] + [f"{t} ÷ stdlib" for t in ours if "stdlib" in medians]
    ours_fresh = [t for t in ours if t in GRAIN_SHM]  # what the first-touch ceiling bounds
    with_ceiling = section == "cfd" and ceilings
    if with_ceiling:
        headers += [f"{t} of ceiling" for t in ours_fresh]
    rows = []
    for size in doc["config"]["micro_sizes"]:
        row = [format_size(size)]
        for transport in chosen:
            if transport in medians:
                row.append(_num(medians[transport][size]))
            else:
                row.append(_status(micro.get((section, transport))))
        if "stdlib" in medians:
            row += [_ratio(medians[t][size] / medians["stdlib"][size]) for t in ours]
        if with_ceiling:
            fill = ceilings.get(size, {}).get("first_touch_fill")
            # Times: the share is the ceiling's best time over the transport's.
            row += [_share(fill["us"]["min"], medians[t][size]) if fill else ""
                    for t in ours_fresh]
        rows.append(row)
    return headers, rows


def ceilings_table(doc: RunRecord) -> Table:
    _, _, ceilings = index(doc)
    _, cross = cross_process(doc)
    headers = ["size", "memcpy GB/s", "first-touch fill GB/s", "fresh-mapping read GB/s",
               "first-touch fill µs", "fill by", "handoff GB/s", "handoff p10-p90"]
    rows = []
    for size in sorted(ceilings.keys() | cross.keys()):
        row = [format_size(size)]
        one = ceilings.get(size)
        if one is None:
            row += [_not_measured(_ceilings_record(doc, None))] + [""] * 4
        else:
            row += [
                _num(one["memcpy"]["best_gbps"]),
                _num(one["first_touch_fill"]["best_gbps"]),
                _num(one["fresh_read"]["best_gbps"]),
                _num(one["first_touch_fill"]["us"]["min"]),
                one["first_touch_fill"]["method"].replace("_fill", ""),
            ]
        two = cross.get(size)
        if two is None:
            row += [_not_measured(_ceilings_record(doc, ceilings_section.CROSS_PROCESS)), ""]
        else:
            handoff = two["handoff"]["gbps"]
            row += [_num(handoff["max"]), f"{_num(handoff['p10'])}-{_num(handoff['p90'])}"]
        rows.append(row)
    return headers, rows


def queues_table(doc: RunRecord) -> Table:
    """One row per kind of queue: its empty-message rate and its latency."""
    by_kind = queue_figures(doc)
    headers = ["queue", "messages/s", "median", "p10-p90", "latency p50 µs", "latency p99 µs"]
    rows = []
    for kind in queues.KINDS:
        record = _ceilings_record(doc, queue_ceilings.cell_transport(kind))
        result = by_kind.get(kind)
        if result is None:
            if record is not None:  # not chosen: no row
                rows.append([kind, _status(record)] + [""] * 4)
            continue
        rate = result["messages_per_s"]
        rows.append([
            kind, f"{rate['max']:,.0f}", f"{rate['median']:,.0f}",
            f"{rate['p10']:,.0f}-{rate['p90']:,.0f}",
            _num(result["latency_us"]["median"]), _num(result["latency_p99_us"]),
        ])
    return headers, rows


def _not_measured(record: CellRecord | None) -> str:
    """Why a ceilings cell has no row for a size: "" if it passed (it did not
    measure that size: the cross-process cell takes only the transfer's)."""
    return "" if record is not None and record["status"] == "ok" else _status(record)


def _ceilings_record(doc: RunRecord, transport: str | None) -> CellRecord | None:
    for record in doc["cells"]:
        if (record["section"], record["transport"]) == ("ceilings", transport):
            return record
    return None


def _ceilings_title(doc: RunRecord) -> str:
    cross, _ = cross_process(doc)
    sizes = cross["ring_sizes"] if cross is not None else ceilings_section.ring_sizes(
        doc["config"]["transfer_queue_depth"])
    rings = ", ".join(map(str, sizes[:-1])) + f" and {sizes[-1]}"
    return (
        "Ceilings of this machine: the best of the repetitions (a ceiling is what the "
        "machine allows at best; p10-p90 shows their spread). memcpy, first-touch fill, "
        "fresh-mapping read: one thread, no transport. handoff: two processes pass the "
        "blocks of a ring in shared memory (fill, then read and check every byte; the best "
        f"of rings of {rings} blocks), synchronised by spinning on shared counters: no "
        "syscall, no queue"
    )


QUEUES_TITLE = (
    "Queues alone, {depth} deep, two processes: messages/s of a reference-sized message "
    "(the best timed segment: the ceiling; then the median and spread); one-way latency "
    "from put to get's return, the consumer blocked in get on an idle queue. "
    "multiprocessing.Queue carries every transport's messages but these: faster-fifo "
    "(pickled arrays through its ring), iceoryx2 (its samples are the arrays), "
    "grain_shm.Queue (grain_shm-queue)"
)

_TITLES = {
    "transfer": (
        "Transfer: producer process -> queue ({depth} deep: multiprocessing.Queue, but for "
        "the transports that are their own queue, see the queues) -> consumer process, "
        "which reads and checks every byte. Medians of timed segments; "
        "× = GB/s ratio; of ceiling = share of the slower of first-touch fill and "
        "fresh-mapping read (for the pool, -recycle and -queue: of the lower of the "
        "handoff and its queue's best rate × size); pool MiB = the producer's arenas at "
        "the end"
    ),
    "cfd": (
        "create+fill+destroy in one process, µs per array (median). pickle = a "
        "private np.empty array (malloc recycles its pages); ÷ stdlib = time "
        "ratio, lower is better; of ceiling = first-touch fill's best time / this time"
    ),
    "pipeline": pipeline.TITLE,
    "release": (
        "release on the caller: dropping a received array this process owns, "
        "after reading it, µs (median)"
    ),
    "grain-pipeline": (
        "Grain's DataLoader, 2 workers, stock and on grain_shm (patch_grain): elements "
        "per second read by the consumer, medians over runs; steady = after the first "
        "element, end-to-end = from creating the loader (worker start-up included)"
    ),
}


def _tables(doc: RunRecord) -> List[Tuple[str, List[str], List[List[str]]]]:
    built = []
    for section in doc["config"]["sections"]:
        if section == "transfer":
            headers, rows = transfer_table(doc)
        elif section == "ceilings":
            headers, rows = ceilings_table(doc)
            built.append((_ceilings_title(doc), headers, rows))
            headers, rows = queues_table(doc)
            if rows:
                title = QUEUES_TITLE.format(depth=doc["config"]["transfer_queue_depth"])
                built.append((title, headers, rows))
            continue
        elif section == "grain-pipeline":
            from grain_shm.bench import grain_pipeline

            headers, rows = grain_pipeline.table(doc)
        elif section == "pipeline":
            headers, rows = pipeline.table(doc)
        else:
            headers, rows = micro_table(doc, section)
        title = _TITLES[section].format(depth=doc["config"]["transfer_queue_depth"])
        built.append((title, headers, rows))
    return built


def _render(headers: List[str], rows: List[List[str]], markdown: bool, left: int) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _beyond_a_ceiling(doc: RunRecord) -> bool:
    """Whether a table shows a share of a ceiling above 100% (marked OVER)."""
    sections = doc["config"]["sections"]
    tables = ([transfer_table(doc)] if "transfer" in sections else []) + (
        [micro_table(doc, "cfd")] if "cfd" in sections else [])
    return any(OVER in cell for _, rows in tables for row in rows for cell in row)


def _notes(doc: RunRecord, tables: bool = True) -> List[str]:
    """Skips, failures, room, the leak verdict; the † explained if `tables` show one."""
    notes = []
    skipped: Dict[str, List[str]] = {}  # reason: what it skipped (a transport, its queue)
    for record in doc["cells"]:
        if record["status"] == "skipped":
            what, name = skipped.setdefault(record["reason"], []), str(record["transport"])
            if name not in what:
                what.append(name)
        elif record["status"] == "error":
            first = record["error"].strip().splitlines()[-1]
            sizes = ",".join(format_size(n) for n in record["sizes"])
            notes.append(f"FAILED {record['section']} {record['transport'] or ''} {sizes}: {first}")
    notes[:0] = [f"{', '.join(what)} skipped: {reason}" for reason, what in skipped.items()]
    if tables and _beyond_a_ceiling(doc):
        notes.append(OVER_NOTE)
    note = doc["config"].get("left_out")
    if note:
        notes.append(f"{note[0].upper()}{note[1:]}.")
    leak = doc["leak_check"]
    if leak["ok"]:
        notes.append(f"Leak check: {leak['dir']} holds nothing new.")
    else:
        for entry in leak["leaked"]:
            notes.append(f"LEAK: {leak['dir']}/{entry['name']} (first seen after {entry['after_cell']})")
    return notes


def render(doc: RunRecord, markdown: bool = False, tables: bool = True) -> str:
    """Every table of the run (unless `tables` is False), then skips,
    failures and the leak verdict, and last the summary."""
    parts = [machine.headline(doc["machine"], doc["versions"], doc["started"])]
    for title, headers, rows in _tables(doc) if tables else []:
        left = 2 if headers[1] in ("transport", "variant") else 1
        heading = f"**{title}**" if markdown else title
        parts.append(f"{heading}\n\n{_render(headers, rows, markdown, left)}")
    bullet = "- " if markdown else ""
    parts.append("\n".join(bullet + note for note in _notes(doc, tables)))
    parts.append(summary.render(doc["summary"], doc["config"]["quick"],
                                doc["config"]["transfer_queue_depth"], markdown))
    return "\n\n".join(parts) + "\n"

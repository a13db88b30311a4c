"""`--plot PATH.png`: throughput against size, one line per transport, log axes.

matplotlib is an optional extra (`pip install 'grain_shm[plot]'`); `problem()`
is asked before the run starts, so a missing plotter costs a message, not a run.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Iterable, List, Literal, Optional, cast

from grain_shm.bench import machine, report
from grain_shm.bench.report import RunRecord
from grain_shm.bench.runner import format_size

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOTTED = ("transfer", "cfd")
_SizesKey = Literal["transfer_sizes", "micro_sizes"]  # of RunConfig


def problem(sections: Iterable[str]) -> Optional[str]:
    """Why `--plot` cannot work for this run, or None; asked before the run."""
    if importlib.util.find_spec("matplotlib") is None:
        return (
            "--plot needs matplotlib, which is not installed: "
            "pip install 'grain_shm[plot]' (or pip install matplotlib)"
        )
    if not set(PLOTTED) & set(sections):
        return f"--plot draws the {' and '.join(PLOTTED)} sections; neither is selected"
    return None


def _transfer(ax: Axes, doc: RunRecord) -> None:
    """GB/s per transport with its p10-p90 band, under the machine's ceilings."""
    transfer, _, ceilings = report.index(doc)
    sizes = doc["config"]["transfer_sizes"]
    for transport in doc["config"]["transports"]:
        points = [
            (size, transfer[transport, size]["result"]["gbps"])
            for size in sizes
            if transfer.get((transport, size), {}).get("status") == "ok"
        ]
        if points:
            xs = [size for size, _ in points]
            line, = ax.plot(xs, [g["median"] for _, g in points], marker="o", label=transport)
            ax.fill_between(xs, [g["p10"] for _, g in points], [g["p90"] for _, g in points],
                            color=line.get_color(), alpha=0.15)
    bounded = [size for size in sizes if size in ceilings]
    if bounded:
        # Never None: every size in `bounded` has its ceilings row.
        bounds = cast(List[float], [report.transfer_bound(ceilings, s) for s in bounded])
        ax.plot(bounded, bounds, "k--",
                label="ceiling: fresh segment (fill or read)")
        ax.plot(bounded, [ceilings[s]["memcpy"]["best_gbps"] for s in bounded], "k:",
                label="ceiling: memcpy")
    _, cross = report.cross_process(doc)
    handed = [size for size in sizes if size in cross]
    queue = report.queue_figures(doc).get("multiprocessing.Queue")
    if handed and queue is not None:
        # Never None: every size in `handed` has its cross-process row, and the queue's.
        bounds = cast(list[float], [report.recycle_bound(cross, queue, s) for s in handed])
        ax.plot(handed, bounds, "k-.", label="ceiling: pool (handoff or queue)")
    ax.set_title("transfer between processes (median, p10-p90 band)")
    ax.set_ylabel("GB/s")


def _create_fill_destroy(ax: Axes, doc: RunRecord) -> None:
    """µs per array per transport, over the first-touch fill it cannot beat."""
    _, micro, ceilings = report.index(doc)
    for transport in doc["config"]["transports"]:
        record = micro.get(("cfd", transport))
        if record and record["status"] == "ok":
            rows = record["result"]["sizes"]
            ax.plot([r["size"] for r in rows], [r["us"]["median"] for r in rows],
                    marker="o", label=transport)
    bounded = [size for size in doc["config"]["micro_sizes"] if size in ceilings]
    if bounded:
        ax.plot(bounded, [ceilings[s]["first_touch_fill"]["us"]["median"] for s in bounded],
                "k--", label="ceiling: first-touch fill")
    ax.set_title("create+fill+destroy in one process (median)")
    ax.set_ylabel("µs per array")


def save(doc: RunRecord, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import NullLocator

    panels = [
        (draw, doc["config"][cast(_SizesKey, sizes)])
        for name, draw, sizes in (
            ("transfer", _transfer, "transfer_sizes"),
            ("cfd", _create_fill_destroy, "micro_sizes"),
        )
        if name in doc["config"]["sections"]
    ]
    figure, axes = pyplot.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (draw, sizes) in zip(axes[0], panels):
        draw(ax, doc)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [format_size(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("array size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(machine.headline(doc["machine"], doc["versions"], doc["started"]),
                    fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)

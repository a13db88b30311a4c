"""The few lines a run ends with: grain_shm against pickle and the best peer, per size.

A newcomer's first command is `bench --quick`; two hundred lines of tables
whose figures swing between runs tell them nothing. So a run ends with one
line per transfer size: the fastest grain_shm transport in arrays/s, its
ratio to pickle through multiprocessing.Queue and to the fastest peer (any
transport that is neither grain_shm nor pickle), each ratio with its spread
(from the p10 and p90 of the timed segments: the lowest over the highest,
the highest over the lowest), then one line on what the figures are worth.
The full tables are `--verbose`, `--markdown` and `--json`.

The same headlines go into the JSON ("summary"), so the printed lines are
never computed from anything the record does not hold.
"""

from __future__ import annotations

from typing import List, Optional, TypedDict

from grain_shm.bench.runner import CellRecord, Result, format_size

OURS_PREFIX = "grain_shm"
BASELINE = "pickle"


class Ratio(TypedDict):
    of: str  # the transport compared against
    median: float  # ours' median arrays/s over theirs
    low: float  # ours' p10 over theirs' p90
    high: float  # ours' p90 over theirs' p10


class Headline(TypedDict):
    size: int
    transport: str  # the fastest grain_shm transport at this size
    arrays_per_s: float  # its median
    vs_pickle: Optional[Ratio]
    vs_best_peer: Optional[Ratio]


def _ratio(ours: Result, theirs: Result, of: str) -> Ratio:
    return {
        "of": of,
        "median": ours["median"] / theirs["median"],
        "low": ours["p10"] / theirs["p90"],
        "high": ours["p90"] / theirs["p10"],
    }


def headlines(cells: List[CellRecord], sizes: List[int]) -> List[Headline]:
    """One headline per transfer size where a grain_shm transport passed."""
    found: List[Headline] = []
    for size in sizes:
        rates = {
            str(c["transport"]): c["result"]["arrays_per_s"]
            for c in cells
            if c["section"] == "transfer" and c["status"] == "ok" and c["sizes"] == [size]
        }
        ours = [t for t in rates if t.startswith(OURS_PREFIX)]
        if not ours:
            continue
        best = max(ours, key=lambda t: rates[t]["median"])
        peers = [t for t in rates if not t.startswith(OURS_PREFIX) and t != BASELINE]
        peer = max(peers, key=lambda t: rates[t]["median"]) if peers else None
        headline: Headline = {
            "size": size,
            "transport": best,
            "arrays_per_s": rates[best]["median"],
            "vs_pickle": _ratio(rates[best], rates[BASELINE], BASELINE)
            if BASELINE in rates else None,
            "vs_best_peer": _ratio(rates[best], rates[peer], peer) if peer else None,
        }
        found.append(headline)
    return found


def _times(ratio: Ratio) -> str:
    def short(x: float) -> str:
        return f"{x:.2g}" if x < 10 else f"{x:.0f}"

    return f"{short(ratio['median'])}× {ratio['of']} ({short(ratio['low'])}-{short(ratio['high'])})"


def render(lines: List[Headline], quick: bool, depth: int, markdown: bool = False) -> str:
    """The summary's text: a title, a line per size, what the figures are worth
    (in markdown: the title bold, a bullet per size)."""
    title = (f"Summary: arrays/s from one process to another (queue {depth} deep), the fastest "
             "grain_shm transport against pickle and the fastest peer; median (p10/p90 spread)")
    out = [f"**{title}**\n" if markdown else title]
    indent = "- " if markdown else "  "
    if not lines:
        out.append(f"{indent}no grain_shm transfer cell passed: nothing to compare (see the notes)")
    width = max((len(h["transport"]) for h in lines), default=0)
    for h in lines:
        ratios = [_times(r) for r in (h["vs_pickle"], h["vs_best_peer"]) if r is not None]
        out.append(f"{indent}{format_size(h['size']):>7}  {h['transport']:<{width}}  "
                   f"{h['arrays_per_s']:>9,.0f}/s  " + "  ".join(ratios))
    if markdown:
        out.append("")
    if quick:
        out.append("Quick figures are a smoke test (tiny budgets, figures swing up to 10× "
                   "between runs): for real ones run `python -m grain_shm bench` (a few "
                   "minutes, on a quiet machine); --verbose prints every table.")
    else:
        out.append("One run's figures: compare transports within it, not across runs; "
                   "--json keeps every sample summary.")
    return "\n".join(out)

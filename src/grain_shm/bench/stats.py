"""Summaries of timing samples: the median and spread every figure reports.

Raw samples stay in the process that took them; only these summaries travel
back and land in the JSON, so a run's size does not grow with its length.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt


def summary(samples: Union[Sequence[float], npt.NDArray[np.floating[Any]]]) -> Dict[str, float]:
    """n, median, p10, p90, min, max and mean of `samples`."""
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        raise ValueError("no samples")
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "n": int(values.size),
        "median": float(median),
        "p10": float(p10),
        "p90": float(p90),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def segment_rates(
    timestamps: Sequence[float], warmup: int, segments: int
) -> Tuple[npt.NDArray[np.float64], int]:
    """Per-segment rates (items/s) from the completion time of every item.

    The first `warmup` items are dropped (the pipeline is still filling); the
    rest are split into at most `segments` runs of equal item count, so each
    rate is a steady-state figure and their spread shows the noise.
    """
    if warmup < 1:
        raise ValueError("warmup must be at least 1: the first item starts the clock")
    times = np.asarray(timestamps, dtype=float)[warmup - 1 :]
    timed = times.size - 1
    if timed < 1:
        raise ValueError("no item after the warm-up")
    bounds = np.linspace(0, timed, min(segments, timed) + 1).round().astype(int)
    counts = np.diff(bounds)
    spans = times[bounds[1:]] - times[bounds[:-1]]
    return counts / np.maximum(spans, 1e-9), timed

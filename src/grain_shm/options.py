"""MultiprocessingOptions: Grain's fields in Grain's order, validated."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def checked_int(name: str, value: Any, minimum: int) -> int:
    """`value` as a Python int of at least `minimum`. numpy's ints are
    accepted, as values computed with numpy reach here; floats, strings and
    bools standing for numbers are refused (TypeError, ValueError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclasses.dataclass(slots=True)
class MultiprocessingOptions:
    """Options for running a pipeline in worker processes.

    Attributes:
      num_workers: worker processes; 0 runs everything in the calling process.
      per_worker_buffer_size: finished elements (batches, if the pipeline
        batches) each worker may hold ahead of the consumer; at least 1.
      enable_profiling: log per-worker figures; only with num_workers >= 1.
    """

    num_workers: int = 0
    per_worker_buffer_size: int = 1
    enable_profiling: bool = False

    def __post_init__(self) -> None:
        # numpy's ints and bools are accepted (and stored as Python's).
        self.num_workers = checked_int("num_workers", self.num_workers, 0)
        self.per_worker_buffer_size = checked_int(
            "per_worker_buffer_size", self.per_worker_buffer_size, 1
        )
        if not isinstance(self.enable_profiling, (bool, np.bool_)):
            raise TypeError(
                "enable_profiling must be a bool, not "
                f"{type(self.enable_profiling).__name__}"
            )
        self.enable_profiling = bool(self.enable_profiling)

"""MultiprocessingOptions: Grain's fields in Grain's order, validated."""

from __future__ import annotations

import dataclasses


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
        for field, minimum in (("num_workers", 0), ("per_worker_buffer_size", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, not {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{field} must be >= {minimum}, got {value}")
        if not isinstance(self.enable_profiling, bool):
            raise TypeError(
                "enable_profiling must be a bool, not "
                f"{type(self.enable_profiling).__name__}"
            )

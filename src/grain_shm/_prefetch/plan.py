"""The order of the stream: which source index each position reads, and
which positions each item holds. The same in every process, so a worker and
the consumer agree on item k without talking about it."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, cast

import numpy as np


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One pass of the stream, the same in every process: `num_epochs`
    epochs of the shard from `first_epoch` on (each shuffled by its own
    permutation if seeded), concatenated, then cut into items of
    `batch_size` positions (batches may span epochs, not passes)."""

    start: int  # the shard is source[start:start + size]
    size: int
    num_epochs: Optional[int]  # None: for ever
    shuffle_seed: Optional[int]
    batch_size: Optional[int]
    drop_remainder: bool
    first_epoch: int = 0  # pass p of a prefetcher starts at epoch p * num_epochs
    rng_seed: Optional[int] = None  # transform(element, rng), rng from (seed, epoch, index)

    def epoch_of(self, position: int) -> int:
        """The epoch (counted over every pass) that stream position `position` is in."""
        return self.first_epoch + position // self.size

    def rng(self, position: int, index: int) -> np.random.Generator:
        """The generator of the element at `position` (source index `index`):
        from (rng_seed, epoch, index) only, so the same for every worker
        count, start method, shard and resume point, and fresh per epoch.
        (A SeedSequence of three words: about 20 µs an element here.)"""
        return np.random.default_rng([cast(int, self.rng_seed), self.epoch_of(position), index])

    @property
    def num_items(self) -> Optional[int]:
        if self.num_epochs is None:
            return None if self.size else 0
        total = self.size * self.num_epochs
        if self.batch_size is None:
            return total
        return total // self.batch_size if self.drop_remainder else -(-total // self.batch_size)

    def positions(self, item: int) -> range:
        if self.batch_size is None:
            return range(item, item + 1)
        start = item * self.batch_size
        stop = start + self.batch_size
        if self.num_epochs is not None:
            stop = min(stop, self.size * self.num_epochs)
        return range(start, stop)


class _Order:
    """Source indices of positions, with the current epoch's permutation cached."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self._epoch = -1
        self._permutation = np.empty(0, np.int64)

    def _permutation_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            seed = [cast(int, self._plan.shuffle_seed), self._plan.first_epoch + epoch]
            rng = np.random.default_rng(seed)
            self._permutation = rng.permutation(self._plan.size)
            self._epoch = epoch
        return self._permutation

    def source_indices(self, positions: range) -> List[int]:
        """One array operation per batch, not a few Python ones per element."""
        plan = self._plan
        epochs, offsets = np.divmod(np.arange(positions.start, positions.stop), plan.size)
        if plan.shuffle_seed is not None:
            for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
                here = epochs == epoch
                offsets[here] = self._permutation_of(epoch)[offsets[here]]
        indices: List[int] = (offsets + plan.start).tolist()
        return indices

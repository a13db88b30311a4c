"""What every transport carries: the same bytes, filled and checked the same way.

The producer copies a fixed source pattern into each fresh array (one memcpy,
as a decoder or collate step writes its output) and stamps the array's index
into its first 8 bytes. The consumer reads every byte once through a wrapping
uint64 sum and compares it with the sum the index predicts, so an array that
arrives stale, repeated, torn or out of order is caught, for every transport
at the same cost.
"""

from __future__ import annotations

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: every word of the pattern differs
_MASK = (1 << 64) - 1


def check_size(nbytes: int) -> int:
    """Sizes must hold whole uint64 words (the checksum reads words)."""
    if nbytes < 8 or nbytes % 8:
        raise ValueError(f"array size must be a positive multiple of 8 bytes, not {nbytes}")
    return nbytes


def source(nbytes: int) -> np.ndarray:
    """The pattern every array is filled from, already in memory (pre-faulted)."""
    words = np.arange(check_size(nbytes) // 8, dtype=np.uint64)
    words *= _MIX
    return words.view(np.uint8)


def fill(array: np.ndarray, pattern: np.ndarray, index: int) -> None:
    """Write every byte of `array`: the pattern, then the index in word 0."""
    np.copyto(array, pattern)
    array.view(np.uint64)[0] = index


def checksum(array: np.ndarray) -> int:
    """Read every byte: the wrapping sum of the array's uint64 words."""
    return int(np.add.reduce(array.view(np.uint64), dtype=np.uint64))


def expected(pattern_sum: int, index: int) -> int:
    """What `checksum` gives for array `index`, from `checksum(pattern)`
    (the pattern's word 0 is 0, and the index replaces it)."""
    return (pattern_sum + index) & _MASK

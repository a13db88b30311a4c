"""PyTorch tensors as leaves: a CPU tensor with a NumPy dtype travels as the
array it views, written once into shared memory by the worker, and arrives
as `torch.from_numpy` of the consumer's SharedMemoryArray (no copy; the
tensor keeps the array, so the batch's memory, alive).

torch's own pickling of a tensor (the reductions it registers with
multiprocessing's ForkingPickler, which messages are pickled with) would
share it by its own strategy, whose file descriptors and names outlive
neither the worker nor the resource sharer: the stream lost them. So a
tensor is never handed to it. A tensor this cannot carry (on a GPU, needing
grad, a dtype NumPy lacks such as bfloat16) is pickled by value, as plain
pickle does.

torch is never imported here: a leaf is a tensor only if torch is already
in sys.modules (whoever made the tensor imported it), and the consumer
imports it when the first tensor arrives.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Tuple

import numpy as np


def as_array(leaf: Any) -> Optional[np.ndarray]:
    """The NumPy view of a CPU tensor leaf, or None (not a tensor, or one
    that NumPy cannot view)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(leaf, torch.Tensor):
        return None
    if leaf.device.type != "cpu" or leaf.requires_grad or leaf.layout != torch.strided:
        return None
    try:
        array: np.ndarray = leaf.resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError):  # bfloat16 and the like: no NumPy dtype
        return None
    return array


def is_tensor(leaf: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(leaf, torch.Tensor)


class Shared:
    """A tensor's array in shared memory, in a worker's message: pickled as
    the array (the worker's own, see message.py), rebuilt as a tensor."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> Tuple[Any, ...]:
        return from_numpy, (self.array,)


def from_numpy(array: np.ndarray) -> Any:
    """In the consumer (or in-process): the tensor over `array`'s memory."""
    torch = importlib.import_module("torch")  # here only: a tensor was sent
    return torch.from_numpy(array)

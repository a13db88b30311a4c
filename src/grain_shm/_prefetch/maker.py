"""Making items: read the source, apply the transform, and write the array
leaves where `allocate` says (a batch is assembled in place, leaf by leaf)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Hashable, List, Optional, Tuple, Union, cast

import numpy as np

from grain_shm._prefetch import tensors
from grain_shm._prefetch.plan import _Order
from grain_shm.tree import _map, _map_builtin

if TYPE_CHECKING:
    from grain_shm._prefetch.plan import _Plan
    from grain_shm.prefetch import RandomAccessSource

Transform = Callable[..., Any]  # transform(element), or transform(element, rng)
Allocate = Callable[[Tuple[int, ...], np.dtype], np.ndarray]


def _structure(tree: Any, leaves: List[Any]) -> Hashable:
    """The tree's shape (container types, keys in order), its leaves appended
    to `leaves` in the order tree._map_builtin visits them (jax's tree_map,
    which tree._map uses where jax is imported, sorts dict keys)."""
    if isinstance(tree, (list, tuple)):
        return type(tree), tuple(_structure(item, leaves) for item in tree)
    if isinstance(tree, Mapping):
        return type(tree), tuple((key, _structure(value, leaves)) for key, value in tree.items())
    leaves.append(tree)
    return None


def _as_array(leaf: Any) -> Optional[np.ndarray]:
    """The leaf as an array if it belongs in shared memory (arrays, CPU
    tensors and numbers with a fixed-size, non-object dtype); strings and
    objects travel pickled."""
    if isinstance(leaf, (np.ndarray, np.number, np.bool_, bool, int, float, complex)):
        value = np.asarray(leaf)
        if value.dtype.kind not in "OUS":
            return value
        return None
    return tensors.as_array(leaf)


class _Maker:
    """Makes item k: reads its elements, applies the transform, and writes
    array leaves (batches, or in a worker every array) into `allocate`'s memory."""

    def __init__(
        self,
        plan: _Plan,
        source: RandomAccessSource,
        transform: Optional[Transform],
        allocate: Optional[Allocate],
        stats: _Stats,
        timed: bool = False,
    ) -> None:
        self._plan = plan
        self._timed = timed  # time reads and transforms (profiling)
        self._order = _Order(plan)
        self._source = source
        self._transform = transform
        self._allocate = allocate  # None: elements stay as the transform made them
        self.stats = stats
        self.position = -1  # of the element being made, for error messages
        self.index = -1

    def make(self, item: int) -> Any:
        positions = self._plan.positions(item)
        indices = self._order.source_indices(positions)
        if self._plan.batch_size is None:
            element = self._element(positions[0], indices[0])
            return element if self._allocate is None else _map(self._share, element)
        return self._batch(positions, indices)

    def _element(self, position: int, index: int) -> Any:
        self.position = position
        self.index = index
        stats = self.stats
        stats.elements += 1
        if not self._timed:
            element = self._source[index]
            return element if self._transform is None else self._apply(element)
        started = time.perf_counter()
        element = self._source[index]
        read = time.perf_counter()
        if self._transform is not None:
            element = self._apply(element)
        stats.read_s += read - started
        stats.transform_s += time.perf_counter() - read
        return element

    def _apply(self, element: Any) -> Any:
        transform = cast(Transform, self._transform)
        if self._plan.rng_seed is None:
            return transform(element)
        return transform(element, self._plan.rng(self.position, self.index))

    def _share(self, leaf: Any) -> Any:
        """An element's leaf in a worker: arrays (and tensors, as the arrays
        they view) copied once into shared memory."""
        tensor = tensors.as_array(leaf)
        array = leaf if tensor is None else tensor
        if not isinstance(array, np.ndarray) or array.dtype.hasobject:
            return leaf
        assert self._allocate is not None
        shared = self._allocate(array.shape, array.dtype)
        np.copyto(shared, array, casting="no")
        self.stats.bytes += shared.nbytes
        return shared if tensor is None else tensors.Shared(shared)

    def _batch(self, positions: range, indices: List[int]) -> Any:
        allocate = self._allocate or (lambda shape, dtype: np.empty(shape, dtype))
        first = self._element(positions[0], indices[0])
        leaves: List[Any] = []
        structure = _structure(first, leaves)
        bare = structure is None  # the element is its only leaf: no tree to compare
        columns: List[Union[np.ndarray, List[Any]]] = []
        tensor_columns = set()  # a column of tensors arrives as one tensor
        for leaf in leaves:
            value = _as_array(leaf)
            if value is None:
                columns.append([leaf])
            else:
                column = allocate((len(positions),) + value.shape, value.dtype)
                column[0] = value
                if tensors.is_tensor(leaf):
                    tensor_columns.add(len(columns))
                columns.append(column)
        for row in range(1, len(positions)):
            element = self._element(positions[row], indices[row])
            these: List[Any] = []
            if bare:
                these.append(element)
            elif _structure(element, these) != structure:
                raise ValueError(
                    f"element {self.position} (source index {self.index}) is not structured "
                    f"like the batch's first element (containers, keys and their order "
                    f"must match)"
                )
            for filling, leaf in zip(columns, these):
                if isinstance(filling, list):
                    filling.append(leaf)
                    continue
                value = tensors.as_array(leaf)
                if value is None:
                    value = np.asarray(leaf)
                if value.shape != filling.shape[1:] or value.dtype != filling.dtype:
                    raise ValueError(
                        f"element {self.position} (source index {self.index}) has a leaf of "
                        f"shape {value.shape} and dtype {value.dtype} where the batch's "
                        f"first element has {filling.shape[1:]} and {filling.dtype}"
                    )
                filling[row] = value
        self.stats.bytes += sum(c.nbytes for c in columns if isinstance(c, np.ndarray))
        tensor = tensors.from_numpy if self._allocate is None else tensors.Shared
        filled = iter([tensor(cast(np.ndarray, c)) if i in tensor_columns else c
                       for i, c in enumerate(columns)])
        return _map_builtin(lambda _: next(filled), first)  # _structure's order, the same walk


@dataclasses.dataclass
class _Stats:
    """A worker's running totals, sent with each item when profiling."""

    elements: int = 0
    bytes: int = 0
    read_s: float = 0.0
    transform_s: float = 0.0
    blocked_s: float = 0.0
    alive_s: float = 0.0

"""copy_to_shm, open_from_shm, unlink_shm over nested containers.

Containers are walked as Grain's tree_lib does: with JAX already imported,
by `jax.tree_util.tree_map` (so registered pytree nodes, e.g. flax structs,
are walked too; grain_shm never imports jax itself); without it, lists,
tuples (namedtuples rebuilt by field), dicts and other mappings
(defaultdicts keep their factory). Anything else is a leaf and is returned
unchanged unless it is an array or metadata.
"""

from __future__ import annotations

import collections
import collections.abc
import sys
from typing import Any, Callable

import numpy as np

from grain_shm.array import SharedMemoryArray, SharedMemoryArrayMetadata, _metadata_of


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    jax = sys.modules.get("jax")
    if jax is not None:
        return jax.tree_util.tree_map(fn, tree)
    return _map_builtin(fn, tree)


def _map_builtin(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, (list, tuple)):
        items = [_map_builtin(fn, item) for item in tree]
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            return type(tree)(*items)
        return type(tree)(items)
    if isinstance(tree, collections.abc.Mapping):
        items = [(key, _map_builtin(fn, value)) for key, value in tree.items()]
        if isinstance(tree, collections.defaultdict):
            result = type(tree)(tree.default_factory)
            result.update(items)
            return result
        return type(tree)(items)  # type: ignore[call-arg]
    return fn(tree)


def _copy_leaf(leaf: Any, min_size: int) -> Any:
    if isinstance(leaf, SharedMemoryArray):
        metadata = _metadata_of(leaf)  # None for a private copy: copied like any array
        if metadata is not None:  # already shared: send the reference, copy nothing
            return metadata
    if not isinstance(leaf, np.ndarray):
        return leaf
    # A plain ndarray is copied even when it views a SharedMemoryArray: the
    # receiver owns (and unlinks) what it opens, so only what the caller made
    # a SharedMemoryArray changes hands, as in Grain.
    if (
        leaf.dtype.hasobject
        or not leaf.flags.c_contiguous
        or leaf.size == 0
        or leaf.nbytes < min_size
    ):
        return leaf
    shared = SharedMemoryArray(leaf.shape, leaf.dtype)
    try:
        np.copyto(shared, leaf, casting="no")
    except BaseException:  # e.g. Ctrl-C during a large copy: leave nothing behind
        shared.unlink_on_del()
        raise
    return shared.metadata


def copy_to_shm(struct: Any, min_size: int = 0) -> Any:
    """Replace each SharedMemoryArray leaf by its metadata, and each other
    C-contiguous array leaf of at least `min_size` bytes by metadata of a new
    shared-memory copy (also a plain ndarray view of a SharedMemoryArray:
    its segment is not the caller's to give away). The receiver calls
    `open_from_shm`, which owns (and so unlinks) what it opens. Empty and
    object arrays stay as they are."""
    return _map(lambda leaf: _copy_leaf(leaf, min_size), struct)


def _open_leaf(leaf: Any) -> Any:
    if isinstance(leaf, SharedMemoryArrayMetadata):
        leaf = SharedMemoryArray.from_metadata(leaf)
        leaf.unlink_on_del()
    return leaf


def open_from_shm(struct: Any) -> Any:
    """Map every metadata leaf as a SharedMemoryArray that unlinks its segment
    when it (and its views) are gone."""
    return _map(_open_leaf, struct)


def _unlink_leaf(leaf: Any) -> Any:
    if isinstance(leaf, SharedMemoryArrayMetadata):
        leaf.close_and_unlink_shm()
    return leaf


def unlink_shm(struct: Any) -> None:
    """Unlink the segment of every metadata leaf (e.g. for results never opened)."""
    _map(_unlink_leaf, struct)

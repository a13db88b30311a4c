"""With JAX imported, copy_to_shm and friends walk registered pytree nodes,
as Grain's tree_lib does through jax.tree_util; without it, they are leaves.

JAX is not a dependency, so `fake_jax` puts a small stand-in in sys.modules:
a registry of node types and a tree_map that flattens with it the way
jax.tree_util does (registered nodes, lists, tuples, namedtuples, dicts by
sorted key; None has no children), applies the function to the leaves and
rebuilds the nodes with their aux data.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from grain_shm import SharedMemoryArray, SharedMemoryArrayMetadata, copy_to_shm, open_from_shm


class Params:
    """A flax-struct-like container: not a list, tuple or mapping."""

    def __init__(self, weight, bias, name):
        self.weight, self.bias, self.name = weight, bias, name


def _make_fake_jax():
    registry = {}

    def register_pytree_node(nodetype, flatten_func, unflatten_func):
        registry[nodetype] = (flatten_func, unflatten_func)

    def tree_map(f, tree, is_leaf=None):
        def walk(node):
            if node is None:
                return None
            kind = type(node)
            if kind in registry:
                flatten, unflatten = registry[kind]
                children, aux = flatten(node)
                return unflatten(aux, [walk(child) for child in children])
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                return kind(*[walk(child) for child in node])
            if kind in (list, tuple):
                return kind(walk(child) for child in node)
            if kind is dict:
                return {key: walk(node[key]) for key in sorted(node)}
            return f(node)

        return walk(tree)

    jax = types.ModuleType("jax")
    jax.tree_util = types.SimpleNamespace(
        register_pytree_node=register_pytree_node, tree_map=tree_map
    )
    jax.tree_util.register_pytree_node(
        Params,
        lambda p: ((p.weight, p.bias), p.name),
        lambda name, children: Params(*children, name),
    )
    return jax


@pytest.fixture
def fake_jax(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", _make_fake_jax())


def test_registered_nodes_are_walked_when_jax_is_imported(fake_jax):
    params = Params(np.arange(6, dtype=np.float32), np.ones(3), "dense")
    sent = copy_to_shm({"params": params, "step": 3})
    assert isinstance(sent["params"], Params) and sent["params"].name == "dense"
    assert isinstance(sent["params"].weight, SharedMemoryArrayMetadata)
    assert isinstance(sent["params"].bias, SharedMemoryArrayMetadata)
    got = open_from_shm(sent)
    assert isinstance(got["params"].weight, SharedMemoryArray)
    np.testing.assert_array_equal(got["params"].weight, np.arange(6))
    np.testing.assert_array_equal(got["params"].bias, np.ones(3))
    assert got["step"] == 3
    name = sent["params"].weight.name
    del got
    assert not os.path.exists("/dev/shm/" + name)  # opened as owner


def test_without_jax_a_registered_node_is_a_leaf():
    assert "jax" not in sys.modules
    params = Params(np.arange(6, dtype=np.float32), np.ones(3), "dense")
    assert copy_to_shm({"params": params})["params"] is params


def test_grain_shm_never_imports_jax(tmp_path):
    # An importable jax (this stand-in) must stay unimported.
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    code = (
        "import sys, numpy as np, grain_shm\n"
        "grain_shm.unlink_shm(grain_shm.copy_to_shm({'a': np.ones(4)}))\n"
        "assert 'jax' not in sys.modules, 'grain_shm imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


def test_prefetch_batches_keep_every_key_its_own_column_with_jax_imported(fake_jax):
    """jax.tree_util walks a dict by sorted key, the batcher by insertion
    order: rebuilding a batch through jax would give "label" the images."""
    from grain_shm import prefetch

    def element(i):
        return {"label": i, "image": np.full((2, 2), 100 + i, np.uint8)}

    (batch,) = list(prefetch(range(3), element, batch_size=3))
    assert list(batch["label"]) == [0, 1, 2]
    assert batch["image"].shape == (3, 2, 2) and int(batch["image"][2, 0, 0]) == 102

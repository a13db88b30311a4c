"""The pool by default where names never surface (issue 18).

A prefetcher's workers take their arrays from the pool unless recycle=False
or GRAIN_SHM_RECYCLE=0, whatever the consumer's own setting (plain
SharedMemoryArrays keep fresh segments); Grain's pipelines under
patch_grain() pool theirs too. Each case runs in a child interpreter with
GRAIN_SHM_RECYCLE as the case says (unset: removed before grain_shm is
imported, so the children inherit that too).
"""

import json
import os
import sysconfig

import pytest
from conftest import run_python

CHILD = """
import json, os, sys
setting = sys.argv[1]
if setting == "unset":
    os.environ.pop("GRAIN_SHM_RECYCLE", None)
else:
    os.environ["GRAIN_SHM_RECYCLE"] = setting
import warnings
warnings.simplefilter("error")  # a warning fails the child
import numpy as np
from grain_shm import MultiprocessingOptions, SharedMemoryArray, _shm, prefetch

def row(i):
    return np.full(256, i, np.float32)

if __name__ == "__main__":
    chosen = {"default": {}, "off": {"recycle": False}, "on": {"recycle": True}}[sys.argv[2]]
    blocks = []
    for k, batch in enumerate(prefetch(range(32), row, batch_size=8, **chosen,
                                       options=MultiprocessingOptions(2, 2))):
        assert batch[:, 0].tolist() == list(range(8 * k, 8 * k + 8))
        blocks.append(batch.metadata.block is not None)
    mine = SharedMemoryArray((4,), np.float32)
    mine.unlink_on_del()
    plain = mine.metadata.block is not None
    print(json.dumps({"blocks": blocks, "plain": plain,
                      "consumer_pools": _shm.pool_stats()["max_bytes"] > 0}))
"""


def _run(setting, recycle="default"):
    proc = run_python(CHILD, args=(setting, recycle), timeout=90)
    assert proc.stderr == "", proc.stderr  # no warning
    return json.loads(proc.stdout)


def test_a_prefetchers_batches_are_pool_blocks_by_default():
    got = _run("unset")
    assert got["blocks"] == [True] * 4
    assert got == {"blocks": [True] * 4, "plain": False, "consumer_pools": False}


def test_recycle_false_gives_fresh_segments():
    assert _run("unset", "off")["blocks"] == [False] * 4


def test_grain_shm_recycle_0_gives_fresh_segments_and_no_warning():
    assert _run("0") == {"blocks": [False] * 4, "plain": False, "consumer_pools": False}
    assert _run("0", "on")["blocks"] == [True] * 4  # the argument says more than the variable


def test_grain_shm_recycle_1_pools_everything():
    assert _run("1") == {"blocks": [True] * 4, "plain": True, "consumer_pools": True}


# -- Grain's pipelines under the patch

GRAIN = """
import json, os, sys
setting = sys.argv[1]
if setting == "unset":
    os.environ.pop("GRAIN_SHM_RECYCLE", None)
else:
    os.environ["GRAIN_SHM_RECYCLE"] = setting
import numpy as np
import grain_shm
grain_shm.patch_grain()   # and GRAIN_SHM_PATCH_GRAIN=1 for Grain's workers (grain_shm.pth)
import grain

def element(i):
    return {"x": np.full(1024, i, np.float32)}

if __name__ == "__main__":
    ds = grain.MapDataset.range(8).map(element).to_iter_dataset().batch(2)
    blocks, seen = [], []
    for batch in ds.mp_prefetch(grain_shm.MultiprocessingOptions(num_workers=2)):
        x = batch["x"]
        assert isinstance(x, grain_shm.SharedMemoryArray), type(x)
        seen.extend(int(v) for v in x[:, 0])
        blocks.append(x.metadata.block is not None)
    assert sorted(seen) == list(range(8)), seen
    print(json.dumps(blocks))
"""


def _pth_installed():
    """grain_shm.pth patches Grain's spawned workers; an editable install
    has none (HELPERS: run these with `pip install` of the worktree)."""
    return os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "grain_shm.pth"))


@pytest.mark.skipif(not _pth_installed(), reason="needs grain_shm.pth: a non-editable install")
@pytest.mark.parametrize("setting, pooled", [("unset", True), ("0", False)])
def test_grains_pipeline_under_the_patch_pools_by_default(setting, pooled):
    pytest.importorskip("grain", reason="Grain's own pipeline: pip install 'grain_shm[compare]'")
    proc = run_python(GRAIN, args=(setting,), timeout=120)
    assert json.loads(proc.stdout.splitlines()[-1]) == [pooled] * 4
    assert "GRAIN_SHM_RECYCLE" not in proc.stderr, proc.stderr  # no warning about it


def test_doctor_says_what_pools_by_default_and_how_to_turn_it_off():
    import subprocess
    import sys

    def doctor(**env):
        full = {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_RECYCLE"}
        return subprocess.run([sys.executable, "-m", "grain_shm", "doctor"], env={**full, **env},
                              capture_output=True, text=True, timeout=60).stdout

    unset = " ".join(doctor().split())
    assert "on by default in prefetch()'s workers and in Grain's pipelines under patch_grain()" \
        in unset
    assert "Off everywhere: GRAIN_SHM_RECYCLE=0, or prefetch(..., recycle=False)" in unset
    off = " ".join(doctor(GRAIN_SHM_RECYCLE="0").split())
    assert "GRAIN_SHM_RECYCLE='0': off, in the workers too" in off

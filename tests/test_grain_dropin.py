"""Drop-in proof: Grain's own pipelines run on grain_shm.

Grain's `mp_prefetch` (dataset API) and `DataLoader` run with 2 worker
processes on grain_shm the way users run them: GRAIN_SHM_PATCH_GRAIN=1 in
the environment, which the grain_shm.pth file installed in site-packages
honours at every interpreter's start-up (grain_shm.patch_grain()), Grain's
spawned workers included. Each run happens in a child interpreter (a crash
is reported with its signal, and the patch never reaches this process). The
pipelines are in tests/dropin/pipelines.py.

What is checked, per pipeline:
- the elements, in order, equal those of the same pipeline run with Grain's
  own shared-memory arrays (another child, without the patch), and every
  record arrives exactly once;
- grain_shm carried them: every array the consumer got is a grain_shm
  SharedMemoryArray over a segment named with this test run's grain_shm
  session (so made by patched workers: Grain's would be "psm_..."), opened
  by grain_shm's open_from_shm (so the consumer owns it), and made by 2
  worker processes other than the consumer;
- afterwards /dev/shm holds none of the session's segments, no worker
  process is left, and the child printed no traceback or warning, the
  resource tracker's included (stock Grain's can print one at exit).
"""

import json
import os

import pytest

pytest.importorskip(
    "grain",
    reason="the drop-in proof runs Grain's own pipelines: pip install 'grain_shm[compare]'",
)

import grain_shm.names  # noqa: E402
import grain_shm.session  # noqa: E402
from conftest import run_python, shm_entries  # noqa: E402

DROPIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dropin")
PIPELINES = ("dataset_batch", "dataset_copy", "dataloader")
DRIVER = """
import pipelines

if __name__ == "__main__":
    pipelines.main()
"""
GRAIN_SHM_ARRAY = "grain_shm.array.SharedMemoryArray"
GRAIN_ARRAY = "grain._src.python.ipc.shared_memory_array.SharedMemoryArray"
NUM_RECORDS, NUM_WORKERS = 22, 2  # as in dropin/pipelines.py


def _pythonpath(*dirs):
    """PYTHONPATH for a child: `dirs`, the grain_shm this process imported,
    and what this process was given."""
    grain_shm_root = os.path.dirname(os.path.dirname(os.path.abspath(grain_shm.__file__)))
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*dirs, grain_shm_root, *filter(None, [inherited])])


def _alive(pid):
    """Whether `pid` is a process that has not exited (zombies have)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _data(run):
    return [element["data"] for element in run["elements"]]


def _records(run):
    """Record indices of every element, from its "y" leaf (10 * index + 0..3)."""
    indices = []
    for y in (element["data"]["y"]["values"] for element in run["elements"]):
        rows = y if isinstance(y[0], list) else [y]
        indices.extend(row[0] // 10 for row in rows)
    return indices


def _worker_pids(run):
    return {pid for element in run["elements"] for pid in element["pids"]}


@pytest.fixture(scope="module")
def grain_reference(tmp_path_factory):
    """The pipelines' elements with Grain's own shared-memory arrays."""
    out = tmp_path_factory.mktemp("grain_reference") / "report.json"
    run_python(
        DRIVER,
        env={"PYTHONPATH": _pythonpath(DROPIN), "GRAIN_SHM_PATCH_GRAIN": "0"},
        args=(str(out), *PIPELINES),
        timeout=90,
    )
    report = json.loads(out.read_text())
    assert not report["patched"]
    for name, run in report["runs"].items():
        assert run["array_types"] == [GRAIN_ARRAY], name
        assert len(_worker_pids(run)) == NUM_WORKERS, name
        assert sorted(_records(run)) == list(range(NUM_RECORDS)), name
    return report["runs"]


def _run_with_grain_shm(name, out):
    """Run pipeline `name` with grain_shm in place; return the child's report."""
    args = [str(out), name]
    # The child inherits this process's grain_shm session (GRAIN_SHM_SESSION),
    # so its segments are named as this test run's, apart from any other
    # process sharing /dev/shm.
    env = {"PYTHONPATH": _pythonpath(DROPIN), "GRAIN_SHM_PATCH_GRAIN": "1"}
    proc = run_python(DRIVER, env=env, args=args, timeout=90)
    return json.loads(out.read_text()), proc.stderr


@pytest.mark.parametrize("name", PIPELINES)
def test_grain_pipeline_runs_on_grain_shm(name, grain_reference, tmp_path):
    report, stderr = _run_with_grain_shm(name, tmp_path / "report.json")
    assert report["patched"], "grain_shm's names were not in Grain's module"
    run = report["runs"][name]
    assert run["session"] == grain_shm.session.SESSION
    session_prefix = grain_shm.names.segment_prefix(run["session"])

    # The elements: Grain's own, in Grain's order; every record once.
    assert _data(run) == _data(grain_reference[name])
    assert sorted(_records(run)) == list(range(NUM_RECORDS))

    # grain_shm carried them, from the workers to the consumer.
    assert run["array_types"] == [GRAIN_SHM_ARRAY]
    names = run["segment_names"]
    assert len(names) >= len(run["elements"])
    assert len(set(names)) == len(names)
    # Unpatched workers would show here: the consumer's grain_shm would still
    # open their segments, but those are named by the stdlib ("psm_...").
    assert all(n.startswith(session_prefix) for n in names), names
    assert all(run["opened_as_owner"]), "not opened by grain_shm.open_from_shm"
    workers = _worker_pids(run)
    assert len(workers) == NUM_WORKERS and report["consumer_pid"] not in workers

    # Nothing left behind: segments, workers.
    assert run["segments_after_close"] == []
    assert run["children_after_close"] == []
    assert not [e for e in shm_entries() if e.startswith(session_prefix)]
    assert not [pid for pid in workers if _alive(pid)]
    # ...and nothing printed on the way out (Grain's own run prints
    # resource_tracker warnings and ignored exceptions here).
    for noise in ("Traceback", "Exception ignored", "leaked", "resource_tracker"):
        assert noise not in stderr, stderr

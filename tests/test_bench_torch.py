"""The pipeline section's PyTorch DataLoader peer: run where torch is, left
out with a note where it is not, and torch imported by nothing else.

Timings are never checked; only that the cell ran, read every byte (its
checksums passed) and put its figures where the JSON promises.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import run_python

HAVE_TORCH = importlib.util.find_spec("torch") is not None
SUMMARY_KEYS = {"n", "median", "p10", "p90", "min", "max", "mean"}
KiB, MiB = 1 << 10, 1 << 20


def run_bench(tmp_path, *args, env=None):
    path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "grain_shm", "bench", "--quick", "--sections", "pipeline",
         "--markdown", "--json", str(path), *args],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, **(env or {})),
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(path.read_text()), proc.stdout


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install torch==2.13.0 "
                    "takes the CPU build): the DataLoader cell cannot run")
def test_the_dataloader_cell_runs_and_its_figures_are_in_the_json(tmp_path):
    """Both of the DataLoader's ways: batch_size=None for 4 MiB elements,
    batches of 256 by its default collate for 4 KiB ones."""
    doc, stdout = run_bench(tmp_path, "--transports", "torch", "--sizes", "4K,4M")
    assert doc["ok"] and doc["leak_check"]["leaked"] == []
    cells = {(c["transport"], c["sizes"][0]): c for c in doc["cells"]}
    assert cells.keys() == {("torch", 4 * KiB), ("torch", 4 * MiB)}
    for size, batch in ((4 * KiB, 256), (4 * MiB, None)):
        cell = cells["torch", size]
        assert cell["status"] == "ok", cell
        result = cell["result"]
        assert (result["size"], result["batch_size"], result["workers"]) == (size, batch, 2)
        assert result["timed_items"] >= 3
        assert result["elements_per_s"].keys() == result["gbps"].keys() == SUMMARY_KEYS
        assert result["elements_per_s"]["median"] > 0
        assert result["startup_s"] > 0 and 0 <= result["consumer_waiting"] <= 1
    assert "| 4 KiB ×256 | torch |" in stdout and "| 4 MiB | torch |" in stdout
    assert "| × grain | × DataLoader | × Pool.imap |" in stdout
    # The DataLoader's own ratio column: 1.00 on its own rows.
    header = next(line for line in stdout.splitlines() if line.startswith("| element | variant |"))
    column = [name.strip() for name in header.split("|")].index("× DataLoader")
    assert all(line.split("|")[column].strip() == "1.00"
               for line in stdout.splitlines() if line.startswith("| 4") and "| torch |" in line)


def test_without_torch_the_dataloader_is_left_out_with_a_note(tmp_path):
    """Where `import torch` fails (here: a torch package that raises, first
    on the path), the cell is skipped, the run still passes, and the note
    says what to install."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    doc, stdout = run_bench(tmp_path, "--transports", "torch,grain_shm", "--sizes", "4K",
                            env={"PYTHONPATH": path})
    assert doc["ok"]
    statuses = {c["transport"]: c["status"] for c in doc["cells"]}
    assert statuses == {"grain_shm": "ok", "torch": "skipped"}
    (torch_cell,) = [c for c in doc["cells"] if c["transport"] == "torch"]
    assert "torch is not installed (pip install torch" in torch_cell["reason"]
    assert "- torch skipped: torch is not installed" in stdout
    assert "| 4 KiB ×256 | torch | skipped |" in stdout


def test_torch_is_chosen_by_default_and_imported_by_no_one_but_its_cell():
    """`--transports` takes torch and a plain run plans its cells, but
    neither grain_shm nor its bench imports torch (seconds, and GBs with
    CUDA) unless the DataLoader's cell runs, in a process of its own."""
    run_python("""
        import sys
        import grain_shm, grain_shm.bench as bench
        from grain_shm.bench import pipeline, report

        args = bench._parser().parse_args(["--quick"])
        assert "torch" in args.transports
        cells = bench.plan(args)
        assert {c.sizes[0] for c in cells if c.transport == "torch"} == set(pipeline.SIZES)
        assert all(c.section == "pipeline" for c in cells if c.transport == "torch")
        assert "torch" not in sys.modules, "grain_shm imported torch"
    """)

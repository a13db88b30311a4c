"""`python -m grain_shm bench` runs end to end and reports in the documented shape.

Timings are never checked (they depend on the machine); what is checked is
that every section ran (or was skipped with a reason), every figure is where
the JSON promises it, the checksums passed, and /dev/shm was left clean.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SECTIONS = ["ceilings", "transfer", "cfd", "release", "pipeline"]
TRANSPORTS = ["pickle", "stdlib", "grain_shm", "grain_shm-async"]
# The pipeline runs grain_shm's prefetcher (and with the pool) and Pool.imap (pickle).
PIPELINE = ["grain_shm", "grain_shm-recycle", "pickle"]
SUMMARY_KEYS = {"n", "median", "p10", "p90", "min", "max", "mean"}


def run_bench(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "grain_shm", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_bench(
        "--quick", "--sizes", "64K", "--transports", ",".join(TRANSPORTS),
        "--json", str(path), "--markdown",
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(path) as report:
        return json.load(report), proc


def test_run_is_described(quick_run):
    doc, _ = quick_run
    assert doc["schema"] == 1
    assert doc["ok"] is True
    assert doc["argv"][:4] == ["python", "-m", "grain_shm", "bench"]
    assert {"cpu", "cpus", "platform", "memory_bytes", "dev_shm_bytes"} <= doc["machine"].keys()
    assert {"python", "numpy", "grain_shm"} <= doc["versions"].keys()
    assert doc["config"]["sections"] == SECTIONS
    assert doc["config"]["transports"] == TRANSPORTS
    assert doc["config"]["transfer_sizes"] == doc["config"]["micro_sizes"] == [65536]


def test_every_cell_ran_or_says_why_not(quick_run):
    doc, _ = quick_run
    cells = {(c["section"], c["transport"]): c for c in doc["cells"]}
    expected = {("ceilings", None)} | {(s, t) for s in SECTIONS[1:-1] for t in TRANSPORTS}
    expected |= {("pipeline", t) for t in PIPELINE}
    assert cells.keys() == expected
    for key, cell in cells.items():
        if key[1] == "grain_shm-async" and cell["status"] == "skipped":
            assert "enable_async_del" in cell["reason"]
        elif key[1] == "grain_shm-recycle" and cell["status"] == "skipped":
            assert "enable_recycling" in cell["reason"]
        else:
            assert cell["status"] == "ok", cell


def test_figures_are_where_the_json_promises(quick_run):
    doc, _ = quick_run
    for cell in doc["cells"]:
        if cell["status"] != "ok":
            continue
        result = cell["result"]
        if cell["section"] == "transfer":
            assert result["size"] == 65536
            assert result["timed_arrays"] >= 3
            assert result["gbps"].keys() == result["arrays_per_s"].keys() == SUMMARY_KEYS
            assert result["producer_cpu_us"] > 0 and result["consumer_cpu_us"] > 0
        elif cell["section"] == "pipeline":
            assert result["size"] == 65536 and result["batch_size"] == 256
            assert result["timed_items"] >= 3
            assert result["elements_per_s"].keys() == result["gbps"].keys() == SUMMARY_KEYS
            assert result["startup_s"] > 0 and 0 <= result["consumer_waiting"] <= 1
        elif cell["section"] == "ceilings":
            (row,) = result["sizes"]
            for figure in ("memcpy", "first_touch_fill", "fresh_read"):
                assert row[figure]["gbps"] > 0
                assert row[figure]["us"].keys() == SUMMARY_KEYS
        else:
            (row,) = result["sizes"]
            assert row["size"] == 65536
            assert row["us"].keys() == SUMMARY_KEYS


def test_no_leak_and_tables_printed(quick_run):
    doc, proc = quick_run
    assert doc["leak_check"]["ok"] is True
    assert doc["leak_check"]["leaked"] == []
    assert "| size | transport | GB/s |" in proc.stdout
    assert "Leak check: /dev/shm holds nothing new." in proc.stdout
    assert "| element | variant | elements/s |" in proc.stdout
    assert "[cell 16/16]" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--transports", "carrier-pigeon"], "unknown carrier-pigeon"),
        (["--sizes", "12"], "multiple of 8 bytes"),
        (["--sections", ""], "choose from"),
        (["--json", "/no/such/dir/bench.json"], "no directory /no/such/dir"),
    ],
)
def test_bad_arguments_exit_2_before_running(args, message):
    proc = run_bench(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "[cell" not in proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed"
)
def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    proc = run_bench("--plot", str(tmp_path / "bench.png"), timeout=60)
    assert proc.returncode == 2
    assert "pip install 'grain_shm[plot]'" in proc.stderr

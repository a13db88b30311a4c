"""`python -m grain_shm bench` runs end to end and reports in the documented shape.

Timings are never checked (they depend on the machine); what is checked is
that every section ran (or was skipped with a reason), every figure is where
the JSON promises it, the checksums passed, and /dev/shm was left clean.
"""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

import grain_shm
from conftest import run_python

SECTIONS = ["ceilings", "transfer", "cfd", "release", "grain-pipeline", "pipeline"]
HAVE_GRAIN = importlib.util.find_spec("grain") is not None
# The peers of the `compare` extra.
PEERS = {"faster-fifo": "faster_fifo", "iceoryx2": "iceoryx2"}
HAVE = {name: importlib.util.find_spec(module) is not None for name, module in PEERS.items()}
# The handoff ring relies on x86's store order; elsewhere its cell is skipped.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
TRANSPORTS = ["pickle", "stdlib", "grain_shm", "grain_shm-async", "grain_shm-recycle",
              "grain_shm-recycle-async", "grain_shm-queue", "faster-fifo", "iceoryx2"]
# Transfer only: each is another queue for arrays the others already make.
TRANSFER_ONLY = {"grain_shm-queue", "faster-fifo", "iceoryx2"}
QUEUES = ["multiprocessing.Queue", "faster-fifo", "iceoryx2", "grain_shm.Queue"]
POOLED = {"grain_shm-recycle", "grain_shm-recycle-async", "grain_shm-queue"}
# The pipeline runs grain_shm's prefetcher (and with the pool) and Pool.imap (pickle).
# grain_shm-recycle-pipe, the prefetcher on its old channel, runs beside grain_shm-recycle.
PIPELINE = ["grain_shm", "grain_shm-recycle", "grain_shm-recycle-pipe", "pickle"]
SUMMARY_KEYS = {"n", "median", "p10", "p90", "min", "max", "mean"}


SMOKE_TEST = "--verbose prints every table."  # the end of --quick's last line


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
    expected = {("ceilings", None), ("ceilings", "cross-process"), ("grain-pipeline", "grain_shm"),
                ("grain-pipeline", "grain_shm-recycle")}
    expected |= {("ceilings", f"queue:{kind}") for kind in QUEUES}
    expected |= {("transfer", t) for t in TRANSPORTS}
    expected |= {(s, t) for s in SECTIONS[2:4] for t in TRANSPORTS if t not in TRANSFER_ONLY}
    if "pipeline" not in doc["config"]["left_out_sizes"]:  # 256 x 64 KiB batches: 128 MiB
        expected |= {("pipeline", t) for t in PIPELINE}
    assert cells.keys() == expected
    for key, cell in cells.items():
        if key[0] == "grain-pipeline" and not HAVE_GRAIN:
            assert cell["status"] == "skipped" and "grain is not installed" in cell["reason"]
        elif key == ("ceilings", "cross-process") and not X86:
            assert cell["status"] == "skipped" and "TSO" in cell["reason"]
        elif str(key[1]).removeprefix("queue:") in PEERS and not HAVE[key[1].removeprefix("queue:")]:
            assert cell["status"] == "skipped" and "pip install 'grain_shm[compare]'" in cell["reason"]
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
            assert_pool_figure(cell, result["pool_arena_bytes"])
        elif cell["section"] == "grain-pipeline":
            assert result["size"] == 65536 and result["runs"] >= 1
            assert result["steady_elements_per_s"] > 0
            assert result["end_to_end_elements_per_s"] > 0
        elif cell["section"] == "pipeline":
            assert result["size"] == 65536 and result["batch_size"] == 256
            assert result["timed_items"] >= 3
            assert result["elements_per_s"].keys() == result["gbps"].keys() == SUMMARY_KEYS
            assert result["startup_s"] > 0 and 0 <= result["consumer_waiting"] <= 1
            assert result["consumer_cpu_us_per_item"] > 0
        elif cell["section"] == "ceilings" and cell["transport"] == "cross-process":
            assert min(result["ring_sizes"]) >= 2
            (row,) = result["sizes"]
            assert row["size"] == 65536
            by_ring = row["handoff"]["gbps_by_ring"]
            assert sorted(map(int, by_ring)) == sorted(result["ring_sizes"])
            # The ceiling is the best ring's best segment.
            assert row["handoff"]["gbps"]["max"] == max(by_ring.values())
            assert by_ring[str(row["handoff"]["ring_blocks"])] == max(by_ring.values())
            assert row["handoff"]["timed_blocks"] >= 3
            assert row["handoff"]["gbps"].keys() == row["handoff"]["blocks_per_s"].keys()
            assert row["handoff"]["gbps"].keys() == SUMMARY_KEYS
            assert row["handoff"]["gbps"]["median"] > 0
        elif cell["section"] == "ceilings" and str(cell["transport"]).startswith("queue:"):
            assert result["kind"] == cell["transport"][len("queue:"):]
            assert result["depth"] == doc["config"]["transfer_queue_depth"]
            assert result["timed_messages"] >= 3
            assert result["messages_per_s"].keys() == result["latency_us"].keys() == SUMMARY_KEYS
            assert result["messages_per_s"]["median"] > 0
            assert result["latency_us"]["n"] >= 3 and result["latency_us"]["median"] > 0
            assert result["latency_p99_us"] >= result["latency_us"]["median"]
        elif cell["section"] == "ceilings":
            (row,) = result["sizes"]
            for figure in ("memcpy", "first_touch_fill", "fresh_read"):
                assert row[figure]["best_gbps"] >= row[figure]["gbps"] > 0
                assert row[figure]["us"].keys() == SUMMARY_KEYS
        else:
            (row,) = result["sizes"]
            assert row["size"] == 65536
            assert row["us"].keys() == SUMMARY_KEYS
            assert_pool_figure(cell, row["pool_arena_bytes"])


def assert_pool_figure(cell, arena_bytes):
    """The pool's resident memory beside the figures: an arena at least
    where the pool was on, nothing to report where it was not."""
    if cell["transport"] in POOLED:
        assert arena_bytes >= 65536, cell
    else:
        assert arena_bytes is None, cell


def test_no_leak_and_tables_printed(quick_run):
    doc, proc = quick_run
    assert doc["leak_check"]["ok"] is True
    assert doc["leak_check"]["leaked"] == []
    assert "| size | transport | GB/s |" in proc.stdout
    assert "Leak check: /dev/shm holds nothing new." in proc.stdout
    assert "| 64 KiB | grain_shm-recycle |" in proc.stdout
    assert "pool MiB" in proc.stdout
    if "pipeline" in doc["config"]["left_out_sizes"]:  # a container's 64 MiB /dev/shm
        assert "[cell 29/29]" in proc.stderr and "Left out for want of room" in proc.stdout
    else:
        assert "[cell 33/33]" in proc.stderr
        assert "| element | variant | elements/s |" in proc.stdout


def test_the_prefetcher_runs_beside_its_old_channel_with_the_consumers_cpu(quick_run):
    """The pipeline shows the prefetcher on its Queue (grain_shm-recycle)
    beside its old pipe channel, each with the consumer's CPU per item."""
    doc, proc = quick_run
    if "pipeline" in doc["config"]["left_out_sizes"]:
        pytest.skip("this /dev/shm has no room for the pipeline's batches")
    cells = {c["transport"]: c for c in doc["cells"] if c["section"] == "pipeline"}
    for variant in ("grain_shm-recycle", "grain_shm-recycle-pipe"):
        assert cells[variant]["status"] == "ok", cells[variant]
        assert cells[variant]["result"]["consumer_cpu_us_per_item"] > 0
    assert "| consumer µs |" in proc.stdout
    assert "| 64 KiB ×256 | grain_shm-recycle-pipe |" in proc.stdout


def test_summary_is_last_and_in_the_json(quick_run):
    """The run ends with its headline: per size, the fastest grain_shm
    transport against pickle and the fastest peer, each ratio with its
    spread, then what quick figures are worth; the JSON holds the same."""
    doc, proc = quick_run
    (headline,) = doc["summary"]
    assert headline.keys() == {"size", "transport", "arrays_per_s", "vs_pickle", "vs_best_peer"}
    assert headline["size"] == 65536 and headline["transport"].startswith("grain_shm")
    transfer = {c["transport"]: c for c in doc["cells"]
                if c["section"] == "transfer" and c["status"] == "ok"}
    ours = {t: c for t, c in transfer.items() if t.startswith("grain_shm")}
    peers = {t: c for t, c in transfer.items() if not t.startswith("grain_shm") and t != "pickle"}
    def median(cell):
        return cell["result"]["arrays_per_s"]["median"]
    assert headline["transport"] == max(ours, key=lambda t: median(ours[t]))
    assert headline["arrays_per_s"] == median(ours[headline["transport"]])
    assert headline["vs_pickle"]["of"] == "pickle"
    assert headline["vs_best_peer"]["of"] == max(peers, key=lambda t: median(peers[t]))
    for ratio in (headline["vs_pickle"], headline["vs_best_peer"]):
        assert ratio.keys() == {"of", "median", "low", "high"}
        assert ratio["low"] <= ratio["median"] <= ratio["high"]
    # The fixture prints markdown: the title bold, a bullet per size.
    lines = [line.removeprefix("- ") for line in proc.stdout.rstrip().splitlines() if line]
    assert lines[-3].startswith("**Summary: arrays/s from one process to another (queue 4 deep)")
    assert lines[-2].split()[:3] == ["64", "KiB", headline["transport"]]
    assert "× pickle (" in lines[-2] and f"× {headline['vs_best_peer']['of']} (" in lines[-2]
    assert lines[-1].startswith("Quick figures are a smoke test")
    assert "`python -m grain_shm bench`" in lines[-1] and lines[-1].endswith(SMOKE_TEST)


def test_quick_prints_its_summary_alone_unless_verbose(tmp_path):
    """bench --quick shows a newcomer the summary, not a wall of noisy tables;
    --verbose prints the tables too (and --json holds them either way)."""
    common = ["--quick", "--sections", "transfer", "--sizes", "4K", "--transports", "pickle,grain_shm"]
    short = run_bench(*common, "--json", str(tmp_path / "short.json"))
    verbose = run_bench(*common, "--verbose")
    for proc in (short, verbose):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.rstrip().endswith(SMOKE_TEST)
        assert "Summary: arrays/s" in proc.stdout
    assert "producer CPU µs" not in short.stdout and "producer CPU µs" in verbose.stdout
    assert len(short.stdout.splitlines()) < 12
    doc = json.loads((tmp_path / "short.json").read_text())
    assert {c["transport"] for c in doc["cells"]} == {"pickle", "grain_shm"}
    assert doc["summary"][0]["vs_best_peer"] is None  # no peer chosen


def test_a_missing_peer_or_queue_is_left_out_with_a_note(monkeypatch):
    """A peer whose package is not installed, and grain_shm-queue while
    grain_shm has no Queue, are skipped with a note that says why (and what
    to install), once for the transport and its queue's ceiling."""
    from grain_shm.bench import report, transports

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "faster_fifo" else real(name, *a))
    want = "faster_fifo is not installed (pip install 'grain_shm[compare]')"
    assert transports.missing("faster-fifo") == transports.missing("queue:faster-fifo") == want
    assert transports.missing("pickle") is transports.missing("queue:multiprocessing.Queue") is None
    assert transports.missing("grain_shm-queue") is transports.missing("queue:grain_shm.Queue") is None
    cells = [{"section": section, "transport": transport, "sizes": sizes, "status": "skipped",
              "reason": transports.missing(transport)}
             for section, transport, sizes in [("transfer", "faster-fifo", [4096]),
                                               ("transfer", "faster-fifo", [65536]),
                                               ("ceilings", "queue:faster-fifo", [])]]
    doc = {"cells": cells, "config": {"left_out": None, "sections": []},
           "leak_check": {"ok": True, "dir": "/dev/shm", "leaked": []}}
    assert report._notes(doc) == [f"faster-fifo, queue:faster-fifo skipped: {want}",
                                  "Leak check: /dev/shm holds nothing new."]


def test_grain_shm_queue_moves_arrays_and_has_its_ceiling():
    """grain_shm-queue: the pool's arrays through grain_shm.Queue, every byte
    checked; and that queue's own rate and latency."""
    run_python("""
        from grain_shm.bench import SECTIONS, runner, transports

        if __name__ == "__main__":
            assert transports.missing("grain_shm-queue") is None
            transfer = runner.run_cell(runner.Cell("transfer", "grain_shm-queue", (65536,),
                                                   0.05, 3, 4), SECTIONS["transfer"])
            assert transfer["status"] == "ok", transfer
            assert transfer["result"]["arrays"] >= 5
            assert transfer["result"]["pool_arena_bytes"] > 0
            ceiling = runner.run_cell(runner.Cell("ceilings", "queue:grain_shm.Queue", (),
                                                  0.005, 3, 4), SECTIONS["ceilings"])
            assert ceiling["status"] == "ok", ceiling
            assert ceiling["result"]["kind"] == "grain_shm.Queue"
    """)


@pytest.mark.parametrize("peer", ["faster-fifo", "iceoryx2"])
def test_a_peer_moves_every_size_it_is_given(peer, tmp_path):
    """Each peer carries arrays from 4 KiB to 1 MiB, checked byte for byte by
    the consumer, bounded as deep as the others, and leaves /dev/shm clean
    (iceoryx2's management files included)."""
    if not HAVE[peer]:
        pytest.skip(f"{PEERS[peer]} is not installed")
    path = tmp_path / "bench.json"
    proc = run_bench("--quick", "--sections", "ceilings,transfer", "--sizes", "4K,1M",
                     "--transports", peer, "--queue-depth", "2", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(path.read_text())
    assert doc["leak_check"]["ok"]
    cells = {(c["transport"], tuple(c["sizes"])): c for c in doc["cells"]}
    for size in (4096, 1 << 20):
        cell = cells[peer, (size,)]
        assert cell["status"] == "ok", cell
        assert cell["result"]["arrays"] >= 5 and cell["queue_depth"] == 2
    assert cells[f"queue:{peer}", ()]["status"] == "ok"
    assert cells["queue:multiprocessing.Queue", ()]["status"] == "ok"


def test_a_share_above_a_ceiling_is_marked_and_explained():
    """A ceiling is the best of its repetitions; should a transport still
    exceed it (a --quick run's three repetitions, a busy machine), the table
    says so instead of printing 126% as if the machine had been beaten."""
    from grain_shm.bench import report

    def summary(median):
        return {"n": 3, "median": median, "p10": median, "p90": median, "min": median,
                "max": median, "mean": median}

    def ceiling(gbps):
        return {"gbps": gbps, "best_gbps": gbps, "us": summary(4096 / gbps / 1e3)}

    transfer = {"size": 4096, "gbps": summary(1.5), "arrays_per_s": summary(366_211.0),
                "producer_cpu_us": 1.0, "consumer_cpu_us": 1.0, "pool_arena_bytes": None}
    row = {"size": 4096, "memcpy": ceiling(10.0), "fresh_read": ceiling(3.0),
           "first_touch_fill": {**ceiling(1.0), "method": "fault_fill"}}
    doc = {
        "config": {"sections": ["ceilings", "transfer"], "transports": ["grain_shm"],
                   "transfer_sizes": [4096], "left_out": None, "transfer_queue_depth": 4},
        "cells": [{"section": "ceilings", "transport": None, "sizes": [4096], "status": "ok",
                   "result": {"sizes": [row]}},
                  {"section": "transfer", "transport": "grain_shm", "sizes": [4096],
                   "status": "ok", "result": transfer}],
        "leak_check": {"ok": True, "dir": "/dev/shm", "leaked": []},
    }
    headers, (cells,) = report.transfer_table(doc)
    assert cells[headers.index("of ceiling")] == "150%†"
    assert report.OVER_NOTE in report._notes(doc)
    assert report.OVER_NOTE not in report._notes(doc, tables=False)  # no † printed to explain
    transfer["gbps"] = summary(0.5)
    headers, (cells,) = report.transfer_table(doc)
    assert cells[headers.index("of ceiling")] == "50%"
    assert report.OVER_NOTE not in report._notes(doc)


def markdown_table(stdout, *headers):
    """The rows, as {header: cell}, of the markdown table whose headers start so."""
    def cells(line):
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    lines = stdout.splitlines()
    start = "| " + " | ".join(headers) + " |"
    (at,) = [i for i, line in enumerate(lines) if line.startswith(start)]
    rows = []
    for line in lines[at + 2:]:  # past the |---| line
        if not line.startswith("|"):
            break
        rows.append(dict(zip(cells(lines[at]), cells(line))))
    return rows


@pytest.mark.skipif(not X86, reason="the handoff ceiling runs on x86 only")
def test_ceilings_table_shows_the_cross_process_ceilings(quick_run):
    doc, proc = quick_run
    (cells,) = markdown_table(proc.stdout, "size", "memcpy GB/s")
    assert cells["size"] == "64 KiB"
    assert float(cells["handoff GB/s"]) > 0
    assert "-" in cells["handoff p10-p90"]
    assert "Ceilings of this machine: the best of the repetitions" in proc.stdout


def test_queues_table_has_each_queue_rate_and_latency(quick_run):
    doc, proc = quick_run
    rows = {row["queue"]: row for row in markdown_table(proc.stdout, "queue", "messages/s")}
    assert list(rows) == QUEUES
    for kind, row in rows.items():
        (cell,) = [c for c in doc["cells"] if c["transport"] == f"queue:{kind}"]
        if cell["status"] != "ok":
            assert row["messages/s"] == "skipped"
            continue
        result = cell["result"]
        assert row["messages/s"] == f"{result['messages_per_s']['max']:,.0f}"
        assert row["median"] == f"{result['messages_per_s']['median']:,.0f}"
        assert float(row["latency p50 µs"].replace(",", "")) > 0
        assert float(row["latency p99 µs"].replace(",", "")) > 0


@pytest.mark.skipif(not X86, reason="the handoff ceiling runs on x86 only")
def test_pool_of_ceiling_is_of_the_handoff_or_the_queue(quick_run):
    """The pooled transports' "of ceiling" is their share of the lower of
    the cross-process bounds (never of memcpy in one thread); the fresh
    segments' stays that of first-touch fill or fresh-mapping read."""
    doc, proc = quick_run
    (cross,) = [c for c in doc["cells"] if c["transport"] == "cross-process"]
    (row,) = cross["result"]["sizes"]
    (queue,) = [c for c in doc["cells"] if c["transport"] == "queue:multiprocessing.Queue"]
    by_queue = queue["result"]["messages_per_s"]["max"] * 65536 / 1e9
    bound = min(row["handoff"]["gbps"]["max"], by_queue)
    (one,) = [c for c in doc["cells"] if c["section"] == "ceilings" and c["transport"] is None]
    (single,) = one["result"]["sizes"]
    fresh_bound = min(single["first_touch_fill"]["best_gbps"], single["fresh_read"]["best_gbps"])
    table = {row["transport"]: row for row in markdown_table(proc.stdout, "size", "transport")}
    assert "of the lower of the handoff and its queue's best rate × size" in proc.stdout
    for transport, want in [("grain_shm-recycle", bound), ("grain_shm-recycle-async", bound),
                            ("grain_shm", fresh_bound)]:
        (cell,) = [c for c in doc["cells"]
                   if (c["section"], c["transport"]) == ("transfer", transport)]
        assert table[transport]["of ceiling"] == f"{cell['result']['gbps']['median'] / want:.0%}"


def test_fresh_transports_stay_fresh_under_GRAIN_SHM_RECYCLE(tmp_path):
    """grain_shm and grain_shm-async measure fresh segments even where the
    environment turns the pool on for everything else."""
    path = tmp_path / "bench.json"
    env = dict(os.environ, GRAIN_SHM_RECYCLE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "grain_shm", "bench", "--quick", "--sizes", "4K",
         "--sections", "cfd", "--transports", "grain_shm,grain_shm-recycle", "--json", str(path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {c["transport"]: c["result"]["sizes"][0] for c in json.load(open(path))["cells"]}
    assert rows["grain_shm"]["pool_arena_bytes"] is None
    assert rows["grain_shm-recycle"]["pool_arena_bytes"] > 0


def test_error_clean_up_unlinks_one_pooled_array_not_its_arena():
    """The producer's clean-up after a failure removes each array it sent:
    for a pool block that is the block, never the arena its name shares."""
    run_python("""
        import os
        from grain_shm import SharedMemoryArray, _shm
        from grain_shm.bench import transports

        transport = transports.get("grain_shm-recycle")
        sent = [transport.create(4096, owner=False) for _ in range(2)]
        references = [transport.reference(held) for held in sent]
        assert references[0].name == references[1].name  # one arena
        sent[1].array[:] = 7
        for held in sent:  # sent, never opened: linked, unmapped
            transport.release(held)
        transport.unlink(references[0])
        try:
            SharedMemoryArray.from_metadata(references[0])
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("the unlinked block still opens")
        assert os.path.exists("/dev/shm/" + references[0].name)  # the arena stays
        assert _shm.pool_stats()["blocks_in_use"] == 1
        other = SharedMemoryArray.from_metadata(references[1])
        assert (other == 7).all()
        del other
        transport.unlink(references[1])
        assert _shm.pool_stats()["blocks_in_use"] == 0
    """)


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


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_leak_check_blames_the_run_only_for_what_no_one_else_holds(tmp_path):
    """/dev/shm may be shared: another program's entry (mapped by a live
    process, or a grain_shm name of another session) is not this run's leak;
    an entry nobody holds is."""
    from grain_shm.bench import leaks

    stem = f"grain_shm_bench_test{os.getpid()}"
    held, dropped, foreign = (
        os.path.join("/dev/shm", name)
        for name in (f"{stem}_held", f"{stem}_dropped", "gs0000000000000_leakcheck000")
    )
    watch = leaks.Watch()
    for path in (held, dropped, foreign):
        with open(path, "wb") as f:
            f.truncate(4096)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap, os, sys\n"
         f"fd = os.open({held!r}, os.O_RDWR); m = mmap.mmap(fd, 4096); os.close(fd)\n"
         "print('mapped', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "mapped\n"
        watch.after("a cell")
        verdict = watch.result(settle=0.0)
        assert verdict["leaked"] == [{"name": os.path.basename(dropped), "after_cell": "a cell"}]
        assert verdict["ok"] is False
    finally:
        holder.communicate("")
        for path in (held, dropped, foreign):
            if os.path.exists(path):  # another user's `gc` may take the foreign one
                os.unlink(path)


def test_leak_check_waits_longer_for_a_semaphore_than_for_a_segment(tmp_path):
    """On a busy machine other programs' multiprocessing semaphores linger
    unheld for seconds before their owners remove them: the check waits
    for those, and still blames one that stays."""
    import threading

    from grain_shm.bench import leaks

    stem = f"/dev/shm/{leaks.SEMAPHORE_PREFIX}grain_shm_bench_test{os.getpid()}"
    going, staying = f"{stem}_going", f"{stem}_staying"
    watch = leaks.Watch()
    for path in (going, staying):
        open(path, "wb").close()
    remover = threading.Timer(0.5, os.unlink, (going,))
    try:
        watch.after("a cell")
        remover.start()
        verdict = watch.result(settle=0.0, semaphore_settle=2.0)
        assert verdict["leaked"] == [{"name": os.path.basename(staying), "after_cell": "a cell"}]
    finally:
        remover.join()
        for path in (going, staying):
            if os.path.exists(path):
                os.unlink(path)


def _unshare_works():
    import shutil

    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --mount` and tmpfs mounts (root)")
def test_a_container_sized_dev_shm_leaves_out_the_sizes_without_room(tmp_path):
    """Docker's default /dev/shm is 64 MiB: the README's main job must still run
    there, leaving out (and saying so) the sizes whose arrays in flight do not
    fit, instead of dying of SIGBUS and ENOSPC half-way with segments left."""
    path = tmp_path / "bench.json"
    script = ('mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -m grain_shm bench '
              f'--quick --sections ceilings,transfer --transports pickle,grain_shm,'
              f'grain_shm-recycle --sizes 64K,16M --json {path} && ls -A /dev/shm')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           sys.executable], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "left out for want of room in /dev/shm (64 MiB free" in proc.stderr
    assert "ceilings 16 MiB; transfer 16 MiB" in proc.stderr
    assert "Left out for want of room" in proc.stdout
    assert "Leak check: /dev/shm holds nothing new." in proc.stdout
    assert proc.stdout.rstrip().endswith(SMOKE_TEST)  # and `ls -A` printed nothing
    doc = json.loads(path.read_text())
    assert doc["ok"]
    assert doc["config"]["left_out_sizes"] == {"ceilings": [16 << 20], "transfer": [16 << 20]}
    assert doc["config"]["shm_free_bytes"] == 64 << 20
    cells = doc["cells"]
    assert all(c["status"] == "ok" and c["sizes"] == [65536] for c in cells
               if c["section"] == "transfer")
    assert {c["transport"] for c in cells if c["section"] == "transfer"} == {
        "pickle", "grain_shm", "grain_shm-recycle"}


def test_a_cell_whose_set_up_fails_is_an_error_not_the_end_of_the_run():
    """Queues and events are semaphores in /dev/shm: when it is full, creating
    them fails; that cell is reported failed and the other cells still run."""
    import errno

    from grain_shm.bench import runner

    def no_room(cell, ctx):
        raise OSError(errno.ENOSPC, "No space left on device")

    section = runner.Section(name="full", processes=no_room, summarize=lambda c, o: {})
    record = runner.run_cell(runner.Cell("full", None, (64,), 0.0, 1), section)
    assert record["status"] == "error" and "No space left on device" in record["error"]
    assert record["elapsed_s"] >= 0


def test_queue_depth_is_the_transfers_and_its_ceilings(tmp_path):
    path = tmp_path / "bench.json"
    proc = run_bench("--quick", "--sections", "ceilings,transfer", "--sizes", "64K",
                     "--transports", "pickle,grain_shm-recycle", "--queue-depth", "2",
                     "--json", str(path), "--verbose")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(path.read_text())
    assert doc["config"]["transfer_queue_depth"] == 2
    assert "queue (2 deep: multiprocessing.Queue" in proc.stdout
    for cell in doc["cells"]:
        if cell["section"] == "transfer" or cell["section"] == "ceilings" and cell["transport"]:
            assert cell["queue_depth"] == 2
    (queue,) = [c for c in doc["cells"] if c["transport"] == "queue:multiprocessing.Queue"]
    assert queue["result"]["depth"] == 2
    if X86:
        (cross,) = [c for c in doc["cells"] if c["transport"] == "cross-process"]
        assert cross["result"]["ring_sizes"] == [2, 4]


@pytest.mark.parametrize("depth", ["0", "1025", "two"])
def test_a_queue_depth_out_of_range_is_refused(depth):
    proc = run_bench("--queue-depth", depth)
    assert proc.returncode == 2 and "queue depth" in proc.stderr

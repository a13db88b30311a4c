"""Fixed costs of grain_shm: its import, its first array, and a sweep.

- import_ms: what `import grain_shm` adds once numpy is imported, from
  `python -X importtime -c "import numpy; import grain_shm"` (the grain_shm
  line's cumulative time), in fresh interpreters;
- first_array_ms, second_array_ms, first_minus_second_ms: SharedMemoryArray
  creation in a fresh interpreter that roots its own session, so the first
  one joins the session and starts its reaper;
- sweep_after_sigkill_ms: how long after SIGKILL of a root that made 10
  segments the last of them is gone (the reaper's doing).

Each figure is the median over --runs fresh interpreters (and min/max).
Targets (issue 11): import <= 10 ms beyond numpy; first array <= 2 ms more
than the second; sweep within 1 s.

    python benchmarks/fixed_costs.py [--runs N] [--tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

FIRST_SECOND = """
import time
import numpy as np
from grain_shm import SharedMemoryArray
t0 = time.perf_counter(); a = SharedMemoryArray((16,), np.float32)
t1 = time.perf_counter(); b = SharedMemoryArray((16,), np.float32)
t2 = time.perf_counter()
a.unlink_on_del(); b.unlink_on_del()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3)
"""

ROOT = """
import sys
import numpy as np
from grain_shm import SharedMemoryArray
arrays = [SharedMemoryArray((1024,), np.uint8) for _ in range(10)]
print(" ".join(a.metadata.name for a in arrays), flush=True)
sys.stdin.read()
"""


def _env() -> dict[str, str]:
    """A fresh session per interpreter: no inherited GRAIN_SHM_SESSION."""
    return {k: v for k, v in os.environ.items() if k != "GRAIN_SHM_SESSION"}


def import_ms() -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import numpy; import grain_shm"],
        capture_output=True, text=True, check=True, env=_env(),
    ).stderr
    line = next(l for l in out.splitlines() if re.search(r"\|\s*grain_shm$", l))
    return int(line.split("|")[1]) / 1e3


def first_second_ms() -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", FIRST_SECOND], capture_output=True,
                         text=True, check=True, env=_env()).stdout
    first, second = map(float, out.split())
    return first, second


def sweep_ms() -> float:
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert root.stdout is not None
    names = root.stdout.readline().split()
    time.sleep(0.2)  # the reaper is up
    os.kill(root.pid, signal.SIGKILL)
    killed = time.perf_counter()
    root.wait()
    paths = [os.path.join("/dev/shm", n) for n in names]
    while any(os.path.exists(p) for p in paths):
        if time.perf_counter() - killed > 10:
            raise RuntimeError(f"not swept: {paths}")
        time.sleep(0.001)
    return (time.perf_counter() - killed) * 1e3


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--tiny", action="store_true", help="3 runs: a smoke test (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures there")
    args = parser.parse_args()
    runs = 3 if args.tiny else args.runs
    imports, firsts, seconds, diffs, sweeps = [], [], [], [], []
    for _ in range(runs):  # interleaved, so load from elsewhere hits all alike
        imports.append(import_ms())
        first, second = first_second_ms()
        firsts.append(first)
        seconds.append(second)
        diffs.append(first - second)
        sweeps.append(sweep_ms())
    result = {
        "runs": runs,
        "import_ms": _summary(imports),
        "first_array_ms": _summary(firsts),
        "second_array_ms": _summary(seconds),
        "first_minus_second_ms": _summary(diffs),
        "sweep_after_sigkill_ms": _summary(sweeps),
        "load_average": os.getloadavg()[0],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

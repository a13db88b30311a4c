"""Threads sharing one process's core: arrays/s of 1 and of 2 threads.

Each thread repeats one array's whole life with the pool on: create a 4 KiB
SharedMemoryArray, fill it, pickle it there and back, open it from its
metadata, release all three. On a free-threaded CPython (3.13t, 3.14t) the
threads run at once and share only the core's lock (docs/design.md,
"Free-threading"); with the GIL they take turns, so 2 threads move about
what 1 does. Target (issue 19): 2 threads >= 1.6x one thread's arrays/s on
2 cores. Each figure is the best of --repeats runs of --seconds, 1 and 2
threads alternating; the load average is printed with it, since other
programs on the machine take cores from the threads.

    python benchmarks/threads.py [--seconds S] [--repeats N] [--tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import threading
import time

import numpy as np

from grain_shm import SharedMemoryArray

NBYTES = 4096
BATCH = 100  # cycles between looks at the clock


def cycles(stop_at: list[float], done: list[int], slot: int, start: threading.Barrier) -> None:
    start.wait()
    n = 0
    while time.perf_counter() < stop_at[0]:
        for _ in range(BATCH):
            a = SharedMemoryArray((NBYTES,), np.uint8)
            a.fill(7)
            a.unlink_on_del()
            b = pickle.loads(pickle.dumps(a))
            c = SharedMemoryArray.from_metadata(a.metadata)
            del a, b, c
        n += BATCH
    done[slot] = n


def arrays_per_second(nthreads: int, seconds: float) -> float:
    done = [0] * nthreads
    stop_at = [0.0]
    start = threading.Barrier(nthreads + 1)
    threads = [threading.Thread(target=cycles, args=(stop_at, done, t, start))
               for t in range(nthreads)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a few cycles, to check it runs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.tiny:
        args.seconds, args.repeats = 0.05, 1
    SharedMemoryArray.enable_recycling(64 << 20)
    runs: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for nthreads in runs:
            runs[nthreads].append(arrays_per_second(nthreads, args.seconds))
    one, two = max(runs[1]), max(runs[2])
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    result = {
        "gil_enabled": gil,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "arrays_per_s": {"1": one, "2": two},
        "speedup": two / one,
        "runs": runs,
    }
    print(f"GIL {'on' if gil else 'off'}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}: 1 thread {one:,.0f} arrays/s, "
          f"2 threads {two:,.0f} arrays/s, {two / one:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

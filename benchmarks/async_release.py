"""Deferred release: what `del arr` costs the caller, and what a loop costs.

Modes, measured in the same run:

  sync   grain_shm, release inline (munmap + shm_unlink in `del`)
  async  grain_shm with enable_async_del(1, 50): the C deleter
  pool   grain_shm segments handed to a Grain-style Python deleter: a
         ThreadPool(1) and a Semaphore(50), inline when the semaphore is out
  grain  Grain's own SharedMemoryArray with enable_async_del(1, 50), when
         grain is installed (pip install 'grain_shm[compare]')

sync, async and pool take turns in one interpreter (switching with
enable_async_del / _disable_async_del), round after round, so a neighbour's
burst of load on a shared machine hits all three alike; grain runs its rounds
in an interpreter of its own.

Per array size it reports
  release_us       median time of the `del` that releases an array, with the
                   calling code warm (a 64 B array was released just before),
                   as in a loop that frees a batch
  release_cold_us  the same right after filling the array: after a large fill
                   the next few Python operations pay cache and TLB refills,
                   whatever they do (about 5 us after 16 MiB on a small VM)
  loop_us          create + fill + release per iteration, over a loop that
                   ends when every release has finished (median of rounds)
  loop_vs_sync     loop_us / sync's loop_us in the same round (median of
                   rounds): the paired figure, steadier on a shared machine

Targets (issue 4): async release_us <= 2 at every size; async loop_us <= sync.
The loop can only gain from deferring if a core is free to do the releases.

  python benchmarks/async_release.py [--json PATH] [--rounds N] [--quick] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SIZES = [64, 4096, 1 << 16, 1 << 20, 1 << 24]
NUM_THREADS, MAX_OUTSTANDING = 1, 50


class Mode:
    """How one mode makes an array and releases it."""

    def __init__(self, name):
        import numpy as np

        self.name = name
        self.release = None  # None: `del` releases (inline or through a deleter)
        if name == "grain":
            import logging

            logging.disable(logging.WARNING)  # grain's absl chatter about jax
            from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

            SharedMemoryArray.enable_async_del(NUM_THREADS, MAX_OUTSTANDING)
            self.settle = lambda: SharedMemoryArray._del_thread_pool.apply(int)  # FIFO
        else:
            from grain_shm import SharedMemoryArray

            self.settle = self._settle_deleter
        self.cls, self.np = SharedMemoryArray, np
        if name == "pool":
            self._pool_deleter()

    def enter(self):
        """Switch the grain_shm deleter to what this mode needs."""
        if self.name == "async":
            self.cls.enable_async_del(NUM_THREADS, MAX_OUTSTANDING)
        elif self.name in ("sync", "pool"):
            self.cls._disable_async_del()

    def new(self, n):
        arr = self.cls((n,), self.np.uint8)
        arr.unlink_on_del()
        return arr

    @staticmethod
    def _settle_deleter():
        from grain_shm import _shm

        while True:
            st = _shm.async_release_stats()
            if st["queued"] == 0 and st["in_flight"] == 0:
                return
            time.sleep(0.0002)

    def _pool_deleter(self):
        import threading
        from multiprocessing.pool import ThreadPool

        pool = ThreadPool(NUM_THREADS)
        outstanding = threading.Semaphore(MAX_OUTSTANDING)

        def drop(arr):  # the last reference dies here, on the pool's thread
            del arr
            outstanding.release()

        def release(holder):  # Grain's __del__: hand the array over, or release inline
            if outstanding.acquire(blocking=False):
                pool.apply_async(drop, (holder.pop(),))
            else:
                holder.pop()

        self.release = release
        self.settle = lambda: pool.apply(int)


def filled(mode, n):
    """A new array of n bytes, filled, as the only item of a list (no other reference)."""
    arr = mode.new(n)
    arr.fill(1)
    return [arr]


def timed_release(mode, holder, clock):
    """ns the caller spends releasing the array in `holder`, its last reference."""
    if mode.release is None:
        t = clock()
        holder.pop()
        return clock() - t
    t = clock()
    mode.release(holder)
    return clock() - t


def one_round(mode, out, quick):
    clock = time.perf_counter_ns
    for n in SIZES:
        big = n >= 1 << 20
        samples = (3 if big else 15) if quick else (8 if big else 40)
        fig = out.setdefault(str(n), {"warm": [], "cold": [], "loop": [], "iterations": 0})
        for _ in range(samples):
            fig["cold"].append(timed_release(mode, filled(mode, n), clock))
            holder = filled(mode, n)
            timed_release(mode, [mode.new(64)], clock)  # warm the caller's path
            fig["warm"].append(timed_release(mode, holder, clock))
        mode.settle()

        budget = (0.2 if n >= 1 << 24 else 0.08) * (0.5 if quick else 1) * 1e9
        iterations = 0
        start = clock()
        while iterations < 5 or clock() - start < budget:
            holder = filled(mode, n)
            if mode.release is None:
                holder.pop()
            else:
                mode.release(holder)
            iterations += 1
        mode.settle()
        fig["loop"].append((clock() - start) / iterations)
        fig["iterations"] += iterations


def measure(names, rounds, quick):
    """Figures for the modes `names`, taking turns round after round."""
    import gc

    gc.disable()
    modes = [Mode(name) for name in names]
    raw = {name: {} for name in names}
    for _ in range(rounds):
        for mode in modes:
            mode.enter()
            one_round(mode, raw[mode.name], quick)
    results = {}
    sync_loops = raw.get("sync", {})
    for name, sizes in raw.items():
        results[name] = {
            n: {
                "release_us": statistics.median(f["warm"]) / 1e3,
                "release_p90_us": sorted(f["warm"])[int(len(f["warm"]) * 0.9)] / 1e3,
                "release_cold_us": statistics.median(f["cold"]) / 1e3,
                "loop_us": statistics.median(f["loop"]) / 1e3,
                "loop_rounds_us": [round(x / 1e3, 1) for x in f["loop"]],
                **(
                    {"loop_vs_sync": statistics.median(
                        a / s for a, s in zip(f["loop"], sync_loops[n]["loop"])
                    )}
                    if n in sync_loops
                    else {}
                ),
                "iterations": f["iterations"],
            }
            for n, f in sizes.items()
        }
    return results


def _have_grain():
    try:
        import grain._src.python.ipc.shared_memory_array  # noqa: F401
    except Exception:
        return False
    return True


def _human(n):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def _child(names, args):
    cmd = [sys.executable, __file__, "--modes", ",".join(names), "--rounds", str(args.rounds)]
    cmd += ["--quick"] if args.quick else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write JSON here instead of stdout")
    parser.add_argument("--rounds", type=int, default=5, help="turns each mode takes (5)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="--quick, one round (CI)")
    parser.add_argument("--modes", help=argparse.SUPPRESS)  # a child's share of the work
    args = parser.parse_args()
    if args.tiny:
        args.quick, args.rounds = True, 1

    if args.modes:
        json.dump(measure(args.modes.split(","), args.rounds, args.quick), sys.stdout)
        return

    started = time.time()
    results = _child(["sync", "async", "pool"], args)
    if _have_grain():
        results.update(_child(["grain"], args))
    modes = list(results)
    report = {
        "benchmark": "async_release",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },
        "settings": {
            "num_threads": NUM_THREADS,
            "max_outstanding_requests": MAX_OUTSTANDING,
            "rounds": args.rounds,
        },
        "sizes": SIZES,
        "results": results,
    }
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)

    def row(label, n, key):
        return f"{label:<17}" + "".join(f"{results[m][str(n)][key]:>10.1f}" for m in modes)

    lines = [f"{'':<17}" + "".join(f"{m:>10}" for m in modes)]
    for n in SIZES:
        lines += [
            f"-- {_human(n)}",
            row("release us", n, "release_us"),
            row("release cold us", n, "release_cold_us"),
            row("loop us", n, "loop_us"),
            f"{'loop vs sync':<17}"
            + "".join(
                f"{results[m][str(n)].get('loop_vs_sync', float('nan')):>10.2f}" for m in modes
            ),
        ]
    lines.append(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()

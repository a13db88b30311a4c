"""What sessions cost per array: create + destroy, with and without them.

"with": SharedMemoryArray as shipped: the reaper-started flag check in
__new__, 29-character session names, a reaper process running.
"without": the same steps minus that check, under the pre-session prefix
"gs_" (names of 16 characters).
"stdlib": multiprocessing.shared_memory.SharedMemory create, close, unlink,
whose resource tracker gets two messages per segment; for scale.

Rounds alternate between the variants, in rotating order, so that load
from other processes hits them alike; each figure is the median over rounds of the mean time per
array. Run: PYTHONPATH=src python benchmarks/session_cost.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from multiprocessing import shared_memory

import numpy as np

from grain_shm import SharedMemoryArray, _shm, session
from grain_shm.array import _check_dtype, _check_shape, _nbytes

SHAPE, DTYPE = (16,), np.float32


def with_sessions() -> None:
    a = SharedMemoryArray(SHAPE, DTYPE)
    a.unlink_on_del()


def without_sessions() -> None:
    shape, dtype = _check_shape(SHAPE), _check_dtype(DTYPE)
    segment = _shm.create(_nbytes(shape, dtype))
    a = np.ndarray.__new__(SharedMemoryArray, shape, dtype, buffer=segment)
    a.unlink_on_del()


def stdlib() -> None:
    shm = shared_memory.SharedMemory(create=True, size=64)
    shm.close()
    shm.unlink()


def per_array(fn, prefix: str | None, n: int) -> float:
    if prefix:
        _shm.set_name_prefix(prefix)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    _shm.set_name_prefix(session.SESSION_PREFIX)
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with_sessions()  # starts the reaper, outside the timing
    variants = {
        "with": (with_sessions, session.SESSION_PREFIX),
        "without": (without_sessions, "gs_"),
        "stdlib": (stdlib, None),
    }
    times = {name: [] for name in variants}
    order = list(variants)
    for _ in range(args.rounds):
        order.append(order.pop(0))  # no variant always runs first
        for name in order:
            fn, prefix = variants[name]
            times[name].append(per_array(fn, prefix, args.per_round))
    flag = min(
        __import__("timeit").repeat(
            "if not session.reaper_started: pass", globals={"session": session},
            number=1_000_000, repeat=5,
        )
    ) / 1_000_000
    result = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    result["flag_check"] = flag * 1e6
    result["spread_with"] = [min(times["with"]) * 1e6, max(times["with"]) * 1e6]
    result["spread_without"] = [min(times["without"]) * 1e6, max(times["without"]) * 1e6]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"create+destroy of a {SHAPE} {np.dtype(DTYPE)} array, median of "
          f"{args.rounds} rounds x {args.per_round}:")
    print(f"  with sessions     {result['with']:7.2f} us")
    print(f"  without sessions  {result['without']:7.2f} us "
          f"(difference {result['with'] - result['without']:+.2f} us)")
    print(f"  stdlib SharedMemory {result['stdlib']:5.2f} us")
    print(f"  the flag check alone: {result['flag_check'] * 1000:.0f} ns")


if __name__ == "__main__":
    main()

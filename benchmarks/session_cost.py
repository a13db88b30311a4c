"""What sessions cost per array: create + destroy, with and without them.

"with": SharedMemoryArray as shipped: the joined-session flag check in
__new__, the per-thread prefix lookup, 29-character session names, a reaper
running. "without": the same steps straight on the core, minus the check
and the lookup, under a fixed 3-character prefix (names of 16 characters).
"stdlib": multiprocessing.shared_memory.SharedMemory create, close, unlink,
whose resource tracker gets two messages per segment; for scale.

Rounds alternate between the variants, in rotating order, so that load from
other processes hits them alike; each figure is the median over rounds of
the mean time per array.

    python benchmarks/session_cost.py [--rounds N] [--per-round N] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from grain_shm import SharedMemoryArray, _shm, session

SHAPE, DTYPE = (16,), np.dtype(np.float32)


def with_sessions() -> None:
    a = SharedMemoryArray(SHAPE, DTYPE)
    a.unlink_on_del()


def without_sessions() -> None:
    shape, nbytes = _shm.layout(SHAPE, DTYPE.itemsize)
    segment = _shm.create(nbytes, b"gs_")
    a = np.ndarray.__new__(SharedMemoryArray, shape, DTYPE, buffer=segment)
    a.unlink_on_del()


def stdlib() -> None:
    shm = shared_memory.SharedMemory(create=True, size=64)
    shm.close()
    shm.unlink()


def per_array(fn: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true", help="3 rounds of 50 (CI)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.per_round = 3, 50

    with_sessions()  # joins the session and starts the reaper, outside the timing
    variants = {"with": with_sessions, "without": without_sessions, "stdlib": stdlib}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(args.rounds):
        order.append(order.pop(0))  # no variant always runs first
        for name in order:
            times[name].append(per_array(variants[name], args.per_round))
    checks = timeit.repeat(
        "if not session.joined: pass\nsession.creation_prefix()",
        globals={"session": session}, number=100_000, repeat=5,
    )
    result = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    result["flag_and_prefix_us"] = min(checks) / 100_000 * 1e6
    result["spread_with"] = [min(times["with"]) * 1e6, max(times["with"]) * 1e6]
    result["spread_without"] = [min(times["without"]) * 1e6, max(times["without"]) * 1e6]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"create+destroy of a {SHAPE} {DTYPE} array, median of "
          f"{args.rounds} rounds x {args.per_round}:")
    print(f"  with sessions     {result['with']:7.2f} us")
    print(f"  without sessions  {result['without']:7.2f} us "
          f"(difference {result['with'] - result['without']:+.2f} us)")
    print(f"  stdlib SharedMemory {result['stdlib']:5.2f} us")
    print(f"  the flag check and prefix lookup alone: {result['flag_and_prefix_us'] * 1000:.0f} ns")


if __name__ == "__main__":
    main()

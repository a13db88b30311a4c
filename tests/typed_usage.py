"""A small program written against grain_shm's public API, type-checked.

`mypy --strict` checks it (the [tool.mypy] section of pyproject.toml, and
.ci/run once more against the installed wheel, which proves the wheel ships
its types), and tests/test_packaging.py runs it, so the example stays true.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import numpy.typing as npt

from grain_shm import (
    MultiprocessingOptions,
    SharedMemoryArray,
    Prefetcher,
    Queue,
    SharedMemoryArrayMetadata,
    copy_to_shm,
    open_from_shm,
    prefetch,
    unlink_shm,
)


def make_batch(rows: int) -> SharedMemoryArray:
    batch = SharedMemoryArray((rows, 3), np.float32)
    batch[:] = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    return batch


def row(index: int) -> npt.NDArray[np.float32]:
    return np.full(3, index, np.float32)


def total(values: npt.NDArray[np.float32]) -> float:
    return float(values.sum())


def main() -> None:
    options = MultiprocessingOptions(num_workers=0, per_worker_buffer_size=2)
    assert options.num_workers == 0

    batch = make_batch(4)
    batch.unlink_on_del()
    metadata: SharedMemoryArrayMetadata = batch.metadata
    same: SharedMemoryArray = SharedMemoryArray.from_metadata(metadata)
    assert total(same) == total(batch) == 66.0

    sent: SharedMemoryArray = pickle.loads(pickle.dumps(batch[1:]))
    assert sent.shape == (3, 3)

    tree: dict[str, Any] = {"x": np.ones(8, np.int64), "label": "eight ones"}
    shared = copy_to_shm(tree)
    opened = open_from_shm(shared)
    assert int(opened["x"].sum()) == 8 and opened["label"] == "eight ones"

    unsent = copy_to_shm([np.zeros(2)])
    unlink_shm(unsent)

    stream: Prefetcher = prefetch(list(range(10)), row, options=options, batch_size=4)
    with stream:
        first = next(stream)
        state: dict[str, Any] = stream.get_state()
    assert first.shape == (4, 3) and state["next_index"] == 1

    queue = Queue(maxsize=3)
    queue.put(batch)
    queue.put_many([1, 2])
    received: Any = queue.get(timeout=10.0)
    assert isinstance(received, SharedMemoryArray) and queue.qsize() >= 1
    assert queue.get_many(2) == [1, 2] and queue.empty() and not queue.full()
    queue.close()
    queue.join_thread()


if __name__ == "__main__":
    main()

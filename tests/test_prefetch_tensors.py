"""A PyTorch dataset's tensors are leaves like arrays (issue 20, 1).

A CPU tensor leaf is batched like an ndarray leaf, written once into shared
memory by the worker, and reaches the consumer as a tensor over that memory
(`torch.from_numpy` of the SharedMemoryArray), never through torch's own
sharing strategy, whose file descriptors and names the stream used to lose
(`FileNotFoundError` from inside torch after a few batches). Each run is a
child interpreter: with the pool (the workers' default) and without it.
"""

import json

import pytest
from conftest import run_python

pytest.importorskip("torch", reason="tensor leaves need torch (pip install torch==2.13.0)")

DATASET = """
import json, os, sys
import numpy as np
import torch
import grain_shm
from grain_shm import MultiprocessingOptions, prefetch

class Images(torch.utils.data.Dataset):   # the issue's dataset
    def __len__(self):
        return 200

    def __getitem__(self, i):
        return {"image": torch.full((3, 112, 112), float(i)), "label": torch.tensor(i % 10)}

def mapped_from(address):
    # The file mapped at `address` in this process (/proc/self/maps).
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return None

def describe(value):
    return {"type": type(value).__module__ + "." + type(value).__qualname__,
            "shape": list(value.shape), "dtype": str(value.dtype)}

if __name__ == "__main__":
    batch_size = None if sys.argv[1] == "none" else int(sys.argv[1])
    seen = []
    with prefetch(Images(), options=MultiprocessingOptions(2, 2),
                  batch_size=batch_size) as stream:
        for k, item in enumerate(stream):
            image, label = item["image"], item["label"]
            assert isinstance(image, torch.Tensor) and isinstance(label, torch.Tensor)
            positions = (list(range(k * batch_size, min(k * batch_size + batch_size, 200)))
                         if batch_size else [k])
            expected = torch.tensor(positions, dtype=torch.float32)
            assert torch.equal(image[..., 0, 0, 0] if batch_size else image[0, 0, 0],
                               expected if batch_size else expected[0]), (k, image.shape)
            assert torch.equal(image.amin(dim=(-3, -2, -1)), image.amax(dim=(-3, -2, -1)))
            assert torch.equal(label, torch.tensor(positions) % 10 if batch_size
                               else torch.tensor(k % 10))
            seen.append({"item": k, "image": describe(image), "label": describe(label),
                         "shared": mapped_from(image.data_ptr())})
    print(json.dumps({"seen": seen}))
"""


def _run(batch_size, recycle):
    proc = run_python(DATASET, args=(str(batch_size),), env={"GRAIN_SHM_RECYCLE": recycle},
                      timeout=180)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("recycle", ["1", "0"], ids=["pool", "fresh"])
def test_a_tensor_dataset_is_batched_into_stacked_tensors(recycle):
    got = _run(32, recycle)
    seen = got["seen"]
    assert [s["item"] for s in seen] == list(range(7))  # to the end: 200 = 6 * 32 + 8
    first, last = seen[0], seen[-1]
    assert first["image"] == {"type": "torch.Tensor", "shape": [32, 3, 112, 112],
                              "dtype": "torch.float32"}
    assert first["label"] == {"type": "torch.Tensor", "shape": [32], "dtype": "torch.int64"}
    assert last["image"]["shape"] == [8, 3, 112, 112]
    # Tensors over grain_shm's segments (torch's own sharing would map
    # /torch_... names or fds), so no copy on arrival.
    assert all(s["shared"].startswith("/dev/shm/gs") for s in seen), seen[0]


@pytest.mark.parametrize("recycle", ["1", "0"], ids=["pool", "fresh"])
def test_a_tensor_element_travels_as_a_tensor_over_shared_memory(recycle):
    got = _run("none", recycle)
    seen = got["seen"]
    assert [s["item"] for s in seen] == list(range(200))
    assert seen[0]["image"] == {"type": "torch.Tensor", "shape": [3, 112, 112],
                                "dtype": "torch.float32"}
    assert seen[0]["label"] == {"type": "torch.Tensor", "shape": [], "dtype": "torch.int64"}
    assert all(s["shared"].startswith("/dev/shm/gs") for s in seen), seen[0]


def test_tensors_in_this_process_with_no_workers():
    import torch

    from grain_shm import prefetch

    def element(i):
        return {"x": torch.arange(4, dtype=torch.int16) + i, "y": torch.tensor(float(i))}

    batches = list(prefetch(range(5), element, batch_size=2))
    assert [type(b["x"]) for b in batches] == [torch.Tensor] * 3
    assert torch.equal(batches[0]["x"], torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]],
                                                     dtype=torch.int16))
    assert torch.equal(batches[2]["y"], torch.tensor([4.0]))


def test_grain_shm_does_not_import_torch_for_arrays():
    proc = run_python(
        """
        import sys
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch

        def row(i):
            return np.full(8, i)

        if __name__ == "__main__":
            for _ in prefetch(range(8), row, batch_size=4, options=MultiprocessingOptions(2)):
                pass
            print("torch" in sys.modules)
        """
    )
    assert proc.stdout.strip() == "False"

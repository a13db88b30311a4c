"""MultiprocessingOptions: Grain's dataclass, with its fields validated."""

import dataclasses
import pickle

import pytest

from grain_shm import MultiprocessingOptions


def test_defaults_and_field_order_match_grain():
    options = MultiprocessingOptions()
    assert (options.num_workers, options.per_worker_buffer_size, options.enable_profiling) == (0, 1, False)
    assert [f.name for f in dataclasses.fields(MultiprocessingOptions)] == [
        "num_workers", "per_worker_buffer_size", "enable_profiling"
    ]
    assert MultiprocessingOptions(4, 2, True) == MultiprocessingOptions(
        num_workers=4, per_worker_buffer_size=2, enable_profiling=True
    )
    assert pickle.loads(pickle.dumps(MultiprocessingOptions(3))) == MultiprocessingOptions(3)


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"per_worker_buffer_size": 0}, ValueError, "per_worker_buffer_size"),
        ({"per_worker_buffer_size": -3}, ValueError, "per_worker_buffer_size"),
        ({"num_workers": 1.5}, TypeError, "num_workers"),
        ({"num_workers": "2"}, TypeError, "num_workers"),
        ({"num_workers": True}, TypeError, "num_workers"),
        ({"per_worker_buffer_size": None}, TypeError, "per_worker_buffer_size"),
        ({"enable_profiling": 1}, TypeError, "enable_profiling"),
        ({"enable_profiling": "yes"}, TypeError, "enable_profiling"),
    ],
)
def test_invalid_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        MultiprocessingOptions(**kwargs)
    with pytest.raises(error, match=field):
        dataclasses.replace(MultiprocessingOptions(), **kwargs)


def test_numpy_values_are_accepted_as_python_ones():
    import numpy as np

    options = MultiprocessingOptions(np.int64(4), np.int32(2), np.bool_(True))
    assert options == MultiprocessingOptions(4, 2, True)
    assert type(options.num_workers) is int and type(options.enable_profiling) is bool

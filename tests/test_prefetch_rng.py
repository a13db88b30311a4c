"""Per-element randomness (issue 20, 2): with rng_seed, the transform gets a
numpy Generator derived from (rng_seed, epoch, source index) only, so an
element draws the same numbers whatever num_workers, start method, shard or
resume point, as a Grain random map does."""

import pytest

from grain_shm import MultiprocessingOptions, prefetch

STREAM = dict(shuffle_seed=3, num_epochs=2, rng_seed=5)


def augment(i, rng):
    """An element and two draws of its generator."""
    return {"index": i, "draws": rng.integers(1 << 62, size=2)}


def as_pairs(stream):
    return [(int(item["index"]), item["draws"].tolist()) for item in stream]


@pytest.fixture(scope="module")
def reference():
    return as_pairs(prefetch(list(range(10)), augment, **STREAM))


@pytest.mark.parametrize("num_workers, context", [(1, "fork"), (3, "fork"), (1, "spawn"),
                                                  (3, "spawn")])
def test_draws_do_not_depend_on_workers_or_start_method(reference, num_workers, context):
    got = as_pairs(prefetch(list(range(10)), augment, options=MultiprocessingOptions(num_workers),
                            mp_context=context, **STREAM))
    assert got == reference


def test_draws_belong_to_the_element_and_its_epoch(reference):
    by_element = {}
    for index, draws in reference:
        by_element.setdefault(index, []).append(draws)
    assert sorted(by_element) == list(range(10))
    assert all(len(d) == 2 and d[0] != d[1] for d in by_element.values())  # epoch 0 and 1 differ
    others = as_pairs(prefetch(list(range(10)), augment, **{**STREAM, "rng_seed": 6}))
    assert sorted(others) != sorted(reference)


def test_draws_do_not_depend_on_the_shard(reference):
    first_epoch = dict(reference[:10])
    for shard in range(2):
        got = as_pairs(prefetch(list(range(10)), augment, shuffle_seed=3, rng_seed=5,
                                shard_index=shard, shard_count=2))
        assert all(first_epoch[index] == draws for index, draws in got)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_a_resume_draws_what_the_run_would_have(batch_size):
    def run(**kw):
        return prefetch(list(range(10)), augment, options=MultiprocessingOptions(3),
                        mp_context="fork", batch_size=batch_size, **STREAM, **kw)

    whole = [item["draws"].tolist() for item in run()]
    stream = run()
    head = [next(stream)["draws"].tolist() for _ in range(4)]  # 4: not a multiple of 3
    state = stream.get_state()
    stream.close()
    resumed = run()
    resumed.set_state(state)
    assert head + [item["draws"].tolist() for item in resumed] == whole


def test_the_state_records_the_seed():
    state = prefetch(list(range(4)), augment, rng_seed=1).get_state()
    other = prefetch(list(range(4)), augment, rng_seed=2)
    with pytest.raises(ValueError, match="rng_seed"):
        other.set_state(state)


def test_without_rng_seed_the_transform_gets_the_element_alone():
    assert list(prefetch([1, 2], lambda x: x * 10)) == [10, 20]


def test_rng_seed_needs_a_transform_and_an_int():
    with pytest.raises(ValueError, match="transform"):
        prefetch([1, 2], rng_seed=0)
    with pytest.raises(TypeError):
        prefetch([1, 2], augment, rng_seed="0")

"""grain_shm.prefetch as a DataLoader user expects it: `len()` is the number
of items a pass yields, iterating again after the last item starts the next
epoch with its own order, and a checkpoint records the epoch it was taken in.
"""

import json

import pytest

from grain_shm import MultiprocessingOptions, prefetch


def loader(num_workers, **kwargs):
    return prefetch(list(range(10)), options=MultiprocessingOptions(num_workers, 1),
                    mp_context="fork", **{"shuffle_seed": 5, **kwargs})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_for_loop_is_the_next_epoch_in_its_own_order(num_workers):
    stream = loader(num_workers)
    assert len(stream) == 10
    epochs = [[int(x) for x in stream] for _ in range(3)]  # for epoch in range(3): for x in ...
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # each a full permutation
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each its own
    assert epochs[0] == [int(x) for x in loader(num_workers)]  # the first as it always was


def test_len_counts_items_after_sharding_batching_and_drop_remainder():
    assert len(loader(0, batch_size=3)) == 4
    assert len(loader(0, batch_size=3, drop_remainder=True)) == 3
    assert len(loader(0, batch_size=3, num_epochs=2)) == 7  # 20 elements: batches span epochs
    assert len(loader(0, shard_index=2, shard_count=3)) == 3
    with pytest.raises(TypeError, match="num_epochs=None"):
        len(loader(0, num_epochs=None))
    assert loader(0, num_epochs=None) and loader(0, num_epochs=0)  # still true, as iterators are


def test_next_after_the_last_item_still_stops():
    """Only a new iteration starts the next epoch: an exhausted iterator stays so."""
    stream = loader(0)
    assert len(list(stream)) == 10
    with pytest.raises(StopIteration):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_records_its_epoch_and_a_resumed_prefetcher_continues_in_it(num_workers):
    stream = loader(num_workers, batch_size=3)
    first = [x.tolist() for x in stream]
    second = iter(stream)
    head = [next(second).tolist() for _ in range(2)]
    state = json.loads(json.dumps(stream.get_state()))
    rest = [x.tolist() for x in second]
    assert state["epoch"] == 1 and state["next_index"] == 2
    resumed = loader(num_workers, batch_size=3)
    resumed.set_state(state)
    assert [x.tolist() for x in resumed] == rest
    assert head + rest != first
    third = [x.tolist() for x in resumed]  # and on into the epoch after
    assert sorted(sum(third, [])) == list(range(10)) and third not in (first, head + rest)


def test_an_old_state_without_an_epoch_is_the_first_epoch():
    stream = loader(0)
    state = stream.get_state()
    del state["epoch"]
    state["next_index"] = 4
    stream.set_state(state)
    assert [int(x) for x in stream] == [int(x) for x in loader(0)][4:]
    with pytest.raises(ValueError, match="epoch"):
        stream.set_state({**state, "epoch": -1})

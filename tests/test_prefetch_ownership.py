"""grain_shm.prefetch: the consumer owns every array of an item from the
moment it opens it, so an item that fails halfway through unpickling (a
leaf that cannot be rebuilt here, Ctrl-C) leaves none of its arrays behind,
with fresh segments and with the pool; and the failure is raised at that
item's position."""

import gc
import logging

import numpy as np
import pytest
from conftest import own_entries, run_python

from grain_shm import MultiprocessingOptions, _shm, prefetch


def explode(kind):
    """Rebuilds a `Refuses` leaf: only ever called in the consumer, which
    unpickles what the workers made."""
    raise {"error": LookupError, "interrupt": KeyboardInterrupt}[kind](
        "this leaf cannot be rebuilt in the consumer")


class Refuses:
    """A leaf that pickles in the worker and raises when unpickled."""

    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return explode, (self.kind,)


def fails_at_three(kind, i):
    # Arrays on both sides of the leaf: the first is opened before it fails.
    return {"before": np.full(4096, i, np.uint8), "leaf": Refuses(kind) if i == 3 else None,
            "after": np.full(4096, i, np.uint8)}


def identity(i):
    return i


@pytest.mark.parametrize("batch_size", [None, 2], ids=["elements", "batches"])
@pytest.mark.parametrize("kind, raised", [("error", LookupError),
                                          ("interrupt", KeyboardInterrupt)])
def test_an_item_that_fails_to_unpickle_leaves_none_of_its_arrays(kind, raised, batch_size):
    import functools

    before = own_entries()
    got = []
    stream = prefetch(list(range(8)), functools.partial(fails_at_three, kind),
                      options=MultiprocessingOptions(2, 2), batch_size=batch_size,
                      mp_context="fork")
    with pytest.raises(raised, match="cannot be rebuilt in the consumer") as error:
        for item in stream:
            got.append(np.asarray(item["before"])[..., 0].tolist())
    assert got == ([0, 1, 2] if batch_size is None else [[0, 1]])  # up to the failing item
    if hasattr(error.value, "add_note"):  # Python 3.11+
        failing_item = 3 if batch_size is None else 1
        assert f"item {failing_item} from prefetch worker 1" in "".join(error.value.__notes__)
    del item
    gc.collect()
    # The exception (still alive here, with its traceback) holds nothing of it.
    assert own_entries() - before == set()


def three_arrays(i):
    return {"a": np.full(4096, i, np.uint8), "b": np.full(7, i, np.uint8),
            "c": np.full(4096, i, np.uint8)}


_opened_b = []  # names of the (7,)-shaped arrays the consumer opened


def unlinked_before_opening(name, shape, *rest):
    """grain_shm.array._rebuild, but element 3's middle array is unlinked first."""
    import grain_shm.array

    if tuple(shape) == (7,):
        _opened_b.append(name)
        if len(_opened_b) == 4:  # element 3's
            _shm.unlink(name)
    return grain_shm.array._map(grain_shm.SharedMemoryArray, name, shape, *rest)


def test_an_array_that_cannot_be_opened_leaves_none_of_the_others(monkeypatch, fresh_segments):
    """Element 3's middle array is gone (unlinked by someone) when the
    consumer opens it: the error is raised at item 3 and the element's other
    arrays, one opened before it and one after, are released, even while the
    error (and its traceback) lives."""
    import grain_shm.array

    _opened_b.clear()
    monkeypatch.setattr(grain_shm.array, "_rebuild", unlinked_before_opening)  # fork: in both
    before = own_entries()
    got = []
    with pytest.raises(FileNotFoundError) as error:
        for item in prefetch(list(range(8)), three_arrays, options=MultiprocessingOptions(2, 2),
                             mp_context="fork", recycle=False):
            got.append(int(item["a"][0]))
    assert got == [0, 1, 2]
    if hasattr(error.value, "add_note"):
        assert "item 3 from prefetch worker 1" in "".join(error.value.__notes__)
    del item
    gc.collect()
    assert own_entries() - before == set()


POOLED = """
    import functools, gc, os, sys
    import numpy as np
    import grain_shm.array
    from grain_shm import MultiprocessingOptions, _shm, prefetch, session
    from test_prefetch_ownership import fails_at_three

    opened = []  # element 3's blocks the consumer opened, to ask the pool about them
    real_rebuild_block = grain_shm.array._rebuild_block

    def recording(name, shape, dtype, strides, offset, index, generation, *cls):
        array = real_rebuild_block(name, shape, dtype, strides, offset, index, generation, *cls)
        if array[0] == 3:
            opened.append((name, index, generation))
        return array

    def ours():
        return {n for n in os.listdir("/dev/shm") if n.startswith(session.name_prefix())}

    if __name__ == "__main__":
        assert _shm.pool_stats()["max_bytes"] > 0
        grain_shm.array._rebuild_block = recording
        stream = prefetch(list(range(8)), functools.partial(fails_at_three, "error"),
                          options=MultiprocessingOptions(2, 2), mp_context=sys.argv[1])
        got = []
        try:
            for item in stream:
                got.append(int(item["before"][0]))
                del item
        except LookupError as error:
            print("raised after", got)
        gc.collect()
        print("opened", len(opened))
        def state(block):
            try:
                return str(_shm.block_state(*block))
            except FileNotFoundError:  # its arena retired already: freed, and more
                return "gone"

        print("blocks", ";".join(state(block) for block in opened))
        print("left", len(ours()))
"""


def test_with_the_pool_its_blocks_are_freed_and_the_arenas_go():
    proc = run_python(POOLED, env={"GRAIN_SHM_RECYCLE": "1"}, timeout=90, args=("spawn",))
    lines = proc.stdout.splitlines()
    assert lines[0] == "raised after [0, 1, 2]"
    assert lines[1] == "opened 2"  # both of element 3's arrays, before its leaf failed
    # Free (generation moved on), or unlinked with no reference: the owner
    # may reuse them, and their arena can retire (or has: "gone").
    assert all(state in ("None", "(False, 0)", "gone")
               for state in lines[2].removeprefix("blocks ").split(";")), lines[2]
    assert lines[3] == "left 0"  # the workers' arenas went with them


def test_what_fails_to_unpickle_while_stopping_is_logged_and_released(caplog):
    """Items in flight when the stream stops are drained; one that fails to
    unpickle then is logged, not hidden, and its arrays released."""
    import functools

    caplog.set_level(logging.WARNING, logger="grain_shm.prefetch")
    before = own_entries()
    stream = prefetch(list(range(8)), functools.partial(fails_at_three, "error"),
                      options=MultiprocessingOptions(2, 2), mp_context="fork")
    with stream:
        assert [int(next(stream)["before"][0]) for _ in range(3)] == [0, 1, 2]
        # Item 3 is worker 1's next message: once its pipe is readable, the
        # message is being sent, and stopping waits for the send to end.
        assert stream._workers.channels[1].poll(30)
    gc.collect()
    assert own_entries() - before == set()
    records = [r for r in caplog.records if r.name == "grain_shm.prefetch"]
    assert any(r.exc_info and "cannot be rebuilt in the consumer" in str(r.exc_info[1])
               for r in records), [r.getMessage() for r in records]

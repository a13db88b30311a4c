"""grain_shm.prefetch: order, batches in shared memory, the buffer bound,
profiling, checkpoints, shards, and every way a run can fail or end early.

Most runs use the fork context (fast to start); spawn and forkserver get
their own tests. Whatever can hang or kill the interpreter (a killed worker,
leaving early, Ctrl-C) runs in a child interpreter with a timeout.
"""

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import own_entries, run_python

from grain_shm import MultiprocessingOptions, Prefetcher, SharedMemoryArray, prefetch

HERE = os.path.dirname(os.path.abspath(__file__))


def record(i):
    """An element of every kind of leaf: an array, a number, a string."""
    return {"image": np.full((2, 3), i, np.float32), "label": i, "name": f"e{i}"}


def fail_at_five(i):
    if i == 5:
        raise ValueError(f"element {i} is bad")
    return np.full(4, i)


class Unpicklable(Exception):
    def __init__(self, message, handle):  # two arguments: pickle cannot rebuild it
        super().__init__(message)
        self.handle = handle


def fail_unpicklably(i):
    if i == 2:
        raise Unpicklable("cannot travel", lambda: None)
    return i


def slow(i):
    time.sleep(0.02)
    return np.full(1024, i, np.float32)


def log_production(path, i):
    with open(path, "a") as log:
        log.write(f"{i}\n")
    return np.full(8, i)


class MapStyleDataset:
    """A torch.utils.data.Dataset of the map style, without torch."""

    def __len__(self):
        return 7

    def __getitem__(self, index):
        if not 0 <= index < 7:
            raise IndexError(index)
        return np.arange(3) + index


def workers(n, buffer_size=1, profiling=False):
    return MultiprocessingOptions(n, buffer_size, profiling)


def as_lists(items):
    """Items as plain Python values, to compare runs."""
    def plain(tree):
        if isinstance(tree, dict):
            return {key: plain(value) for key, value in tree.items()}
        if isinstance(tree, np.ndarray):
            return tree.tolist()
        return tree

    return [plain(item) for item in items]


STREAM = dict(batch_size=4, shuffle_seed=7, num_epochs=2)


@pytest.fixture(scope="module")
def reference():
    """The stream of STREAM over 11 records, made in this process."""
    return as_lists(prefetch(list(range(11)), record, **STREAM))


# -- Order


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_order_is_the_same_for_every_worker_count(reference, num_workers):
    got = prefetch(list(range(11)), record, options=workers(num_workers, 2), mp_context="fork",
                   **STREAM)
    assert as_lists(got) == reference


def test_stream_is_epochs_of_a_fixed_permutation_cut_into_batches(reference):
    labels = [label for batch in reference for label in batch["label"]]
    assert len(reference) == 6  # 22 elements: 5 batches of 4, and 2
    assert sorted(labels[:11]) == sorted(labels[11:]) == list(range(11))
    assert labels[:11] != list(range(11)) and labels[:11] != labels[11:]
    assert reference[0]["name"] == [f"e{label}" for label in labels[:4]]


def test_without_a_seed_the_order_is_the_source_order():
    got = list(prefetch(list(range(10)), options=workers(3), mp_context="fork"))
    assert got == list(range(10))


@pytest.mark.parametrize(
    "source",
    [list(range(7)), np.arange(7), MapStyleDataset()],
    ids=["list", "numpy", "map-style dataset"],
)
def test_random_access_sources(source):
    transform = None if isinstance(source, MapStyleDataset) else (lambda x: np.arange(3) + x)
    got = list(prefetch(source, transform, options=workers(2), mp_context="fork"))
    assert [g.tolist() for g in got] == [list(range(i, i + 3)) for i in range(7)]
    assert all(type(g) is SharedMemoryArray for g in got)


def test_grain_map_dataset_source():
    grain = pytest.importorskip(
        "grain", reason="needs Grain: pip install 'grain_shm[compare]' (none for free-threaded Python)")
    dataset = grain.MapDataset.range(6).map(lambda i: np.full(2, i))
    # Plain lists: Grain's datasets keep the frame that made them alive
    # until the next garbage collection, and arrays in it with them.
    got = [g.tolist() for g in prefetch(dataset, batch_size=3, options=workers(2),
                                        mp_context="fork")]
    assert got == [[[0, 0], [1, 1], [2, 2]], [[3, 3], [4, 4], [5, 5]]]


# -- Batches


def test_batches_are_shared_memory_the_consumer_owns():
    before = own_entries()
    batches = list(prefetch(list(range(6)), record, batch_size=3, options=workers(2),
                            mp_context="fork", recycle=False))  # a segment per array
    first = batches[0]
    assert type(first["image"]) is SharedMemoryArray and type(first["label"]) is SharedMemoryArray
    np.testing.assert_array_equal(first["image"], np.stack([record(i)["image"] for i in range(3)]))
    assert first["label"].tolist() == [0, 1, 2]
    assert first["name"] == ["e0", "e1", "e2"]  # strings travel pickled, as a list
    assert first["image"]._unlink_on_del  # owned here: it goes when the batch does
    assert len(own_entries() - before) == 4  # two batches of two array leaves
    del batches, first
    assert own_entries() - before == set()


@pytest.mark.parametrize("drop_remainder, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_last_short_batch_kept_or_dropped(drop_remainder, sizes):
    got = prefetch(np.arange(10), batch_size=4, drop_remainder=drop_remainder,
                   options=workers(2), mp_context="fork")
    assert [len(batch) for batch in got] == sizes


def test_elements_of_a_batch_must_match():
    with pytest.raises(ValueError, match="shape"):
        list(prefetch([np.zeros(2), np.zeros(3)], batch_size=2, options=workers(1),
                      mp_context="fork"))


def test_in_process_run_gives_plain_arrays():
    (batch,) = prefetch(list(range(3)), record, batch_size=3)
    assert type(batch["image"]) is np.ndarray


# -- The buffer bound


@pytest.mark.parametrize("num_workers, buffer_size", [(1, 1), (2, 3)])
def test_each_worker_holds_at_most_its_buffer_ahead(tmp_path, num_workers, buffer_size):
    import functools

    path = tmp_path / "made"
    path.touch()
    transform = functools.partial(log_production, str(path))
    bound = 1 + num_workers * buffer_size  # one taken, then full buffers

    def made():
        return len(path.read_text().split())

    with prefetch(list(range(100)), transform, options=workers(num_workers, buffer_size),
                  mp_context="fork") as stream:
        next(stream)
        deadline = time.monotonic() + 30
        while made() < bound and time.monotonic() < deadline:
            time.sleep(0.01)
        assert made() == bound
        time.sleep(0.3)  # time enough to overrun, if it could
        assert made() == bound
        next(stream)
        deadline = time.monotonic() + 30
        while made() < bound + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert made() == bound + 1


# -- Profiling


def test_profiling_logs_per_worker_figures(caplog):
    caplog.set_level(logging.INFO, logger="grain_shm.prefetch")
    list(prefetch(list(range(8)), record, batch_size=2, options=workers(2, 1, True),
                  mp_context="fork"))
    text = caplog.text
    for figure in ("prefetch worker 0", "prefetch worker 1", "elements/s", "MB/s",
                   "in transform", "blocked on a full buffer", "consumer at the end",
                   "waiting for data"):
        assert figure in text
    assert all(r.name == "grain_shm.prefetch" for r in caplog.records)


def test_profiling_needs_workers():
    with pytest.raises(ValueError, match="num_workers"):
        prefetch(list(range(3)), options=MultiprocessingOptions(0, 1, True))


# -- Checkpoints


@pytest.mark.parametrize("before, after", [(2, 0), (0, 3), (3, 1)])
def test_state_resumes_at_the_next_batch_with_other_workers(reference, before, after):
    first = prefetch(list(range(11)), record, options=workers(before), mp_context="fork",
                     **STREAM)
    with first:
        taken = [next(first) for _ in range(3)]
        state = json.loads(json.dumps(first.get_state()))
    assert as_lists(taken) == reference[:3]
    resumed = prefetch(list(range(11)), record, options=workers(after), mp_context="fork",
                       **STREAM)
    resumed.set_state(state)
    assert as_lists(resumed) == reference[3:]


def test_state_from_other_arguments_is_refused():
    state = prefetch(list(range(11)), batch_size=4).get_state()
    other = prefetch(list(range(11)), batch_size=5)
    with pytest.raises(ValueError, match="batch_size=4"):
        other.set_state(state)


def test_set_state_while_running_releases_what_was_prefetched():
    before = own_entries()
    with prefetch(np.arange(40), batch_size=2, options=workers(2, 4), mp_context="fork") as stream:
        next(stream)
        time.sleep(0.2)  # buffers fill
        stream.set_state({**stream.get_state(), "next_index": 10})
        assert next(stream).tolist() == [20, 21]
    assert own_entries() - before == set()


# -- Shards


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_shards_see_every_element_once_per_epoch(shuffle_seed):
    seen = []
    for shard in range(3):
        seen += list(prefetch(list(range(10)), shuffle_seed=shuffle_seed, num_epochs=2,
                              shard_index=shard, shard_count=3))
    assert sorted(seen) == sorted(list(range(10)) * 2)
    shard_0 = list(prefetch(list(range(10)), shard_index=0, shard_count=3))
    assert shard_0 == [0, 1, 2, 3]  # contiguous parts, the first ones one longer


# -- Failures


def test_transform_error_is_raised_at_its_position_with_the_worker_traceback():
    before = own_entries()
    got = []
    with pytest.raises(ValueError, match="element 5 is bad") as error:
        for value in prefetch(list(range(20)), fail_at_five, options=workers(2, 2),
                              mp_context="fork"):
            got.append(int(value[0]))
    assert got == [0, 1, 2, 3, 4]
    assert "fail_at_five" in str(error.value.__cause__)  # the worker's traceback
    assert "prefetch worker 1, at element 5" in "".join(getattr(error.value, "__notes__", [""]))
    assert multiprocessing.active_children() == []
    del got, value
    assert own_entries() - before == set()


def test_in_process_transform_error_is_the_same_error():
    with pytest.raises(ValueError, match="element 5 is bad"):
        list(prefetch(list(range(20)), fail_at_five))


def test_an_exception_that_does_not_pickle_arrives_as_its_own_type():
    # Rebuilt from what of it pickles (tests/test_prefetch_messages.py).
    with pytest.raises(Unpicklable, match="cannot travel") as error:
        list(prefetch(list(range(5)), fail_unpicklably, options=workers(2), mp_context="fork"))
    assert "fail_unpicklably" in str(error.value.__cause__)


def with_a_lambda(i):
    return {"x": np.zeros(2), "f": (lambda: i) if i == 3 else None}


def test_a_leaf_that_does_not_pickle_is_an_error_at_its_position():
    got = []
    with pytest.raises(Exception, match="lambda") as error:
        for value in prefetch(list(range(6)), with_a_lambda, options=workers(2),
                              mp_context="fork"):
            got.append(value["f"])
    assert got == [None, None, None]
    assert "prefetch worker 1, at element 3" in str(error.value) + "".join(
        getattr(error.value, "__notes__", [""]))
    del value


def test_killed_worker_is_an_error_naming_it_and_the_signal_within_a_second():
    proc = run_python(
        """
        import multiprocessing, os, signal, time
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch

        def slow(i):
            time.sleep(0.02)
            return np.full(1024, i, np.float32)

        if __name__ == "__main__":
            stream = prefetch(range(10**6), slow, num_epochs=None,
                              options=MultiprocessingOptions(2, 2))
            next(stream)
            victim = multiprocessing.active_children()[0].pid
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            try:
                for _ in stream:
                    pass
            except RuntimeError as error:
                print(f"{time.monotonic() - killed:.3f}", victim, error)
            print("children:", len(multiprocessing.active_children()))
        """,
        # A session of its own: what a SIGKILLed worker held (an array being
        # made, its pool arena) is its session reaper's to remove, at its end.
        env={"GRAIN_SHM_SESSION": ""},
        timeout=60,
    )
    seconds, pid, message = proc.stdout.split(" ", 2)
    assert float(seconds) < 1.0
    assert f"(pid {pid}) was killed by signal SIGKILL" in message
    assert "prefetch worker" in message
    assert "children: 0" in proc.stdout


LEAVE_EARLY = """
    import gc, multiprocessing, os, time, sys
    import numpy as np
    from grain_shm import MultiprocessingOptions, prefetch, session

    def image(i):
        return np.full((64, 1024), i, np.float32)

    def ours():
        return {n for n in os.listdir("/dev/shm") if n.startswith(session.name_prefix())}

    def gone_after(started):
        while multiprocessing.active_children() and time.monotonic() < started + 10:
            time.sleep(0.005)
        return time.monotonic() - started

    def stream():
        s = prefetch(range(1000), image, batch_size=4,
                     options=MultiprocessingOptions(2, 4), mp_context=sys.argv[1])
        next(s)
        time.sleep(0.5)  # the buffers fill: batches are in flight
        return s

    if __name__ == "__main__":
        before = ours()
        s = stream()
        started = time.monotonic(); s.close()
        print("close", gone_after(started), len(ours() - before))

        with stream() as s:
            started = time.monotonic()
        print("with", gone_after(started), len(ours() - before))

        s = stream()
        started = time.monotonic(); del s
        print("del", gone_after(started), len(ours() - before))

        for batch in prefetch(range(1000), image, batch_size=4,
                              options=MultiprocessingOptions(2, 4), mp_context=sys.argv[1]):
            time.sleep(0.5)
            started = time.monotonic()
            break
        print("break", gone_after(started), len(ours() - before) - 1)  # `batch` is held
        del batch
        print("end", len(ours() - before))
"""


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_leaving_early_stops_workers_within_a_second_and_releases_everything(context):
    proc = run_python(LEAVE_EARLY, timeout=90, args=(context,))
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["close", "with", "del", "break", "end"]
    for line in lines[:4]:
        how, seconds, left = line.split()
        assert float(seconds) < 1.0, line
        assert left == "0", line
    assert lines[4] == "end 0"
    assert proc.stderr == ""


def test_ctrl_c_in_the_consumer_stops_everything():
    script = textwrap.dedent(
        """
        import multiprocessing, os, sys, time
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch, session

        def image(i):
            return np.full((64, 1024), i, np.float32)

        def ours():
            return {n for n in os.listdir("/dev/shm") if n.startswith(session.name_prefix())}

        if __name__ == "__main__":
            before = ours()
            try:
                for n, batch in enumerate(prefetch(range(10**6), image, batch_size=4,
                                                  num_epochs=None,
                                                  options=MultiprocessingOptions(2, 4))):
                    if n == 0:
                        print("ready", flush=True)
                    time.sleep(0.01)
            except KeyboardInterrupt:
                started = time.monotonic()
                del batch
                while multiprocessing.active_children() and time.monotonic() < started + 10:
                    time.sleep(0.005)
                print("stopped", time.monotonic() - started, len(ours() - before))
        """
    )
    with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ctrl_c_{os.getpid()}.py"),
              "w") as f:
        f.write(script)
    try:
        child = subprocess.Popen([sys.executable, f.name], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(0.3)
            os.killpg(child.pid, signal.SIGINT)  # as a terminal does: to every process
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        os.unlink(f.name)
    how, seconds, left = out.split()
    assert how == "stopped" and float(seconds) < 1.0 and left == "0"
    assert err == ""


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_what_cannot_be_pickled_is_a_type_error_before_any_worker_starts(context):
    with pytest.raises(TypeError, match="transform cannot be pickled"):
        prefetch(list(range(4)), lambda x: x, options=workers(2), mp_context=context)

    class Local(MapStyleDataset):
        pass

    with pytest.raises(TypeError, match="source cannot be pickled"):
        prefetch(Local(), options=workers(2), mp_context=context)
    assert multiprocessing.active_children() == []


def test_what_cannot_be_pickled_is_fine_under_fork():
    got = list(prefetch(list(range(3)), lambda x: x * 2, options=workers(2), mp_context="fork"))
    assert got == [0, 2, 4]


# -- Start methods and the pool


@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork"])
def test_every_start_method_gives_the_same_stream(reference, context):
    got = prefetch(list(range(11)), record, options=workers(2), mp_context=context, **STREAM)
    assert as_lists(got) == reference


def test_with_the_pool_on_batches_are_the_same():
    proc = run_python(
        """
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch

        def row(i):
            return np.full(1024, i, np.float32)

        if __name__ == "__main__":
            for _ in range(3):
                for n, batch in enumerate(prefetch(range(64), row, batch_size=8,
                                                   options=MultiprocessingOptions(2, 2))):
                    assert batch[:, 0].tolist() == list(range(8 * n, 8 * n + 8)), batch[:, 0]
            print("ok")
        """,
        env={"GRAIN_SHM_RECYCLE": "1"},
        timeout=60,
    )
    assert proc.stdout == "ok\n"


def test_public_names():
    import grain_shm

    assert grain_shm.prefetch is prefetch and grain_shm.Prefetcher is Prefetcher
    assert {"prefetch", "Prefetcher"} <= set(grain_shm.__all__)

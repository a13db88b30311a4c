"""The prefetcher's channel: a grain_shm.Queue per worker, bounded to its
buffer, gone with the run; a worker killed in the middle of a put is an
error naming it, never a consumer waiting for ever; the old pipe channel
still selectable for the bench (GRAIN_SHM_PREFETCH_CHANNEL=pipe)."""

import numpy as np
from conftest import own_entries, run_python

from grain_shm import MultiprocessingOptions, _shm, prefetch
from grain_shm.names import is_queue


def record(i):
    return {"image": np.full((2, 3), i, np.float32), "label": i}


def own_rings():
    return {name for name in own_entries() if is_queue(name)}


def test_each_worker_hands_its_items_over_through_a_queue_of_its_buffer_gone_after_close(
        monkeypatch):
    monkeypatch.delenv("GRAIN_SHM_PREFETCH_CHANNEL", raising=False)  # a run of the suite on pipes
    before = own_rings()
    with prefetch(list(range(20)), record, options=MultiprocessingOptions(2, 3),
                  mp_context="fork") as stream:
        got = [int(next(stream)["label"])]
        rings = own_rings() - before
        capacities = sorted(_shm.ring_open(name).capacity for name in rings)
        got += [int(element["label"]) for element in stream]
    assert got == list(range(20))
    assert capacities == [3, 3]  # one ring per worker, per_worker_buffer_size its bound
    assert own_rings() & rings == set()


def test_a_run_stopped_early_drains_its_queues_and_unlinks_them():
    before = own_entries()
    with prefetch(list(range(100)), record, options=MultiprocessingOptions(2, 4),
                  mp_context="fork") as stream:
        next(stream)
        assert stream._workers.channels[1].poll(30)  # worker 1 has items in its queue
    assert own_entries() - before == set()  # the items in flight, and the rings, are gone


def test_the_old_pipe_channel_stays_selectable_for_the_bench(monkeypatch):
    monkeypatch.setenv("GRAIN_SHM_PREFETCH_CHANNEL", "pipe")
    before = own_rings()
    with prefetch(list(range(10)), record, options=MultiprocessingOptions(2, 2),
                  mp_context="fork") as stream:
        got = [int(next(stream)["label"])]
        rings = own_rings() - before
        got += [int(element["label"]) for element in stream]
    assert got == list(range(10))
    assert rings == set()


def test_a_worker_killed_in_the_middle_of_a_put_is_an_error_naming_it():
    """The worker claims its queue's next cell, as a put does, and is
    SIGKILLed before it publishes: the consumer takes what came before, then
    raises naming the dead worker (it never waits on the claimed cell), and
    the ring is unlinked when the stream closes, though the dead worker's
    handle was never given back."""
    proc = run_python(
        """
        import os, signal
        import numpy as np
        from grain_shm import MultiprocessingOptions, prefetch, queue, session
        from grain_shm.names import is_queue, SHM_DIR

        def dies_in_a_put(i):
            if i == 3:
                (mine,) = list(queue._live)  # forked from a consumer of one queue: its own
                assert mine._ring._claim_and_abandon(False)
                os.kill(os.getpid(), signal.SIGKILL)
            return np.full(4, i)

        if __name__ == "__main__":
            got = []
            stream = prefetch(list(range(10)), dies_in_a_put,
                              options=MultiprocessingOptions(1, 8), mp_context="fork")
            with stream:
                try:
                    for element in stream:
                        got.append(int(element[0]))
                except RuntimeError as error:
                    print(got, error)
            rings = [name for name in os.listdir(SHM_DIR)
                     if name.startswith(session.name_prefix()) and is_queue(name)]
            print("rings left:", len(rings))
        """,
        # A session of its own: the killed worker's pool arena is its reaper's.
        env={"GRAIN_SHM_SESSION": "", "GRAIN_SHM_PREFETCH_CHANNEL": "queue"},
        timeout=60,
    )
    first, _, rest = proc.stdout.partition("\n")
    assert first.startswith("[0, 1, 2] prefetch worker 0 (pid "), proc.stdout + proc.stderr
    assert "was killed by signal SIGKILL; the consumer was waiting for item 3" in first
    assert rest.strip() == "rings left: 0"


def test_waiting_for_room_claims_nothing_and_sees_a_get_free_a_cell():
    """The worker's wait for room (before it makes an item) is true exactly
    when its next put would not wait, and takes no cell: the queue's items
    and order are as if it had not been called."""
    import threading

    from grain_shm import Queue

    queue = Queue(2)
    try:
        assert queue._wait_room(0.0)
        queue.put("a")
        assert queue._wait_room(0.0) and queue.qsize() == 1
        queue.put("b")
        assert not queue._wait_room(0.0)
        assert not queue._wait_room(0.01)
        taker = threading.Timer(0.05, queue.get)  # frees a cell while the wait sleeps
        taker.start()
        assert queue._wait_room(30.0)
        taker.join()
        queue.put("c", block=False)
        assert [queue.get(block=False), queue.get(block=False)] == ["b", "c"]
    finally:
        queue.close()

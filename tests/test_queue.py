"""grain_shm.Queue behaves as multiprocessing.Queue: the cases of CPython's
Lib/test/_test_multiprocessing.py (_TestQueue) that apply, ported, and what
the ring adds (arrays as references, items larger than a cell, the byte
bound, the segment's lifetime)."""

import multiprocessing as mp
import os
import pickle
import queue as pyqueue
import sys
import time

import numpy as np
import pytest

import grain_shm
from grain_shm import SharedMemoryArray
from grain_shm.names import SHM_DIR

from conftest import run_python

Queue = grain_shm.Queue
FORK = mp.get_context("fork")


def segment_exists(queue_or_name):
    name = queue_or_name if isinstance(queue_or_name, str) else queue_or_name.name
    return os.path.exists(os.path.join(SHM_DIR, name))


# ---- CPython's _TestQueue, ported ----

def _consume_six(queue, child_can_start, parent_can_continue):
    child_can_start.wait()
    for _ in range(6):
        queue.get()
    parent_can_continue.set()


def test_put():
    queue = Queue(maxsize=6)
    child_can_start, parent_can_continue = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_consume_six, args=(queue, child_can_start, parent_can_continue))
    proc.start()
    assert queue.empty() and not queue.full()
    queue.put(1)
    queue.put(2, True)
    queue.put(3, True, None)
    queue.put(4, False)
    queue.put(5, False, None)
    queue.put_nowait(6)
    assert not queue.empty() and queue.full() and queue.qsize() == 6
    with pytest.raises(pyqueue.Full):
        queue.put(7, False)
    with pytest.raises(pyqueue.Full):
        queue.put(7, False, None)
    with pytest.raises(pyqueue.Full):
        queue.put_nowait(7)
    with pytest.raises(pyqueue.Full):
        queue.put(7, True, 0.1)
    with pytest.raises(pyqueue.Full):
        queue.put(7, False, 10)  # not blocking: the timeout does not count
    with pytest.raises(pyqueue.Full):
        queue.put(7, True, timeout=0.1)
    child_can_start.set()
    parent_can_continue.wait()
    assert queue.empty() and not queue.full()
    proc.join()
    queue.close()


def _put_four(queue, child_can_start, parent_can_continue):
    child_can_start.wait()
    for item in (2, 3, 4, 5):
        queue.put(item)
    parent_can_continue.set()


def test_get():
    queue = Queue()
    child_can_start, parent_can_continue = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_put_four, args=(queue, child_can_start, parent_can_continue))
    proc.start()
    assert queue.empty()
    child_can_start.set()
    parent_can_continue.wait()
    assert not queue.empty()  # put returned: the item is in the ring, no feeder thread
    assert queue.get(True, None) == 2
    assert queue.get(True) == 3
    assert queue.get(timeout=1) == 4
    assert queue.get_nowait() == 5
    assert queue.empty()
    with pytest.raises(pyqueue.Empty):
        queue.get(False)
    with pytest.raises(pyqueue.Empty):
        queue.get(False, None)
    with pytest.raises(pyqueue.Empty):
        queue.get_nowait()
    with pytest.raises(pyqueue.Empty):
        queue.get(True, 0.1)
    with pytest.raises(pyqueue.Empty):
        queue.get(False, 10)
    with pytest.raises(pyqueue.Empty):
        queue.get(timeout=0.1)
    proc.join()
    queue.close()


def _put_ten_to_twenty(queue):
    for i in range(10, 20):
        queue.put(i)


def test_fork():
    queue = Queue()
    for i in range(10):
        queue.put(i)
    proc = FORK.Process(target=_put_ten_to_twenty, args=(queue,))
    proc.start()
    assert [queue.get() for _ in range(20)] == list(range(20))
    with pytest.raises(pyqueue.Empty):
        queue.get(False)
    proc.join()
    queue.close()


def test_qsize():
    queue = Queue()
    assert queue.qsize() == 0
    queue.put(1)
    assert queue.qsize() == 1
    queue.put(5)
    assert queue.qsize() == 2
    queue.get()
    assert queue.qsize() == 1
    queue.get()
    assert queue.qsize() == 0
    queue.close()


def test_timeout():
    queue = Queue()
    start = time.monotonic()
    with pytest.raises(pyqueue.Empty):
        queue.get(True, 0.2)
    assert time.monotonic() - start >= 0.19  # waited (at least) as long as asked
    queue.close()


def test_no_import_lock_contention(tmp_path):
    (tmp_path / "imported_by_an_imported_module.py").write_text(
        "import grain_shm\n"
        "q = grain_shm.Queue()\n"
        "q.put('knock knock')\n"
        "q.get(timeout=3)\n"
        "q.close()\n"
        "del q\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        __import__("imported_by_an_imported_module")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("imported_by_an_imported_module", None)


class NotSerializable:
    def __reduce__(self):
        raise AttributeError("not serializable")


def test_an_unpicklable_item_raises_in_put_and_the_queue_goes_on():
    """multiprocessing's feeder thread prints the error and drops the item;
    here put itself raises (there is no thread), and nothing is left half-put."""
    queue = Queue(maxsize=1)
    with pytest.raises(AttributeError):
        queue.put(NotSerializable())
    assert queue.empty()
    queue.put(True)
    assert queue.qsize() == 1
    assert queue.get(timeout=10) is True
    assert queue.empty()
    queue.close()


def test_closed_queue_put_get_exceptions():
    queue = Queue()
    queue.close()
    with pytest.raises(ValueError, match="is closed"):
        queue.put("foo")
    with pytest.raises(ValueError, match="is closed"):
        queue.get()
    with pytest.raises(ValueError, match="is closed"):
        pickle.dumps(queue)
    queue.join_thread()
    queue.cancel_join_thread()


def test_join_thread_wants_close_first():
    queue = Queue()
    with pytest.raises(AssertionError, match="not closed"):
        queue.join_thread()
    queue.close()


# ---- Passing a Queue to other processes ----

def _echo(inbox, outbox):
    for item in iter(inbox.get, None):
        outbox.put((os.getpid(), item))


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_a_queue_is_a_process_argument_under_every_start_method(method):
    ctx = mp.get_context(method)
    inbox, outbox = Queue(), Queue()
    proc = ctx.Process(target=_echo, args=(inbox, outbox))
    proc.start()
    for item in ("a", 2, {"three": [3]}):
        inbox.put(item)
    inbox.put(None)
    got = [outbox.get(timeout=60) for _ in range(3)]
    assert [item for _, item in got] == ["a", 2, {"three": [3]}]
    assert {pid for pid, _ in got} == {proc.pid}
    proc.join(60)
    assert proc.exitcode == 0
    inbox.close()
    outbox.close()


def _answer_through_a_queue_it_was_sent(mailbox):
    reply = mailbox.get(timeout=60)  # a Queue, pickled by name into another Queue
    reply.put("pong")


def test_a_queue_pickles_through_another_queue():
    mailbox = Queue()
    proc = mp.get_context("spawn").Process(target=_answer_through_a_queue_it_was_sent,
                                           args=(mailbox,))
    proc.start()
    reply = Queue(1)
    mailbox.put(reply)
    assert reply.get(timeout=60) == "pong"
    proc.join(60)
    assert proc.exitcode == 0


def _report_size(inbox, outbox):
    outbox.put(inbox.qsize())


def test_a_queue_dropped_right_after_start_still_reaches_the_child():
    """multiprocessing deletes a Process's args at start(): the count the
    pickle took keeps the segment until the child has opened it."""
    outbox = Queue()
    inbox = Queue()
    inbox.put("waiting")
    proc = mp.get_context("spawn").Process(target=_report_size, args=(inbox, outbox))
    del inbox
    proc.start()  # the inbox's only handle in this process goes now
    assert outbox.get(timeout=60) == 1
    proc.join(60)
    assert proc.exitcode == 0
    outbox.close()


# ---- Many producers and consumers ----

def _produce(queue, producer, count):
    for seq in range(count):
        queue.put((producer, seq))


def _consume(queue, results):
    got = []
    for item in iter(queue.get, None):
        got.append(item)
    results.put(got)  # one message: multiprocessing's own queue


def test_exactly_once_and_in_order_with_four_producers_and_four_consumers():
    queue = Queue(maxsize=16)
    results = FORK.Queue()
    count = 2000
    consumers = [FORK.Process(target=_consume, args=(queue, results)) for _ in range(4)]
    producers = [FORK.Process(target=_produce, args=(queue, p, count)) for p in range(4)]
    for proc in consumers + producers:
        proc.start()
    for proc in producers:
        proc.join(120)
        assert proc.exitcode == 0
    for _ in consumers:
        queue.put(None)
    per_consumer = [results.get(timeout=120) for _ in consumers]
    for proc in consumers:
        proc.join(60)
    everything = [item for got in per_consumer for item in got]
    assert sorted(everything) == [(p, s) for p in range(4) for s in range(count)]
    for got in per_consumer:  # each producer's items in the order it put them
        for p in range(4):
            seqs = [s for q, s in got if q == p]
            assert seqs == sorted(seqs)
    queue.close()


def test_put_many_and_get_many():
    queue = Queue(maxsize=8)
    queue.put_many(range(5))
    assert queue.get_many(3) == [0, 1, 2]
    assert queue.get_many(10) == [3, 4]
    with pytest.raises(pyqueue.Empty):
        queue.get_many(2, timeout=0.05)
    with pytest.raises(pyqueue.Empty):
        queue.get_many(2, block=False)
    with pytest.raises(ValueError):
        queue.get_many(0)
    queue.close()


# ---- What travels, and who owns it ----

def _same_as_pickle(received, sent):
    """What a multiprocessing.Queue delivers: pickle.loads(pickle.dumps(x))."""
    expected = pickle.loads(pickle.dumps(sent))
    assert type(received) is type(expected)
    if isinstance(expected, np.ndarray):
        assert received.shape == expected.shape and received.dtype == expected.dtype
        assert received.strides == expected.strides
        np.testing.assert_array_equal(received, expected)
        if isinstance(expected, SharedMemoryArray):
            assert not received._unlink_on_del and not expected._unlink_on_del
    elif isinstance(expected, dict):
        assert received.keys() == expected.keys()
        for key in expected:
            _same_as_pickle(received[key], sent[key])
    elif isinstance(expected, (list, tuple)):
        assert len(received) == len(expected)
        for r, s in zip(received, sent):
            _same_as_pickle(r, s)
    else:
        assert received == expected


def test_arrays_arrive_as_pickle_would_deliver_them():
    queue = Queue()
    a = SharedMemoryArray((6, 5), np.float32)
    a[:] = np.arange(30).reshape(6, 5)
    a.unlink_on_del()
    b = SharedMemoryArray((7,), np.dtype(">i4"))  # not native: pickled, same result
    b[:] = 3
    b.unlink_on_del()
    empty = SharedMemoryArray((0,), np.int8)
    empty.unlink_on_del()
    items = [
        a,
        a[1:4, ::2],          # a strided view
        a[::-1],              # negative strides
        a[2],                 # a row
        a.copy(),             # a private copy: its bytes
        b,
        {"x": a, "nested": [a[0], (a[:, 1], "text")], "n": 3},
        np.arange(5),         # a plain ndarray: its bytes
        empty,
    ]
    for item in items:
        queue.put(item)
    for item in items:
        _same_as_pickle(queue.get(timeout=10), item)
    received = []
    queue.put(a)
    received.append(queue.get())
    received[0][0, 0] = 99  # the same memory, not a copy
    assert a[0, 0] == 99
    queue.close()


def test_an_array_put_then_unlinked_is_gone_as_with_pickle():
    queue = Queue()
    a = SharedMemoryArray((4,), np.int64)
    a.unlink_on_del()
    queue.put(a)
    del a  # the owner unlinked it before the get: as a pickled reference would
    with pytest.raises(FileNotFoundError):
        queue.get(timeout=10)
    queue.close()


@pytest.mark.parametrize("size", [497, 100_000, 3_000_000])
def test_an_item_larger_than_a_cell(size):
    queue = Queue(maxsize=2)
    payload = os.urandom(size)
    array = np.frombuffer(os.urandom(size), np.uint8)
    queue.put(payload)
    queue.put({"array": array, "bytes": payload})
    assert queue.get(timeout=10) == payload
    got = queue.get(timeout=10)
    assert got["bytes"] == payload and np.array_equal(got["array"], array)
    queue.close()  # nothing left behind: conftest checks /dev/shm


def test_large_items_left_in_the_queue_go_with_its_last_handle():
    queue = Queue(maxsize=3)
    for _ in range(3):
        queue.put(os.urandom(10_000))
    name = queue.name
    queue.close()
    assert not segment_exists(name)  # and their blocks: conftest checks


def test_the_byte_bound_holds_large_items_back():
    queue = Queue(maxsize=4, max_bytes=50_000)
    queue.put(os.urandom(40_000))
    with pytest.raises(pyqueue.Full):
        queue.put(os.urandom(40_000), timeout=0.1)
    queue.put("small items still go")
    assert len(queue.get()) == 40_000
    queue.put(os.urandom(200_000))  # alone, any size goes
    assert queue.get() == "small items still go"
    assert len(queue.get()) == 200_000
    queue.close()


def test_cell_bytes_sets_what_travels_inline():
    queue = Queue(maxsize=2, cell_bytes=4000)
    assert queue._ring.cell_bytes >= 4000
    queue.put(b"x" * 3900)
    assert queue._ring.large_bytes() == 0  # inline, not through a block
    assert queue.get() == b"x" * 3900
    queue.close()


# ---- The segment's lifetime ----

def test_the_last_handle_unlinks_the_segment():
    queue = Queue()
    other = pickle.loads(pickle.dumps(queue))
    name = queue.name
    queue.close()
    assert segment_exists(name)  # `other` holds it
    other.put(1)
    assert other.get() == 1
    del other
    assert not segment_exists(name)


def test_a_queue_dropped_without_close_is_unlinked():
    queue = Queue()
    name = queue.name
    del queue
    assert not segment_exists(name)


def test_a_forked_child_holds_its_own_handle():
    queue = Queue()
    name = queue.name
    pid = os.fork()
    if pid == 0:  # the child: the parent closes first, the child still works
        try:
            time.sleep(0.2)
            queue.put("from the child")
            os._exit(0)
        except BaseException:
            os._exit(1)
    queue.close()
    assert segment_exists(name)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    # The child left through os._exit, skipping every exit hook: its handle
    # stays counted, and the session removes the segment (here: by hand).
    os.unlink(os.path.join(SHM_DIR, name))


def test_a_spawned_child_releases_its_handle_at_exit():
    queue = Queue()
    name = queue.name
    proc = mp.get_context("spawn").Process(target=_put_ten_to_twenty, args=(queue,))
    proc.start()
    proc.join(60)
    assert [queue.get(timeout=10) for _ in range(10)] == list(range(10, 20))
    queue.close()
    assert not segment_exists(name)


def test_import_grain_shm_does_not_load_the_queue():
    probe = "import sys, grain_shm; print('grain_shm.queue' in sys.modules, 'threading' in sys.modules)"
    out = run_python(probe).stdout.split()
    assert out == ["False", "False"]


@pytest.fixture
def pool_on():
    from grain_shm import _shm

    limit = _shm.pool_stats()["max_bytes"]
    SharedMemoryArray.enable_recycling(64 << 20)
    yield
    if limit:
        SharedMemoryArray.enable_recycling(limit)
    else:
        SharedMemoryArray._disable_recycling()


def test_a_pooled_array_arrives_as_unpickling_gives_it(pool_on):
    """The pool's hot path (a block's reference opened without array._map)
    gives what pickle.loads gives: the same block, one more reference, not owned."""
    from _names import references

    queue = Queue()
    a = SharedMemoryArray((32, 4), np.int16)
    a[:] = 5
    a.unlink_on_del()
    assert a.metadata.block is not None
    queue.put(a)
    got = queue.get()
    by_pickle = pickle.loads(pickle.dumps(a))
    assert type(got) is SharedMemoryArray and got.metadata == by_pickle.metadata
    assert got.flags.writeable and got.flags.c_contiguous
    assert not got._unlink_on_del
    assert references(a) == 3  # a, got, by_pickle
    got[0, 0] = 7
    assert a[0, 0] == 7
    del got, by_pickle
    assert references(a) == 1
    queue.close()

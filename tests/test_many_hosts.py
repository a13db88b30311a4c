"""Many hosts under a real launcher: torchrun, 2 nodes simulated on this machine.

Two `torchrun --nnodes 2 --node_rank R --nproc_per_node 1` processes meet
on a free loopback port (static rendezvous, the gloo backend on the CPU);
each node runs tests/many_hosts_node.py: one grain_shm.prefetch on its
shard (shard_index = rank, shard_count = world size), all_gather of the
ids, and resumes from checkpoints taken mid-stream. One launch serves every
test here (starting torch four times costs seconds); each test judges one
promise from what the nodes wrote.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import own_entries

import many_hosts_node as node

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed: these tests launch torchrun "
    "(pip install torch==2.13.0 takes the CPU build)",
)

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = 2
LAUNCH_TIMEOUT = 180.0  # seconds for both nodes, torch's start-up included


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(node_rank, port, out_dir):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES),
         "--node_rank", str(node_rank), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port),
         os.path.join(HERE, "many_hosts_node.py"), out_dir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,  # its own process group: killed whole on a timeout
    )


def launch(out_dir):
    """Both nodes to the end; their output, and whether the port was taken
    between free_port() and torchrun's bind (then the caller tries again)."""
    port = free_port()
    nodes = [torchrun(rank, port, out_dir) for rank in range(NODES)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for proc in nodes:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT:.0f} s")
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    failed = [(r, p.returncode, out) for r, (p, out) in enumerate(zip(nodes, outputs))
              if p.returncode != 0]
    port_taken = any("address already in use" in out.lower() for _, _, out in failed)
    return failed, port_taken


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """What each node wrote ({rank: record}), and the session's /dev/shm
    entries that the launch left behind (judged by its own test: this
    fixture is set up before the per-test leak check starts)."""
    before = own_entries()
    for _ in range(3):  # a port taken between free_port() and torchrun: another one
        out_dir = str(tmp_path_factory.mktemp("nodes"))
        failed, port_taken = launch(out_dir)
        if not port_taken:
            break
    for rank, code, output in failed:
        pytest.fail(f"node {rank}: torchrun exit status {code}\n{output}")
    records = {}
    for rank in range(NODES):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            records[rank] = json.load(f)
    deadline = time.monotonic() + 5.0
    while (own_entries() - before) and time.monotonic() < deadline:
        time.sleep(0.05)  # the nodes' exits settle
    return records, sorted(own_entries() - before)


def shard(rank):
    """Grain's even split: contiguous parts, the first ones one longer."""
    base, extra = divmod(node.NUM_ELEMENTS, NODES)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def epochs(items, rank):
    """A node's stream of batches, flattened and cut into its epochs."""
    flat = [i for batch in items for i in batch]
    size = len(shard(rank))
    assert len(flat) == size * node.NUM_EPOCHS
    return [flat[e * size:(e + 1) * size] for e in range(node.NUM_EPOCHS)]


def assert_every_element_once_per_epoch(per_rank_items):
    for epoch in range(node.NUM_EPOCHS):
        seen = [i for rank, items in enumerate(per_rank_items) for i in epochs(items, rank)[epoch]]
        assert sorted(seen) == list(range(node.NUM_ELEMENTS)), f"epoch {epoch}"


def test_each_node_reads_its_own_shard(nodes):
    records, _ = nodes
    for rank, record in records.items():
        assert (record["rank"], record["world"]) == (rank, NODES)
        first, second = epochs(record["items"], rank)
        assert sorted(first) == sorted(second) == list(shard(rank))
        assert first != second  # each epoch its own permutation
        assert [len(batch) for batch in record["items"][:-1]] == [node.BATCH_SIZE] * (
            len(record["items"]) - 1)


def test_every_element_exactly_once_per_epoch_across_nodes(nodes):
    records, _ = nodes
    gathered = records[0]["gathered"]
    assert records[1]["gathered"] == gathered  # both nodes gathered the same
    assert gathered == [records[rank]["items"] for rank in range(NODES)]
    assert_every_element_once_per_epoch(gathered)


def assert_resumes_at(records, position):
    for rank, record in records.items():
        resumed = record["resumed"][str(position)]
        assert "error" not in resumed, f"node {rank}, resumed at {position}: {resumed['error']}"
        assert record["checkpoints"][str(position)]["next_index"] == position
        assert resumed["items"] == record["items"][position:], f"node {rank}"
    stitched = [records[rank]["items"][:position] + records[rank]["resumed"][str(position)]["items"]
                for rank in range(NODES)]
    assert records[0]["gathered_resumed"] == records[1]["gathered_resumed"]
    assert [g[str(position)] for g in records[0]["gathered_resumed"]] == [
        s[position:] for s in stitched]
    assert_every_element_once_per_epoch(stitched)


def test_checkpoint_resumes_on_both_nodes(nodes):
    records, _ = nodes
    assert node.RESUME_AT[0] % node.NUM_WORKERS == 0
    assert_resumes_at(records, node.RESUME_AT[0])


def test_checkpoint_resumes_on_both_nodes_between_workers(nodes):
    """A position that is not a multiple of num_workers: the item after it
    is another worker's than the first (issue 16, item 1)."""
    records, _ = nodes
    assert node.RESUME_AT[1] % node.NUM_WORKERS != 0
    assert_resumes_at(records, node.RESUME_AT[1])


def test_another_nodes_checkpoint_is_refused(nodes):
    records, _ = nodes
    for rank, record in records.items():
        assert record["foreign_state_error"] is not None, f"node {rank} took another's state"
        assert "shard_index" in record["foreign_state_error"]


def test_nodes_leave_dev_shm_clean(nodes):
    _, leaked = nodes
    assert leaked == []

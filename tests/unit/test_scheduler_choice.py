"""Parent choice at scale (scheduler/state.py `_choose`): a decision weighs a bounded draw of
the task's peers with cheap cycle rules, and still never closes a cycle."""

from __future__ import annotations

import random

import pytest

from p2pdist.config import SchedulerConfig
from p2pdist.content.pieces import Bitmap, MiB, PieceLayout
from p2pdist.wire import AnnounceHost, Register, SeedProgress, Sync
from scheduler.state import Scheduler

TASK = "sha256:" + "ef" * 32
URL = "http://origin:5000/v2/lib/x/blobs/" + TASK
SIZE = 256 * MiB
LAYOUT = PieceLayout.for_blob(SIZE)
DIGESTS = [bytes([i % 256]) * 32 for i in range(LAYOUT.count)]


def swarm(peers: int, *, seed: int = 1, **config: object) -> Scheduler:
    """A seed holding every piece and `peers` registered peers holding none."""
    s = Scheduler(SchedulerConfig(**config), rng=random.Random(seed))  # type: ignore[arg-type]
    s.announce(AnnounceHost(host_id="seed", url="http://seed:4000", kind="seed", upload_slots=8), 0.0)
    for i in range(peers):
        s.announce(AnnounceHost(host_id=f"p{i}", url=f"http://p{i}:4000", kind="peer", upload_slots=4), 0.0)
    s.register(Register(host_id="p0", task_id=TASK, url=URL), 1.0)
    s.seed_progress(
        SeedProgress(
            host_id="seed", task_id=TASK, content_length=SIZE, first_digest=0, piece_digests=DIGESTS, done=True
        ),
        1.5,
    )
    for i in range(peers):
        s.register(Register(host_id=f"p{i}", task_id=TASK, url=URL), 2.0)
    return s


def test_bitmap_from_int_is_the_inverse_of_to_int() -> None:
    rng = random.Random(3)
    for size in (1, 7, 8, 9, 256, 300):
        bits = rng.getrandbits(size)
        bitmap = Bitmap.from_int(size, bits)
        assert bitmap.to_int() == bits and bitmap.size == size
        assert Bitmap(size, bitmap.to_bytes()).to_int() == bits
    with pytest.raises(ValueError):
        Bitmap.from_int(8, 1 << 8)


def test_a_sync_reporting_pieces_in_one_batch_holds_exactly_those_in_range() -> None:
    s = swarm(3)
    s.sync(Sync(host_id="p1", task_id=TASK, new_pieces=[0, 5, 5, 63, LAYOUT.count, 10**9]), 3.0)
    peer = s.tasks[TASK].peers["p1"]
    assert peer.pieces is not None and list(peer.pieces) == [0, 5, 63]
    assert peer.bits == (1 | 1 << 5 | 1 << 63) and "p1" in s.tasks[TASK].holders


def test_parents_with_nothing_useful_fill_the_slots_holders_cannot() -> None:
    s = swarm(500, candidate_parents=8)
    reply, _ = s.sync(Sync(host_id="p499", task_id=TASK), 3.0)
    parents = [p.host_id for p in reply.parents]
    assert parents[0] == "seed"  # the only one with something useful
    assert len(parents) == 8 and "p499" not in parents


@pytest.mark.parametrize("seed", [1, 2])
def test_no_cycles_in_a_big_swarm_trading_pieces(seed: int) -> None:
    rng = random.Random(seed)
    s = swarm(300, seed=seed, candidate_parents=4, parent_sample=10)
    task = s.tasks[TASK]
    now = 3.0
    for _ in range(4):
        for i in rng.sample(range(300), 300):
            now += 0.001
            s.sync(Sync(host_id=f"p{i}", task_id=TASK, new_pieces=rng.sample(range(LAYOUT.count), 3)), now)
    graph = {h: list(p.parents) for h, p in task.peers.items()}
    assert all(h not in parents and len(parents) <= 4 for h, parents in graph.items())
    assert sum(1 for parents in graph.values() for p in parents if p != "seed") > 300  # peers trade
    # Acyclic: every parent comes before its child in some order (Kahn's algorithm drains it).
    children: dict[str, list[str]] = {h: [] for h in graph}
    waiting = {h: len(parents) for h, parents in graph.items()}
    for child, parents in graph.items():
        for parent in parents:
            children[parent].append(child)
    ready = [h for h, n in waiting.items() if n == 0]
    drained = 0
    while ready:
        node = ready.pop()
        drained += 1
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    assert drained == len(graph)


def test_the_seed_index_follows_hosts_joining_leaving_and_expiring() -> None:
    s = swarm(2)
    assert set(s.seed_hosts) == {"seed"}
    s.announce(AnnounceHost(host_id="seed2", url="http://seed2:4000", kind="seed", upload_slots=8), 10.0)
    s.announce(AnnounceHost(host_id="p0", url="http://p0:4000", kind="seed", upload_slots=8), 10.0)  # now a seed
    assert set(s.seed_hosts) == {"seed", "seed2", "p0"}
    s.announce(AnnounceHost(host_id="p0", url="http://p0:4000", kind="peer", upload_slots=8), 10.0)  # a peer again
    s.leave_host("seed2", 11.0)
    assert set(s.seed_hosts) == {"seed"}
    s.expire(10_000.0)
    assert s.seed_hosts == {} and s.hosts == {}

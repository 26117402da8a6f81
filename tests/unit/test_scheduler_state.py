"""The scheduler's pure state machine, driven with fixed clocks and a seeded RNG."""

from __future__ import annotations

import random

import msgpack
import pytest

from p2pdist import wire
from p2pdist.config import SchedulerConfig
from p2pdist.content.pieces import Bitmap, MiB, PieceLayout, piece_size_sent
from p2pdist.wire import (
    TASK_STATES,
    AnnounceHost,
    HostKind,
    Leave,
    Register,
    SeedProgress,
    Sync,
    SyncReply,
    TaskHolding,
)
from scheduler.state import Scheduler, WakeSeed

TASK = "sha256:" + "ab" * 32
TASK2 = "sha256:" + "cd" * 32
URL = "http://origin:5000/v2/lib/x/blobs/" + TASK
SIZE = 10 * MiB  # 5 pieces of 2 MiB
LAYOUT = PieceLayout.for_blob(SIZE)
PIECE = LAYOUT.piece_size  # as a node says it (not the old rule's: it is not left out)
DIGESTS = [bytes([i]) * 32 for i in range(LAYOUT.count)]


# Hosts announced here upload at most this: a quarter second of it is 1 MiB, so the tasks they
# ask for first are cut with min_piece_bytes as the floor (a host with no cap gets 4 MiB).
SLOW_UPLOAD = 4 * MiB


def make(**cfg: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), rng=random.Random(7))  # type: ignore[arg-type]


def announce(
    s: Scheduler,
    host: str,
    kind: HostKind = "peer",
    now: float = 0.0,
    slots: int = 4,
    tasks: list[TaskHolding] | None = None,
    upload_rate: int | None = SLOW_UPLOAD,
) -> None:
    s.announce(
        AnnounceHost(
            host_id=host,
            url=f"http://{host}:4000",
            kind=kind,
            upload_slots=slots,
            tasks=tasks or [],
            upload_rate_bps=upload_rate,
        ),
        now,
    )


def register(s: Scheduler, host: str, now: float, task: str = TASK) -> tuple[SyncReply, WakeSeed | None]:
    return s.register(Register(host_id=host, task_id=task, url=URL, headers={"Authorization": "x"}), now)


def progress(
    s: Scheduler,
    seed: str,
    now: float,
    first: int = 0,
    digests: list[bytes] | None = None,
    done: bool = False,
    size: int = SIZE,
    error: str = "",
) -> None:
    digests = DIGESTS[first:] if digests is None else digests
    s.seed_progress(
        SeedProgress(
            host_id=seed,
            task_id=TASK,
            content_length=size,
            first_digest=first,
            piece_digests=digests,
            done=done,
            error=error,
            piece_size=piece_size_sent(size, PieceLayout.for_blob(size).piece_size),
        ),
        now,
    )


def sync(s: Scheduler, host: str, now: float, **kw: object) -> tuple[SyncReply, WakeSeed | None]:
    return s.sync(Sync(host_id=host, task_id=TASK, **kw), now)  # type: ignore[arg-type]


def parent_ids(reply: SyncReply) -> list[str]:
    return [p.host_id for p in reply.parents]


def full_bitmap() -> bytes:
    bm = Bitmap(LAYOUT.count)
    for n in range(LAYOUT.count):
        bm.add(n)
    return bm.to_bytes()


def holding(pieces: bytes | None = None, *, url: str = "", piece_digests: list[bytes] | None = None) -> TaskHolding:
    """What a host announces of TASK in its layout: the whole blob unless `pieces` says otherwise."""
    return TaskHolding(
        task_id=TASK,
        content_length=SIZE,
        piece_size=PIECE,
        pieces=full_bitmap() if pieces is None else pieces,
        url=url,
        piece_digests=piece_digests or [],
    )


def test_first_register_wakes_seed_once() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "p1")
    announce(s, "p2")
    reply, wake = register(s, "p1", 1.0)
    assert wake is not None
    assert wake.seed_id == "seed1" and wake.seed_url == "http://seed1:4000"
    assert wake.trigger.task_id == TASK and wake.trigger.url == URL
    assert wake.trigger.headers == {"Authorization": "x"}
    assert reply.state == "waiting"
    reply2, wake2 = register(s, "p2", 2.0)
    assert wake2 is None
    assert reply2.state == "waiting"
    assert s.counters.seeds_woken == 1


def test_no_seed_means_back_to_source() -> None:
    s = make()
    announce(s, "p1")
    reply, wake = register(s, "p1", 1.0)
    assert wake is None
    assert reply.state == "back_to_source"
    assert reply.reason
    assert s.counters.back_to_source == 1


def test_running_after_seed_progress() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, digests=DIGESTS[:1])
    reply, wake = register(s, "p2", 3.0)
    assert wake is None
    assert reply.state == "running"
    assert reply.content_length == SIZE
    assert reply.piece_size == 2 * MiB
    assert reply.first_digest == 0
    assert reply.piece_digests == DIGESTS[:1]
    assert parent_ids(reply) == ["seed1"]
    seed_bits = Bitmap(LAYOUT.count, reply.parents[0].pieces)
    assert list(seed_bits) == [0]
    assert reply.parents[0].url == "http://seed1:4000"
    # More digests arrive incrementally; the next sync carries only the new ones.
    progress(s, "seed1", 3.5, first=1, digests=DIGESTS[1:])
    reply, _ = sync(s, "p2", 4.0, have_digests=1)
    assert reply.first_digest == 1
    assert reply.piece_digests == DIGESTS[1:]
    reply, _ = sync(s, "p2", 4.0, have_digests=99)
    assert reply.first_digest == len(DIGESTS) and reply.piece_digests == []
    reply, _ = sync(s, "p2", 4.0, have_digests=0)
    assert reply.piece_digests == DIGESTS


def test_sync_before_register_is_unknown() -> None:
    s = make()
    announce(s, "p1")
    reply, wake = sync(s, "p1", 1.0)
    assert reply.state == "unknown" and wake is None


def test_the_scheduler_sends_exactly_the_wire_states() -> None:
    """Each state a reply can carry is one the scheduler sends, and each survives the wire;
    the wire format refuses any other (there is no "failed": a failed seed means back to source)."""
    s = make()
    sent = [sync(s, "p1", 1.0)[0]]  # unknown: never registered
    announce(s, "p1")
    sent.append(register(s, "p1", 1.0)[0])  # back to source: no seed
    announce(s, "seed1", "seed")
    sent.append(register(s, "p2", 2.0, task=TASK2)[0])  # waiting for the seed to learn the size
    progress(s, "seed1", 3.0, digests=DIGESTS[:1])
    sent.append(register(s, "p3", 4.0)[0])  # running
    assert [r.state for r in sent] == ["unknown", "back_to_source", "waiting", "running"]
    assert sorted(r.state for r in sent) == sorted(TASK_STATES)
    for reply in sent:
        assert wire.decode(SyncReply, wire.encode(reply)) == reply


def test_peer_with_pieces_becomes_parent_candidate() -> None:
    s = make()
    announce(s, "seed1", "seed", slots=4)
    for h in ("p1", "p2"):
        announce(s, h)
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    reply, _ = register(s, "p1", 3.0)
    assert parent_ids(reply) == ["seed1"]
    sync(s, "p1", 4.0, new_pieces=[0, 2])
    reply, _ = register(s, "p2", 5.0)
    assert set(parent_ids(reply)) == {"p1", "seed1"}
    p1 = next(p for p in reply.parents if p.host_id == "p1")
    assert list(Bitmap(LAYOUT.count, p1.pieces)) == [0, 2]
    # Only the seed is marked as one: its news may carry digests the child trusts.
    assert {p.host_id: p.seed for p in reply.parents} == {"p1": False, "seed1": True}


def test_peer_without_pieces_not_useful_when_done_peer_present() -> None:
    s = make(candidate_parents=1)
    announce(s, "seed1", "seed")
    announce(s, "p1")
    announce(s, "p2")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    register(s, "p1", 2.5)
    sync(s, "p1", 3.0, new_pieces=list(range(LAYOUT.count)), done=True)
    # p1 is a complete non-seed peer with free slots: preferred over the seed.
    reply, _ = register(s, "p2", 4.0)
    assert parent_ids(reply) == ["p1"]


def test_bad_parent_report_avoided_until_ttl() -> None:
    s = make(bad_parent_ttl_s=30.0)
    announce(s, "seed1", "seed")
    for h in ("p1", "p2", "p3"):
        announce(s, h)
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    register(s, "p1", 2.5)
    sync(s, "p1", 3.0, new_pieces=[0, 1])
    reply, _ = register(s, "p2", 4.0)
    assert "p1" in parent_ids(reply)
    reply, _ = sync(s, "p2", 5.0, bad_parents=["p1"])
    assert "p1" not in parent_ids(reply)
    assert s.counters.bad_reports == 1
    # Nobody else is offered p1 either, while the report holds.
    reply, _ = register(s, "p3", 20.0)
    assert "p1" not in parent_ids(reply)
    reply, _ = sync(s, "p2", 34.0)
    assert "p1" not in parent_ids(reply)
    # After the TTL it may be offered again.
    reply, _ = sync(s, "p2", 36.0)
    assert "p1" in parent_ids(reply)


def test_failed_parents_dropped_from_current_parents() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    reply, _ = register(s, "p1", 2.5)
    assert parent_ids(reply) == ["seed1"]
    assert s.tasks[TASK].peers["p1"].parents == ["seed1"]
    # failed_parents only drops it from the current list (it may be chosen again).
    sync(s, "p1", 3.0, failed_parents=["seed1"])
    assert "seed1" not in s.bad_until


def test_seed_progress_from_non_seed_ignored() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "evil")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "evil", 2.0, digests=[b"\xee" * 32] * 3, done=True)
    task = s.tasks[TASK]
    assert task.digests == []
    assert task.content_length is None
    assert task.peers.get("evil") is None
    reply, _ = register(s, "p1", 3.0)
    assert reply.state == "waiting"
    # An unknown host too.
    progress(s, "stranger", 2.0, digests=[b"\xee" * 32] * 3, done=True)
    assert task.digests == [] and task.content_length is None


def test_second_seed_disagreeing_with_known_digests_ignored() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, digests=DIGESTS[:2])
    wrong = [b"\xee" * 32] * 3
    progress(s, "seed2", 3.0, digests=wrong)  # straddles the known end
    assert s.tasks[TASK].digests == DIGESTS[:2]
    assert "seed2" not in s.tasks[TASK].peers
    # A different size is ignored as well.
    progress(s, "seed2", 3.0, digests=DIGESTS, size=SIZE + 1)
    assert s.tasks[TASK].content_length == SIZE
    assert "seed2" not in s.tasks[TASK].peers
    # Agreeing digests extend the list.
    progress(s, "seed2", 4.0, first=0, digests=DIGESTS)
    assert s.tasks[TASK].digests == DIGESTS


def test_disagreeing_seed_within_known_range_ignored() -> None:
    """A seed whose digests contradict known ones must not be recorded as holding those pieces,
    even when its report lies entirely within the range of digests already known."""
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, digests=DIGESTS)  # all 3 known
    progress(s, "seed2", 3.0, first=0, digests=[b"\xee" * 32])  # contradicts piece 0
    assert s.tasks[TASK].digests == DIGESTS
    held = s.tasks[TASK].peers.get("seed2")
    assert held is None or held.pieces is None or 0 not in held.pieces


def test_seed_error_fails_task_then_back_to_source() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "p1")
    _, wake = register(s, "p1", 1.0)
    assert wake is not None
    progress(s, "seed1", 2.0, digests=[], size=0, error="origin said 401")
    reply, wake = sync(s, "p1", 3.0)
    assert wake is None
    assert reply.state == "back_to_source"
    assert "401" in reply.reason


def test_a_blob_that_failed_the_seeds_sha256_check_is_dropped_whole_and_the_next_pull_starts_clean() -> None:
    """The corrupt-origin replay: digests from corrupt bytes and the peers that took pieces
    against them must not outlive the seed's failed check."""
    s = make(seed_retry_s=5.0)
    announce(s, "seed1", "seed")
    for host in ("p1", "p2", "p3"):
        announce(s, host)
    _, wake = register(s, "p1", 1.0)
    assert wake is not None
    register(s, "p2", 1.0)
    stale = [b"\xee" * 32 for _ in DIGESTS]
    progress(s, "seed1", 1.5, digests=stale)  # every piece, digests of the corrupt bytes
    sync(s, "p1", 2.0, new_pieces=[0, 1, 2], done=True)  # p1 took all of them: a complete holder
    sync(s, "p2", 2.0, new_pieces=[0])
    progress(s, "seed1", 2.5, first=len(stale), digests=[], error="origin sent sha256:d7757fc0424b for sha256:abab")
    task = s.tasks[TASK]
    assert task.digests == [] and task.holders == set() and task.done_peers == set()
    reply, _ = sync(s, "p2", 3.0)
    assert reply.state == "back_to_source" and "d7757fc0424b" in reply.reason
    # The failed peers leave (their own checks fail); a new pull after the registry is repaired
    # wakes the seed again, and its new digests win over the old ones.
    s.leave(Leave(host_id="p1", task_id=TASK), 4.0)
    s.leave(Leave(host_id="p2", task_id=TASK), 4.0)
    reply, wake = register(s, "p3", 10.0)
    assert wake is not None and wake.seed_id == "seed1"
    assert reply.state == "waiting"
    progress(s, "seed1", 10.5, done=True)
    reply, _ = sync(s, "p3", 11.0)
    assert reply.state == "running"
    assert reply.piece_digests == DIGESTS
    assert [p.host_id for p in reply.parents] == ["seed1"]


def test_a_failure_after_another_seed_checked_the_blob_keeps_its_digests() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 1.5, done=True)  # checked the whole blob: its digests are bound
    progress(s, "seed2", 2.0, digests=[], size=SIZE, error="origin unreachable")
    assert s.tasks[TASK].digests == DIGESTS
    reply, _ = sync(s, "p1", 3.0)
    assert reply.state == "running" and reply.piece_digests == DIGESTS


def test_stalled_seed_wakes_another() -> None:
    s = make(seed_retry_s=5.0)
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    _, wake = register(s, "p1", 1.0)
    assert wake is not None
    first = wake.seed_id
    _, wake = sync(s, "p1", 5.5)  # not stalled yet
    assert wake is None
    _, wake = sync(s, "p1", 6.5)  # no progress for > 5 s
    assert wake is not None
    assert wake.seed_id != first
    assert wake.trigger.task_id == TASK
    # The replacement is given its own time before anyone else is woken.
    _, wake = sync(s, "p1", 7.0)
    assert wake is None


def test_a_lost_wake_up_of_the_only_seed_is_retried_after_a_back_off() -> None:
    s = make(seed_retry_s=5.0)
    announce(s, "seed1", "seed")
    announce(s, "p1")
    _, wake = register(s, "p1", 1.0)
    assert wake is not None and wake.seed_id == "seed1"
    s.seed_wake_failed(TASK, "seed1", 1.5)  # the POST to the seed timed out
    _, wake = sync(s, "p1", 3.0)
    assert wake is None  # backing off, no other seed
    _, wake = sync(s, "p1", 6.6)
    assert wake is not None and wake.seed_id == "seed1"


def test_a_stalled_only_seed_is_asked_again_with_doubling_back_off() -> None:
    s = make(seed_retry_s=5.0)
    announce(s, "seed1", "seed")
    announce(s, "p1")
    _, wake = register(s, "p1", 0.0)
    assert wake is not None
    _, wake = sync(s, "p1", 5.5)  # stalled: backed off until 10.5
    assert wake is None
    announce(s, "seed1", "seed", now=10.0)
    _, wake = sync(s, "p1", 10.6)
    assert wake is not None and wake.seed_id == "seed1"  # second wake-up
    announce(s, "seed1", "seed", now=15.0)
    _, wake = sync(s, "p1", 16.0)  # stalled again: backed off 10 s this time
    assert wake is None
    announce(s, "seed1", "seed", now=25.0)
    _, wake = sync(s, "p1", 25.5)
    assert wake is None
    _, wake = sync(s, "p1", 26.1)
    assert wake is not None and wake.seed_id == "seed1"


def test_progressing_seed_not_replaced() -> None:
    s = make(seed_retry_s=5.0)
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    _, wake = register(s, "p1", 1.0)
    assert wake is not None
    seed = wake.seed_id
    announce(s, seed, "seed", now=4.0)
    progress(s, seed, 4.0, digests=DIGESTS[:1])
    register(s, "p1", 4.5)
    _, wake = sync(s, "p1", 8.0)
    assert wake is None


def test_expire_drops_silent_hosts_and_tasks() -> None:
    s = make(peer_ttl_s=60.0)
    announce(s, "seed1", "seed", now=0.0)
    announce(s, "p1", now=0.0)
    announce(s, "p2", now=0.0)
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    register(s, "p1", 2.5)
    reply, _ = register(s, "p2", 3.0)
    assert "seed1" in parent_ids(reply)
    assert s.expire(50.0) == []
    announce(s, "p2", now=50.0)
    gone = s.expire(62.6)
    assert set(gone) == {"seed1", "p1"}
    assert set(s.hosts) == {"p2"}
    assert set(s.tasks[TASK].peers) == {"p2"}
    assert s.tasks[TASK].peers["p2"].parents == []
    assert s.tasks[TASK].seed is None
    gone = s.expire(200.0)
    assert gone == ["p2"]
    assert s.tasks == {} and s.hosts == {}


def test_expire_forgets_peers_that_never_announced() -> None:
    """A host that registers without (re-)announcing, then goes silent, must not stay in the
    task forever: expire() must drop it too (PeerTask.last_seen is recorded but never read)."""
    s = make(peer_ttl_s=60.0)
    announce(s, "seed1", "seed", now=0.0)
    register(s, "ghost", 1.0)  # never announced (e.g. expired earlier, re-registered, then died)
    s.expire(30.0)
    announce(s, "seed1", "seed", now=1000.0)
    s.expire(1000.0)
    task = s.tasks.get(TASK)
    assert task is None or "ghost" not in task.peers


def test_leave_removes_peer_and_parent_links() -> None:
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "p1")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    register(s, "p1", 2.5)
    assert s.tasks[TASK].peers["p1"].parents == ["seed1"]
    s.leave(Leave(host_id="seed1", task_id=TASK), 3.0)
    assert "seed1" not in s.tasks[TASK].peers
    assert s.tasks[TASK].peers["p1"].parents == []
    s.leave(Leave(host_id="x", task_id=TASK2), 3.0)  # unknown task: no error


def test_restart_rebuild_from_announcements() -> None:
    s = make()
    announce(
        s,
        "seed1",
        "seed",
        now=0.0,
        tasks=[holding(url=URL, piece_digests=DIGESTS)],
    )
    partial = Bitmap(LAYOUT.count)
    partial.add(1)
    announce(
        s,
        "p1",
        now=0.0,
        tasks=[holding(partial.to_bytes())],
    )
    announce(s, "p2", now=0.0)
    reply, wake = register(s, "p2", 1.0)
    assert wake is None  # a complete seed holds it already
    assert reply.state == "running"
    assert reply.content_length == SIZE
    assert reply.piece_digests == DIGESTS
    assert set(parent_ids(reply)) == {"seed1", "p1"}
    assert s.tasks[TASK].url == URL


def test_restart_peer_cannot_inject_digests() -> None:
    s = make()
    announce(
        s,
        "p1",
        now=0.0,
        tasks=[holding(piece_digests=DIGESTS)],
    )
    assert s.tasks[TASK].digests == []
    announce(
        s,
        "seed1",
        "seed",
        now=0.0,
        tasks=[holding(piece_digests=DIGESTS)],
    )
    assert s.tasks[TASK].digests == DIGESTS
    # A seed that later announces different digests does not replace them.
    announce(
        s,
        "seed2",
        "seed",
        now=0.0,
        tasks=[holding(piece_digests=[b"\xee" * 32] * LAYOUT.count)],
    )
    assert s.tasks[TASK].digests == DIGESTS


def test_announce_with_bad_bitmap_ignored() -> None:
    s = make()
    announce(s, "p1", now=0.0, tasks=[holding(b"\x00\x00")])
    assert "p1" not in s.tasks[TASK].peers


def test_pieces_without_digests_not_counted_useful() -> None:
    # A peer holding pieces whose digests are unknown can't be verified, so it is not useful yet.
    s = make(candidate_parents=4)
    announce(s, "seed1", "seed")
    announce(s, "p1")
    announce(s, "p2")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, digests=[])  # size only
    register(s, "p1", 2.5)
    sync(s, "p1", 3.0, new_pieces=[0, 1, 2], done=True)
    reply, _ = register(s, "p2", 4.0)
    assert reply.state == "running"
    assert "p1" not in parent_ids(reply)  # complete but nothing verifiable to offer


def test_back_to_source_peer_learns_size() -> None:
    s = make()
    announce(s, "p1")
    register(s, "p1", 1.0)
    reply, _ = sync(s, "p1", 2.0, content_length=SIZE)
    assert s.tasks[TASK].content_length == SIZE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_cycles_across_many_peers(seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler(SchedulerConfig(candidate_parents=4, parent_sample=10), rng=random.Random(seed))
    announce(s, "seed1", "seed", slots=8)
    peers = [f"p{i}" for i in range(30)]
    for h in peers:
        announce(s, h, slots=rng.randint(1, 6))
    register(s, peers[0], 1.0)
    progress(s, "seed1", 1.5, digests=DIGESTS[:2])
    now = 2.0
    for h in peers:
        register(s, h, now)
        now += 0.01
    for _ in range(6):
        for h in rng.sample(peers, len(peers)):
            new = rng.sample(range(LAYOUT.count), rng.randint(0, 2))
            sync(s, h, now, new_pieces=new)
            now += 0.01
            assert_acyclic(s)
    assert_acyclic(s)
    task = s.tasks[TASK]
    assert any(task.peers[h].parents for h in peers)
    for h in peers:
        assert h not in task.peers[h].parents
        assert len(task.peers[h].parents) <= 4


def assert_acyclic(s: Scheduler) -> None:
    graph = {h: list(p.parents) for h, p in s.tasks[TASK].peers.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"cycle: {' -> '.join([*path, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for parent in graph.get(node, []):
            visit(parent, [*path, node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_restarted_scheduler_waits_for_seeds_before_sending_peers_to_the_origin() -> None:
    from p2pdist.config import SchedulerConfig
    from p2pdist.wire import AnnounceHost, Register
    from scheduler.state import Scheduler

    task = "sha256:" + "c" * 64
    url = "http://origin.test/v2/a/blobs/" + task
    sched = Scheduler(SchedulerConfig(startup_grace_s=5.0), started_at=100.0)
    sched.announce(AnnounceHost(host_id="p1", url="http://p1", kind="peer", upload_slots=2), 100.5)
    reply, wake = sched.register(Register(host_id="p1", task_id=task, url=url), 101.0)
    assert reply.state == "waiting" and wake is None
    # The seed announces within the grace period: it is woken, nobody went to the origin.
    sched.announce(AnnounceHost(host_id="s1", url="http://s1", kind="seed", upload_slots=4), 102.0)
    reply, wake = sched.register(Register(host_id="p1", task_id=task, url=url), 102.5)
    assert wake is not None and wake.seed_id == "s1"
    assert sched.counters.back_to_source == 0
    # With no seed at all, past the grace period the answer is the origin.
    lonely = Scheduler(SchedulerConfig(startup_grace_s=5.0), started_at=0.0)
    lonely.announce(AnnounceHost(host_id="p1", url="http://p1", kind="peer", upload_slots=2), 6.0)
    reply, _ = lonely.register(Register(host_id="p1", task_id=task, url=url), 6.0)
    assert reply.state == "back_to_source"


def test_the_scheduler_decides_the_piece_size_by_its_rule_and_min_piece_bytes() -> None:
    for floor, piece_size in ((None, 2 * MiB), (4 * MiB, 4 * MiB), (MiB, MiB)):
        s = make() if floor is None else make(min_piece_bytes=floor)
        announce(s, "seed1", "seed")
        announce(s, "p1")
        register(s, "p1", 1.0)
        # A back-to-source peer tells the size: the scheduler cuts the task by its own rule.
        sync(s, "p1", 2.0, content_length=SIZE)
        reply, _ = register(s, "p2", 3.0)
        assert (reply.content_length, reply.piece_size) == (SIZE, piece_size), floor
    for size in (1024 * MiB, 10 * 1024 * MiB):  # 1 GiB and up: as before the floor moved
        assert make().piece_size(size) == PieceLayout.for_blob(size, 4 * MiB).piece_size


def test_the_floor_follows_the_upload_cap_of_the_host_asking_first() -> None:
    """Small pieces pay only where a hop is slow: a task first asked for by a host with no
    upload cap is cut with the old 4 MiB floor (and its seed told nothing new), one first asked
    for by a capped host with a quarter second of its upload (never under min_piece_bytes),
    one first asked for by a host not announced yet with min_piece_bytes."""
    for rate, floor in ((None, 4 * MiB), (4 * MiB, 2 * MiB), (16 * MiB, 4 * MiB), (64 * MiB, 4 * MiB)):
        s = make()
        announce(s, "seed1", "seed", upload_rate=None)
        announce(s, "p1", upload_rate=rate)
        _, wake = register(s, "p1", 1.0)
        assert wake is not None
        assert wake.trigger.min_piece_size == (None if floor == 4 * MiB else floor), rate
        announce(s, "p2", upload_rate=None if rate else 4 * MiB)  # a later host changes nothing
        sync(s, "p1", 2.0, content_length=SIZE)
        reply, _ = register(s, "p2", 3.0)
        assert reply.piece_size == floor, rate
    s = make()
    announce(s, "seed1", "seed", upload_rate=None)
    _, wake = register(s, "stranger", 1.0)
    assert wake is not None and wake.trigger.min_piece_size == 2 * MiB


def test_a_seed_is_told_the_floor_and_an_older_seed_gets_the_trigger_it_knows() -> None:
    for floor, sent in ((None, 2 * MiB), (4 * MiB, None)):
        s = make() if floor is None else make(min_piece_bytes=floor)
        announce(s, "seed1", "seed")
        _, wake = register(s, "p1", 1.0)
        assert wake is not None
        assert wake.trigger.min_piece_size == sent and wake.trigger.piece_size is None
        if sent is None:  # min_piece_bytes 4 MiB: exactly what a scheduler before it sent
            assert set(msgpack.unpackb(wire.encode(wake.trigger))) == {
                "task_id",
                "url",
                "headers",
                "content_length",
                "piece_digests",
                "parents",
            }


def test_a_seed_resuming_a_task_is_told_its_piece_size() -> None:
    s = make(seed_retry_s=1.0)
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    announce(s, "p1")
    register(s, "p1", 0.0)
    first = s.tasks[TASK].seed
    assert first is not None
    progress(s, first, 0.5, digests=DIGESTS[:2])
    sync(s, "p1", 0.6, new_pieces=[0, 1])
    _, wake = sync(s, "p1", 5.0)  # the first seed stalled
    assert wake is not None and wake.seed_id != first
    assert wake.trigger.content_length == SIZE and wake.trigger.piece_size == PIECE
    assert wake.trigger.piece_digests == DIGESTS[:2]


def test_a_restarted_scheduler_ignores_holders_cut_otherwise() -> None:
    """After a restart the task is rebuilt from announcements: a holder whose pieces are cut in
    a way this scheduler never cuts (1 MiB pieces, under its min_piece_bytes of 2 MiB: left by
    a scheduler configured otherwise) is no parent of it."""
    s = make()
    other_cut = PieceLayout(SIZE, 1 * MiB)
    stale = Bitmap(other_cut.count)
    stale.add(0)
    cut = piece_size_sent(SIZE, MiB)
    announce(
        s,
        "old",
        now=0.0,
        tasks=[TaskHolding(task_id=TASK, content_length=SIZE, pieces=stale.to_bytes(), piece_size=cut)],
    )
    assert s.tasks[TASK].piece_size == PIECE and "old" not in s.tasks[TASK].peers
    announce(
        s,
        "seed1",
        "seed",
        tasks=[holding(piece_digests=DIGESTS)],
    )
    reply, wake = register(s, "p2", 1.0)
    assert wake is None and reply.piece_size == PIECE and parent_ids(reply) == ["seed1"]


def test_a_seeds_holding_brings_its_layout_to_a_rebuilt_task() -> None:
    """A scheduler restarted with another min_piece_bytes keeps the swarm of a blob its seed cut
    the earlier way, and its peers' holdings of that layout, rather than refetching it."""
    s = make()
    old_cut = PieceLayout(SIZE, 4 * MiB)
    whole = Bitmap(old_cut.count)
    for n in range(old_cut.count):
        whole.add(n)
    digests = DIGESTS[: old_cut.count]
    announce(s, "p1", now=0.0, tasks=[TaskHolding(task_id=TASK, content_length=SIZE, pieces=whole.to_bytes())])
    # A layout this scheduler could have given (the old floor, for a host with no upload cap):
    # the task's, at once.
    assert "p1" in s.tasks[TASK].peers and s.tasks[TASK].piece_size == 4 * MiB
    old_seed = TaskHolding(task_id=TASK, content_length=SIZE, pieces=whole.to_bytes(), piece_digests=digests)
    announce(s, "seed1", "seed", tasks=[old_seed])
    announce(s, "p1", now=0.5, tasks=[TaskHolding(task_id=TASK, content_length=SIZE, pieces=whole.to_bytes())])
    reply, _ = register(s, "p2", 1.0)
    assert reply.piece_size == 4 * MiB and reply.piece_digests == digests
    assert set(parent_ids(reply)) == {"seed1", "p1"}


def test_a_rebuilt_task_takes_a_holders_layout_this_scheduler_could_have_given() -> None:
    """The floor was the first asker's upload cap, which a restarted scheduler cannot know: the
    first holder to announce a layout it gives some task brings it (and the floor its seed is
    told), so a blob cut in 2 MiB pieces for a capped host is not cut again in 4 MiB ones."""
    s = make()
    count = PieceLayout(SIZE, PIECE).count
    whole = Bitmap(count)
    for n in range(count):
        whole.add(n)
    cut = piece_size_sent(SIZE, PIECE)
    held = TaskHolding(task_id=TASK, content_length=SIZE, pieces=whole.to_bytes(), piece_size=cut)
    announce(s, "p1", upload_rate=None, tasks=[held])
    assert s.tasks[TASK].piece_size == PIECE and "p1" in s.tasks[TASK].done_peers
    announce(s, "seed1", "seed", upload_rate=None)
    reply, wake = register(s, "p2", 1.0)
    # The seed woken for the digests cuts as p1 did.
    assert reply.piece_size == PIECE and wake is not None and wake.trigger.min_piece_size == PIECE


def test_pieces_of_a_store_cut_otherwise_are_not_taken() -> None:
    s = make()
    announce(s, "seed1", "seed")
    register(s, "p1", 1.0)
    progress(s, "seed1", 2.0, done=True)
    register(s, "p2", 2.0)
    # p2 went to the origin before any answer and cut the blob by the old rule.
    sync(s, "p2", 3.0, new_pieces=[0, 1, 2], content_length=SIZE, done=True)
    assert not s.tasks[TASK].peers["p2"].bits and "p2" not in s.tasks[TASK].done_peers
    reply, _ = register(s, "p1", 4.0)
    assert parent_ids(reply) == ["seed1"]
    sync(s, "p2", 5.0, new_pieces=[0, 1], content_length=SIZE, piece_size=PIECE)
    assert s.tasks[TASK].peers["p2"].bits == 0b11


def test_a_seed_cutting_otherwise_than_the_rule_is_followed() -> None:
    """Its digests are of its pieces: as with the size, a seed's word on the layout wins over
    what the scheduler had before any seed spoke, and once one spoke, another is ignored."""
    s = make()
    announce(s, "seed1", "seed")
    announce(s, "seed2", "seed")
    register(s, "p1", 1.0)
    sync(s, "p1", 1.5, content_length=SIZE)  # sized by the rule: 2 MiB
    old_cut = PieceLayout(SIZE, 4 * MiB)
    s.seed_progress(
        SeedProgress(
            host_id="seed1",
            task_id=TASK,
            content_length=SIZE,
            first_digest=0,
            piece_digests=DIGESTS[: old_cut.count],
            done=True,
        ),
        2.0,
    )
    reply, _ = register(s, "p2", 3.0)
    assert reply.piece_size == 4 * MiB and len(reply.piece_digests) == old_cut.count
    progress(s, "seed2", 4.0, done=True)  # 2 MiB pieces: another seed already spoke
    reply, _ = register(s, "p3", 5.0)
    assert reply.piece_size == 4 * MiB and parent_ids(reply) == ["seed1"]

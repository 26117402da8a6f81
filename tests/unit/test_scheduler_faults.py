"""The scheduler's answers to failing seeds and lying peers, on its state machine alone: a seed
that fails after it was given up, a seed failing mid-blob, and a peer claiming the whole blob
with digests of its own. (tests/e2e/test_faults.py runs the same faults with real processes.)"""

from __future__ import annotations

import random

from p2pdist import wire
from p2pdist.config import SchedulerConfig
from p2pdist.content.pieces import Bitmap, MiB, PieceLayout
from scheduler.state import Scheduler, WakeSeed

TASK = "sha256:" + "ab" * 32
SIZE = 10 * MiB  # 3 pieces
LAYOUT = PieceLayout.for_blob(SIZE)


def _scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(seed_retry_s=5.0), rng=random.Random(3))


def _announce(
    s: Scheduler, host: str, kind: wire.HostKind, now: float, tasks: list[wire.TaskHolding] | None = None
) -> None:
    s.announce(
        wire.AnnounceHost(host_id=host, url=f"http://{host}:4000", kind=kind, upload_slots=4, tasks=tasks or []), now
    )


def _register(s: Scheduler, host: str, now: float) -> tuple[wire.SyncReply, WakeSeed | None]:
    return s.register(wire.Register(host_id=host, task_id=TASK, url="http://origin/v2/x/blobs/" + TASK), now)


def test_seed_failing_after_it_was_given_up_as_stalled_sends_peers_back_to_source() -> None:
    s = _scheduler()
    _announce(s, "seed-a", "seed", 0.0)
    _announce(s, "peer-1", "peer", 0.0)
    _, wake = _register(s, "peer-1", 0.0)
    assert wake is not None and wake.seed_id == "seed-a"
    # Retrying the origin with backoff, the seed shows no progress; there is no other seed.
    reply, wake = s.sync(wire.Sync(host_id="peer-1", task_id=TASK), 6.0)
    assert wake is None and reply.state == "waiting"
    s.seed_progress(
        wire.SeedProgress(
            host_id="seed-a",
            task_id=TASK,
            content_length=0,
            first_digest=0,
            piece_digests=[],
            error="origin answered HTTP 503",
        ),
        8.0,
    )
    reply, _ = s.sync(wire.Sync(host_id="peer-1", task_id=TASK), 8.5)
    assert reply.state == "back_to_source" and "503" in reply.reason


def test_seed_failing_mid_blob_is_no_parent_and_partial_holders_go_back_to_source() -> None:
    s = _scheduler()
    _announce(s, "seed-a", "seed", 0.0)
    _announce(s, "peer-1", "peer", 0.0)
    _register(s, "peer-1", 0.0)
    s.seed_progress(
        wire.SeedProgress(
            host_id="seed-a", task_id=TASK, content_length=SIZE, first_digest=0, piece_digests=[b"d" * 32]
        ),
        1.0,
    )
    reply, _ = s.sync(wire.Sync(host_id="peer-1", task_id=TASK, new_pieces=[0], have_digests=1), 2.0)
    assert [p.host_id for p in reply.parents] == ["seed-a"]
    s.seed_progress(
        wire.SeedProgress(
            host_id="seed-a", task_id=TASK, content_length=0, first_digest=0, piece_digests=[], error="origin reset"
        ),
        3.0,
    )
    reply, _ = s.sync(wire.Sync(host_id="peer-1", task_id=TASK, have_digests=1), 3.5)
    assert reply.state == "back_to_source"
    assert "seed-a" not in s.tasks[TASK].peers


def test_peer_claiming_the_whole_blob_with_its_own_digests_does_not_stand_in_for_a_seed() -> None:
    s = _scheduler()
    _announce(s, "seed-a", "seed", 0.0)
    everything = Bitmap(LAYOUT.count)
    for n in range(LAYOUT.count):
        everything.add(n)
    _announce(
        s,
        "liar",
        "peer",
        0.0,
        [
            wire.TaskHolding(
                task_id=TASK,
                content_length=SIZE,
                pieces=everything.to_bytes(),
                piece_digests=[b"x" * 32] * LAYOUT.count,
            )
        ],
    )
    _announce(s, "peer-1", "peer", 0.0)
    reply, wake = _register(s, "peer-1", 1.0)
    assert wake is not None and wake.seed_id == "seed-a"
    assert reply.piece_digests == []  # a peer's digests are never passed on


def test_every_scheduler_picks_the_same_seed_for_a_task_and_seeds_share_the_tasks() -> None:
    tasks = ["sha256:" + f"{n:064x}" for n in range(200)]
    picked: list[list[str]] = []
    for rng_seed in (1, 2):  # two schedulers that share nothing
        s = Scheduler(SchedulerConfig(seed_retry_s=5.0), rng=random.Random(rng_seed))
        for seed in ("seed-a", "seed-b", "seed-c"):
            _announce(s, seed, "seed", 0.0)
        _announce(s, "peer-1", "peer", 0.0)
        woken = []
        for task in tasks:
            _, wake = s.register(
                wire.Register(host_id="peer-1", task_id=task, url="http://origin/v2/x/blobs/" + task), 1.0
            )
            assert wake is not None
            woken.append(wake.seed_id)
        picked.append(woken)
    assert picked[0] == picked[1]
    assert all(40 < picked[0].count(seed) < 94 for seed in ("seed-a", "seed-b", "seed-c"))


def test_a_seed_taking_over_mid_blob_is_told_the_digests_and_the_peers_holding_them() -> None:
    s = _scheduler()
    for host, kind in (("seed-a", "seed"), ("seed-b", "seed"), ("peer-1", "peer"), ("peer-2", "peer")):
        _announce(s, host, kind, 0.0)  # type: ignore[arg-type]
    _, first = _register(s, "peer-1", 0.0)
    _register(s, "peer-2", 0.0)
    assert first is not None
    dying = first.seed_id
    assert first.trigger.piece_digests == [] and first.trigger.parents == []  # nothing to resume
    s.seed_progress(
        wire.SeedProgress(
            host_id=dying, task_id=TASK, content_length=SIZE, first_digest=0, piece_digests=[b"d" * 32, b"e" * 32]
        ),
        1.0,
    )
    s.sync(wire.Sync(host_id="peer-1", task_id=TASK, new_pieces=[0, 1], have_digests=2), 1.5)
    s.sync(wire.Sync(host_id="peer-2", task_id=TASK, new_pieces=[0], have_digests=2), 1.5)

    # The seed dies: no progress for seed_retry_s, and the next sync wakes the other seed.
    _, wake = s.sync(wire.Sync(host_id="peer-2", task_id=TASK, have_digests=2), 7.0)

    assert wake is not None and wake.seed_id != dying
    trigger = wake.trigger
    assert trigger.content_length == SIZE and trigger.piece_digests == [b"d" * 32, b"e" * 32]
    # Peers holding the most first; never the seed that stalled.
    assert [p.host_id for p in trigger.parents] == ["peer-1", "peer-2"]
    assert trigger.parents[0].url == "http://peer-1:4000"


def test_a_scheduler_that_did_not_run_does_not_take_its_seed_for_stalled() -> None:
    s = _scheduler()
    for host, kind in (("seed-a", "seed"), ("seed-b", "seed"), ("peer-1", "peer")):
        _announce(s, host, kind, 0.0)  # type: ignore[arg-type]
    _, wake = _register(s, "peer-1", 0.0)
    assert wake is not None
    s.paused(10.0)  # SIGSTOPped for 10 s: the seed's progress went to another scheduler meanwhile
    _, again = s.sync(wire.Sync(host_id="peer-1", task_id=TASK), 10.5)
    assert again is None and s.tasks[TASK].seed == wake.seed_id
    assert s.expire(10.5) == []

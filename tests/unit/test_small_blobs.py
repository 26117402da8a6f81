"""Small blobs and Range requests: a blob under direct_blob_bytes that nobody in the swarm has
goes straight to the origin without waking a seed, unless a seed has it (a preheat) or sites
are in use; a Range request's pieces are asked for before the rest of the blob."""

from __future__ import annotations

import random

import trio
from prometheus_client import generate_latest

from p2pdist.config import SchedulerConfig
from p2pdist.content.pieces import Bitmap, MiB, PieceLayout
from p2pdist.wire import AnnounceHost, Parent, Register, SeedProgress, SyncReply
from peer.machine import Limits, TaskMachine
from scheduler.service import SchedulerService
from scheduler.state import Scheduler

TASK = "sha256:" + "ab" * 32
URL = "http://origin:5000/v2/lib/x/blobs/" + TASK


def scheduler(**config: object) -> Scheduler:
    s = Scheduler(SchedulerConfig(**config), rng=random.Random(7))  # type: ignore[arg-type]
    for host, kind, site in (("seed1", "seed", ""), ("p1", "peer", ""), ("p2", "peer", "")):
        s.announce(AnnounceHost(host_id=host, url=f"http://{host}:4000", kind=kind, upload_slots=4, site=site), 0.0)  # type: ignore[arg-type]
    return s


def register(s: Scheduler, host: str, size: int | None) -> tuple[SyncReply, object]:
    return s.register(Register(host_id=host, task_id=TASK, url=URL, content_length=size), 1.0)


def test_a_small_blob_nobody_has_goes_straight_to_the_origin_and_wakes_no_seed() -> None:
    s = scheduler()
    reply, wake = register(s, "p1", 200_000)
    assert reply.state == "back_to_source" and "small blob" in reply.reason
    assert wake is None and s.counters.seeds_woken == 0


async def test_the_small_blobs_sent_to_the_origin_are_counted_in_the_metrics() -> None:
    service = SchedulerService(SchedulerConfig(allowed_registries=("origin:5000",)))
    service.state.announce(AnnounceHost(host_id="p1", url="http://p1:4000", kind="peer", upload_slots=4), 0.0)
    for n in range(2):
        task = f"sha256:{n:064x}"
        message = Register(host_id="p1", task_id=task, url=URL.replace(TASK, task), content_length=200_000)
        assert service._dispatch(message).state == "back_to_source"  # type: ignore[attr-defined]
    service._count()
    assert "p2pdist_scheduler_small_blobs_direct_total 2.0" in generate_latest(service.metrics.registry).decode()
    await trio.lowlevel.checkpoint()


def test_a_blob_at_the_threshold_or_of_unknown_size_goes_through_p2p() -> None:
    for size in (1 << 20, None):
        s = scheduler()
        reply, wake = register(s, "p1", size)
        assert reply.state == "waiting" and wake is not None


def test_a_small_blob_a_seed_holds_comes_from_the_swarm() -> None:
    s = scheduler()
    size = 300_000
    layout = PieceLayout.for_blob(size)
    # As after a preheat: the seed fetched it and published its digest.
    s.seed_progress(
        SeedProgress(
            host_id="seed1",
            task_id=TASK,
            content_length=size,
            first_digest=0,
            piece_digests=[b"\x01" * 32] * layout.count,
            done=True,
        ),
        0.5,
    )
    reply, wake = register(s, "p1", size)
    assert reply.state == "running" and [p.host_id for p in reply.parents] == ["seed1"]
    assert wake is None


def test_with_sites_in_use_a_small_blob_still_goes_through_p2p() -> None:
    s = scheduler()
    for host, site in (("p3", "ship-1"), ("p4", "ship-2")):
        s.announce(AnnounceHost(host_id=host, url=f"http://{host}:4000", kind="peer", upload_slots=4, site=site), 0.0)
    reply, _ = register(s, "p3", 200_000)
    assert reply.state != "back_to_source"


def test_a_range_requests_pieces_are_asked_for_first_whatever_their_rarity() -> None:
    size = 8 * 2 * MiB
    layout = PieceLayout.for_blob(size)
    assert layout.count == 8

    def parent(host_id: str, pieces: list[int]) -> Parent:
        bitmap = Bitmap(layout.count)
        for n in pieces:
            bitmap.add(n)
        return Parent(host_id=host_id, url=f"http://{host_id}:4000", pieces=bitmap.to_bytes())

    # Pieces 2 and 3 are the commonest (three parents hold them): rarest-first asks for them last.
    parents = [parent("a", list(range(8))), parent("b", [2, 3]), parent("c", [2, 3])]
    reply = SyncReply(
        task_id=TASK,
        state="running",
        content_length=size,
        piece_size=layout.piece_size,
        piece_digests=[bytes([n]) * 32 for n in range(layout.count)],
        parents=parents,
    )
    for seed in range(10):
        plain = TaskMachine("me", Limits(concurrent_pieces=2), random.Random(seed), 0.0)
        plain.register_answered(reply, 0.0)
        plain.store_opened(size, 0, [])
        assert not {2, 3} <= {r.number for r in plain.poll(0.0)}  # a rarer piece comes first
        ranged = TaskMachine("me", Limits(concurrent_pieces=2), random.Random(seed), 0.0)
        ranged.register_answered(reply, 0.0)
        ranged.store_opened(size, 0, [])
        ranged.want_first(2, 3)
        assert sorted(r.number for r in ranged.poll(0.0)) == [2, 3]

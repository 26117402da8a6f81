"""Peer news in the download machine: parents' own bitmaps and losses as events, and the
schedule of scheduler syncs they leave (when one is due, and the bound on how many)."""

from __future__ import annotations

import random

from p2pdist.config import PeerConfig
from p2pdist.content.pieces import Bitmap, MiB
from p2pdist.wire import Parent, SyncReply
from peer.machine import (
    SHORT_JITTER,
    SHORT_S,
    STEADY_SYNC_INTERVAL_S,
    SYNC_BURST,
    SYNC_INTERVAL_S,
    SYNC_RATE_PER_S,
    Limits,
    PieceOutcome,
    TaskMachine,
)

TASK = "sha256:" + "cd" * 32
PIECES = 16
SIZE = PIECES * 4 * MiB
DIGESTS = [bytes([n]) * 32 for n in range(PIECES)]
WHOLE = (1 << PIECES) - 1


def parent(host_id: str, pieces: range | list[int] = range(PIECES), *, seed: bool = False) -> Parent:
    bitmap = Bitmap(PIECES)
    for n in pieces:
        bitmap.add(n)
    return Parent(host_id=host_id, url=f"http://{host_id}:4000", pieces=bitmap.to_bytes(), seed=seed)


def running(*parents: Parent, digests: list[bytes] = DIGESTS) -> SyncReply:
    return SyncReply(
        task_id=TASK,
        state="running",
        content_length=SIZE,
        piece_size=4 * MiB,
        piece_digests=digests,
        parents=list(parents),
    )


def machine(*parents: Parent, digests: list[bytes] = DIGESTS, **limits: int) -> TaskMachine:
    m = TaskMachine("me", Limits(peer_news=True, **limits), random.Random(1), 0.0)
    m.register_answered(running(*parents, digests=digests), 0.0)
    m.store_opened(SIZE, 0, [])
    return m


def test_news_tells_a_child_what_a_parent_holds_without_a_sync() -> None:
    m = machine(parent("a", []))
    assert m.poll(0.1) == []
    m.parent_news("a", 0b101, 0.2)
    assert sorted(r.number for r in m.poll(0.2)) == [0, 2]
    m.parent_news("stranger", WHOLE, 0.3)  # not a parent: ignored
    assert "stranger" not in m.parents
    m.parent_news("a", 1 << PIECES, 0.3)  # past the blob's end: not this blob's bitmap
    assert m.parents["a"].pieces == 0b101


def test_digests_in_news_are_taken_only_from_a_parent_the_scheduler_marks_as_seed() -> None:
    m = machine(parent("peer", []), parent("seed", [], seed=True), digests=[])
    m.parent_news("peer", 0b11, 0.1, first_digest=0, digests=[b"\x66" * 32] * 2)
    assert m.digests == []
    m.parent_news("seed", 0b11, 0.1, first_digest=0, digests=DIGESTS[:2])
    assert m.digests == DIGESTS[:2]
    m.parent_news("seed", 0b111, 0.2, first_digest=1, digests=DIGESTS[1:3])  # overlapping: the new one only
    assert m.digests == DIGESTS[:3]
    m.parent_news("seed", 0b111, 0.3, first_digest=5, digests=DIGESTS[5:6])  # a gap: nothing taken
    assert m.digests == DIGESTS[:3]


def test_a_lost_parent_is_dropped_blocked_reported_and_makes_a_sync_due() -> None:
    m = machine(parent("a"), parent("b"))
    m.poll(0.0)
    assert m.next_sync_at(0.5) > 0.5
    m.parent_lost("a", 0.5)
    assert "a" not in m.parents and m.blocked["a"] > 0.5
    assert m.next_sync_at(0.5) == SYNC_INTERVAL_S  # due now: 0.2 s after the last answer has passed
    report = m.take_report(0.5)
    assert report.failed_parents == ["a"]
    m.sync_answered(report, running(parent("a"), parent("b")), 0.6)
    assert "a" not in m.parents  # still blocked, though the scheduler offered it


def test_a_busy_child_with_parents_that_serve_it_syncs_only_to_report_progress() -> None:
    m = machine(parent("a"), parent("b"), concurrent_pieces=2)
    requests = m.poll(0.0)
    assert len(requests) == 2
    # Full concurrency, every digest known, nothing to report but one piece: the steady interval.
    assert m.next_sync_at(0.1) == STEADY_SYNC_INTERVAL_S
    # A share (1/8) of the blob's pieces new since the last report: tell the scheduler now.
    for n, request in enumerate(requests):
        m.piece_done(request.number, PieceOutcome.VERIFIED, 0.2 + n / 10)
    assert m.next_sync_at(0.4) == SYNC_INTERVAL_S


def test_a_child_short_of_pieces_in_flight_for_short_s_asks_for_parents() -> None:
    m = machine(parent("a", []), concurrent_pieces=8)
    assert m.poll(0.0) == []
    # Nothing on offer: news from a parent still downloading gets SHORT_S (give or take) first.
    short = m.short_s
    assert SHORT_S * (1 - SHORT_JITTER) <= short <= SHORT_S * (1 + SHORT_JITTER)
    assert m.next_sync_at(0.0) == short
    m.parent_news("a", 0b10, 0.5)
    assert len(m.poll(0.5)) == 1  # one of 8 in flight: still short
    assert m.next_sync_at(0.5) == short
    m.parent_news("a", WHOLE, 0.6)
    assert len(m.poll(0.6)) == 2  # a sole parent gets a few at a time
    m.sync_answered(m.take_report(0.7), running(*(parent(p) for p in "abcdefgh")), 0.7)
    assert len(m.poll(0.7)) == 5  # half or more in flight: no longer short
    assert m.next_sync_at(0.7) == 0.7 + STEADY_SYNC_INTERVAL_S


def test_hosts_registered_together_do_not_all_ask_for_parents_in_the_same_instant() -> None:
    """A rollout registers every host at once, and at first none has pieces in flight: each
    asks for parents SHORT_S after its answer, give or take SHORT_JITTER, not all at 1.0 s."""
    due = []
    for seed in range(200):
        m = TaskMachine(f"host-{seed}", Limits(peer_news=True), random.Random(seed), 0.0)
        m.register_answered(running(parent("a", [])), 0.0)
        m.store_opened(SIZE, 0, [])
        assert m.poll(0.0) == []
        due.append(m.next_sync_at(0.0))
    assert min(due) >= SHORT_S * (1 - SHORT_JITTER) and max(due) <= SHORT_S * (1 + SHORT_JITTER)
    in_a_tenth = max(sum(1 for u in due if t <= u < t + 0.1) for t in due)
    assert in_a_tenth <= 60, f"{in_a_tenth} of 200 hosts ask within 0.1 s"


def test_pieces_a_parent_offers_without_known_digests_make_a_sync_due() -> None:
    m = machine(parent("a", []), digests=DIGESTS[:2], concurrent_pieces=1)
    m.poll(0.0)
    m.parent_news("a", 0b1111, 0.3)
    assert m.next_sync_at(0.3) == SYNC_INTERVAL_S


def test_syncs_are_bounded_by_the_bucket_however_urgent() -> None:
    """A parent lost every 10 ms for 20 s: at most SYNC_BURST + SYNC_RATE_PER_S·T syncs."""
    m = machine(*(parent(f"p{i}") for i in range(4)))
    sent = []
    now = 0.0
    for step in range(2000):
        now = step * 0.01
        for host_id in list(m.parents):
            m.parent_lost(host_id, now)
            break
        if m.next_sync_at(now) <= now:
            report = m.take_report(now)
            sent.append(now)
            m.sync_answered(report, running(*(parent(f"q{step}-{i}") for i in range(2))), now)
    assert len(sent) <= SYNC_BURST + SYNC_RATE_PER_S * now
    assert len(sent) >= SYNC_RATE_PER_S * now - 1  # and urgent syncs do go out
    assert all(b - a >= SYNC_INTERVAL_S - 1e-9 for a, b in zip(sent, sent[1:], strict=False))


def test_while_the_seed_learns_the_size_the_child_asks_every_interval_and_keeps_its_bucket() -> None:
    m = TaskMachine("me", Limits(peer_news=True), random.Random(1), 0.0)
    waiting = SyncReply(task_id=TASK, state="waiting", reason="waiting for the seed to learn the blob's size")
    m.register_answered(waiting, 0.0)
    sent = []
    now = 0.0
    while now < 2.0:
        now = m.next_sync_at(now)
        sent.append(now)
        m.sync_answered(m.take_report(now), waiting, now)
    # Every SYNC_INTERVAL_S, not SYNC_BURST then one a second: no parent to hear news from yet.
    assert len(sent) >= 2.0 / SYNC_INTERVAL_S - 1
    assert all(abs((b - a) - SYNC_INTERVAL_S) < 1e-9 for a, b in zip(sent, sent[1:], strict=False))
    m.sync_answered(m.take_report(now + SYNC_INTERVAL_S), running(parent("a", [])), now + SYNC_INTERVAL_S)
    m.store_opened(SIZE, 0, [])
    # Sized now: the bucket was not spent on the wait, so the next urgent syncs go out at once.
    at = now + SYNC_INTERVAL_S
    m.parent_lost("a", at)
    for _ in range(SYNC_BURST):
        due = m.next_sync_at(at)
        assert due == at + SYNC_INTERVAL_S
        at = due
        m.sync_answered(m.take_report(at), running(), at)


def test_without_peer_news_the_child_syncs_every_sync_interval() -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(running(parent("a")), 0.0)
    m.store_opened(SIZE, 0, [])
    assert m.next_sync_at(0.0) == SYNC_INTERVAL_S
    m.sync_answered(m.take_report(0.2), running(parent("a", [0])), 0.2)
    assert m.parents["a"].pieces == 1  # the scheduler's bitmap replaces, as before


def test_with_peer_news_the_schedulers_older_bitmap_does_not_erase_news() -> None:
    m = machine(parent("a", []))
    m.parent_news("a", 0b111, 0.1)
    m.sync_answered(m.take_report(0.2), running(parent("a", [0])), 0.2)
    assert m.parents["a"].pieces == 0b111


def test_a_finished_download_asks_nothing_more() -> None:
    m = machine(parent("a"), concurrent_pieces=PIECES, per_parent_pieces=PIECES)
    for request in m.poll(0.0):
        m.piece_done(request.number, PieceOutcome.VERIFIED, 0.5)
    assert m.complete and m.next_sync_at(0.5) == float("inf")


def test_the_daemon_has_piece_news_unless_configured_off() -> None:
    assert Limits.from_config(PeerConfig()).peer_news is True
    assert Limits.from_config(PeerConfig(peer_news=False)).peer_news is False

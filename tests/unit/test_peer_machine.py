"""The peer's download rules, driven directly: scheduler replies and piece outcomes in, requests
and back-to-source decisions out, on a clock the test sets."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from p2pdist.config import PeerConfig
from p2pdist.content.pieces import Bitmap, MiB
from p2pdist.wire import Parent, SyncReply
from peer.machine import (
    BLOCK_S,
    BUSY_S,
    IDLE_SYNC_INTERVAL_S,
    MIN_CONCURRENT_PIECES,
    PARENT_ABSENT,
    PARENT_FAILURES,
    STALL_S,
    SYNC_INTERVAL_S,
    BackToSourceReason,
    Limits,
    PieceOutcome,
    TaskMachine,
    concurrent_pieces_for,
)
from peer.selection import SOLE_PARENT_PIECES

TASK = "sha256:" + "ab" * 32
PIECES = 8
SIZE = PIECES * 4 * MiB  # 4 MiB pieces
DIGESTS = [bytes([n]) * 32 for n in range(PIECES)]


def parent(host_id: str, pieces: range | list[int] = range(PIECES)) -> Parent:
    bitmap = Bitmap(PIECES)
    for n in pieces:
        bitmap.add(n)
    return Parent(host_id=host_id, url=f"http://{host_id}:4000", pieces=bitmap.to_bytes())


def running(*parents: Parent, digests: list[bytes] = DIGESTS) -> SyncReply:
    return SyncReply(
        task_id=TASK,
        state="running",
        content_length=SIZE,
        piece_size=4 * MiB,
        first_digest=0,
        piece_digests=digests,
        parents=list(parents),
    )


def machine(*parents: Parent, seed: int = 1, now: float = 0.0, **limits: int | float) -> TaskMachine:
    """A download that registered at `now` and was given `parents`, its store open and empty."""
    m = TaskMachine("me", Limits(**limits), random.Random(seed), now)  # type: ignore[arg-type]
    m.register_answered(running(*parents), now)
    assert m.wants_store
    m.store_opened(SIZE, 0, [])
    return m


def test_rarest_piece_is_requested_first() -> None:
    for seed in range(20):
        m = machine(parent("a", [0, 1, 2]), parent("b", [0, 1]), seed=seed, concurrent_pieces=1)
        assert [(r.number, r.host_id) for r in m.poll(0.0)] == [(2, "a")]  # only a holds piece 2


def test_each_parent_gets_at_most_its_limit_and_a_sole_parent_a_few() -> None:
    m = machine(parent("a"), parent("b"), per_parent_pieces=1)
    requests = m.poll(0.0)
    assert sorted(r.host_id for r in requests) == ["a", "b"]
    assert m.poll(0.0) == []  # both at their limit: nothing more until a piece ends

    sole = machine(parent("a"), per_parent_pieces=1)
    assert len(sole.poll(0.0)) == SOLE_PARENT_PIECES


def test_busy_parent_is_left_alone_for_busy_s() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (request,) = m.poll(0.0)
    m.piece_done(request.number, PieceOutcome.BUSY, 1.0)
    assert m.poll(1.0) == [] and m.poll(1.0 + BUSY_S / 2) == []
    assert m.wake_at(1.0) == 1.0 + BUSY_S
    (again,) = m.poll(1.0 + BUSY_S)
    assert again.host_id == "a"
    assert m.take_report().failed_parents == []  # busy is no failure


def test_corrupt_parent_is_blocked_reported_as_bad_and_taken_back_after_block_s() -> None:
    m = machine(parent("a"), parent("b"), concurrent_pieces=2)
    by_host = {r.host_id: r for r in m.poll(0.0)}
    m.piece_done(by_host["a"].number, PieceOutcome.CORRUPT, 1.0)
    assert "a" not in m.parents
    report = m.take_report()
    assert report.bad_parents == ["a"] and report.failed_parents == []
    # The scheduler still offers it: refused until BLOCK_S has passed.
    m.sync_answered(report, running(parent("a"), parent("b")), 2.0)
    assert "a" not in m.parents
    assert m.take_report().bad_parents == []  # reported once
    m.sync_answered(m.take_report(), running(parent("a"), parent("b")), 1.0 + BLOCK_S)
    assert "a" in m.parents


def test_parent_answering_404s_for_pieces_it_claims_is_blocked_at_parent_absent() -> None:
    m = machine(parent("a"), parent("b"), concurrent_pieces=1)
    for k in range(PARENT_ABSENT):
        m.sync_answered(m.take_report(), running(parent("a"), parent("b")), float(k))
        m.parents["b"].busy_until = float("inf")  # only a is asked
        (request,) = m.poll(float(k))
        assert request.host_id == "a"
        m.piece_done(request.number, PieceOutcome.ABSENT, float(k))
        if k < PARENT_ABSENT - 1:
            assert not m.parents["a"].pieces >> request.number & 1  # it does not hold it after all
            assert m.take_report().failed_parents == []
    assert "a" not in m.parents
    assert m.take_report().failed_parents == ["a"]


def test_parent_is_blocked_after_parent_failures_in_a_row() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (first,) = m.poll(0.0)
    m.piece_done(first.number, PieceOutcome.FAILED, 0.0)
    (second,) = m.poll(0.0)
    m.piece_done(second.number, PieceOutcome.VERIFIED, 0.0)  # a success forgives
    for _ in range(PARENT_FAILURES):
        assert "a" in m.parents
        (request,) = m.poll(1.0)
        m.piece_done(request.number, PieceOutcome.FAILED, 1.0)
    assert "a" not in m.parents
    report = m.take_report()
    assert report.failed_parents == ["a"] and report.new_pieces == [second.number]


def test_no_piece_for_stall_s_goes_back_to_source_but_not_while_one_is_in_flight() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (request,) = m.poll(0.0)
    m.poll(STALL_S + 1)
    assert m.back_to_source is None  # a piece is still on its way
    m.piece_done(request.number, PieceOutcome.FAILED, STALL_S + 1)
    m.parents["a"].busy_until = float("inf")
    assert m.wake_at(STALL_S + 1) == STALL_S  # the last progress was at the start
    m.poll(STALL_S + 2)
    assert m.back_to_source is not None and m.back_to_source.reason is BackToSourceReason.STALLED
    assert m.finished and m.poll(STALL_S + 3) == []


def test_size_still_unknown_after_wait_for_seed_s_goes_back_to_source() -> None:
    m = TaskMachine("me", Limits(wait_for_seed_s=60.0), random.Random(1), 0.0)
    m.register_answered(SyncReply(task_id=TASK, state="waiting"), 5.0)
    m.poll(64.0)
    assert m.back_to_source is None and m.wake_at(64.0) == 65.0
    m.poll(65.5)
    assert m.back_to_source is not None and m.back_to_source.reason is BackToSourceReason.SIZE_UNKNOWN


def test_schedule_rounds_of_failed_syncs_go_back_to_source_only_with_no_parent_with_work() -> None:
    m = machine(parent("a", [0]), schedule_rounds=4)
    for k in range(6):
        m.sync_failed(m.take_report(), float(k))
    assert m.back_to_source is None  # a still holds piece 0 for us
    assert m.sync_delay() == 2.0  # backed off, capped

    (request,) = m.poll(6.0)
    m.piece_done(request.number, PieceOutcome.VERIFIED, 6.0)  # a has nothing more
    m.sync_failed(m.take_report(), 7.0)
    assert m.back_to_source is not None
    assert m.back_to_source.reason is BackToSourceReason.SCHEDULER_UNREACHABLE
    assert m.back_to_source.reason.value == "scheduler_unreachable"  # the metric's label


def test_pieces_not_reported_by_a_failed_sync_go_with_the_next() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (request,) = m.poll(0.0)
    m.piece_done(request.number, PieceOutcome.VERIFIED, 0.0)
    report = m.take_report()
    assert report.new_pieces == [request.number] and report.content_length == SIZE
    m.sync_failed(report, 0.2)
    assert m.take_report().new_pieces == [request.number]


def test_pieces_are_asked_in_order_once_every_parent_holds_the_whole_blob() -> None:
    for seed in range(10):
        m = machine(parent("a"), parent("b"), seed=seed, concurrent_pieces=2)
        assert sorted(r.number for r in m.poll(0.0)) == [0, 1]
    # With a parent still missing pieces, equally rare pieces start at random places.
    firsts: set[int] = set()
    for seed in range(10):
        m = machine(parent("a"), parent("b", range(PIECES - 1)), seed=seed, concurrent_pieces=2)
        firsts.update(r.number for r in m.poll(0.0) if r.number != PIECES - 1)
    assert firsts - {0, 1}


def test_parent_with_a_piece_in_flight_is_kept_until_it_finishes() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (request,) = m.poll(0.0)
    m.sync_answered(m.take_report(), running(parent("b")), 0.2)
    assert set(m.parents) == {"a", "b"}
    m.piece_done(request.number, PieceOutcome.VERIFIED, 0.3)
    m.sync_answered(m.take_report(), running(parent("b")), 0.4)
    assert set(m.parents) == {"b"}


def test_only_pieces_with_known_digests_are_requested() -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(running(parent("a"), digests=DIGESTS[:2]), 0.0)
    m.store_opened(SIZE, 0, [])
    assert sorted(r.number for r in m.poll(0.0)) == [0, 1]


def test_pieces_held_from_an_earlier_run_are_not_fetched_again() -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(running(parent("a")), 0.0)
    m.store_opened(SIZE, (1 << PIECES) - 1 - 1, DIGESTS)  # all but piece 0
    assert [r.number for r in m.poll(0.0)] == [0]


def test_scheduler_answers_say_why_the_download_goes_back_to_source() -> None:
    said = TaskMachine("me", Limits(), random.Random(1), 0.0)
    said.register_answered(SyncReply(task_id=TASK, state="back_to_source", reason="no seed peer available"), 0.0)
    assert said.back_to_source is not None
    assert said.back_to_source.reason is BackToSourceReason.SCHEDULER_SAID
    assert said.back_to_source.detail == "no seed peer available"

    unreachable = TaskMachine("me", Limits(), random.Random(1), 0.0)
    unreachable.register_failed("connection refused")
    assert unreachable.back_to_source is not None
    assert unreachable.back_to_source.reason is BackToSourceReason.SCHEDULER_UNREACHABLE

    # A 4xx at registration (a registry not allowed, over a rate) is the scheduler's no, not an outage.
    refused = TaskMachine("me", Limits(), random.Random(1), 0.0)
    refused.register_failed("scheduler answered 429: over the rate", refused=True)
    assert refused.back_to_source is not None
    assert refused.back_to_source.reason is BackToSourceReason.SCHEDULER_SAID
    assert refused.back_to_source.detail == "scheduler refused the task (scheduler answered 429: over the rate)"


def test_a_forgetful_scheduler_is_registered_with_again_and_told_everything_held() -> None:
    m = machine(parent("a"), concurrent_pieces=1)
    (request,) = m.poll(0.0)
    m.piece_done(request.number, PieceOutcome.VERIFIED, 0.0)
    m.sync_answered(m.take_report(), SyncReply(task_id=TASK, state="unknown", reason="register first"), 0.2)
    report = m.take_report()
    assert report.register and report.new_pieces == [request.number]


def test_syncs_slow_down_once_complete_and_nothing_is_left_to_report() -> None:
    m = machine(parent("a"), concurrent_pieces=PIECES, per_parent_pieces=PIECES)
    assert m.sync_delay() == SYNC_INTERVAL_S
    for request in m.poll(0.0):
        m.piece_done(request.number, PieceOutcome.VERIFIED, 1.0)
    assert m.complete and m.sync_delay() == SYNC_INTERVAL_S  # the last pieces still to report
    m.take_report()
    assert m.sync_delay() == IDLE_SYNC_INTERVAL_S


def test_own_host_and_malformed_bitmaps_are_not_parents() -> None:
    bad = Parent(host_id="short", url="http://short:4000", pieces=b"")
    m = machine(parent("me"), bad, parent("a"))
    assert set(m.parents) == {"a"}


def test_a_new_owner_is_registered_with_and_told_everything_while_the_parents_keep_serving() -> None:
    m = machine(parent("a"), concurrent_pieces=2)
    first, second = m.poll(0.0)
    m.piece_done(first.number, PieceOutcome.VERIFIED, 0.0)
    m.sync_answered(m.take_report(), running(parent("a")), 0.2)
    m.sync_failed(m.take_report(), 0.4)  # the owner stopped answering

    m.scheduler_changed()
    report = m.take_report()
    assert report.register and report.new_pieces == [first.number]
    # The parent it had is still asked, and the piece in flight still counts.
    (third,) = m.poll(0.5)
    assert third.host_id == "a" and third.number not in (first.number, second.number)
    m.sync_answered(report, running(parent("a")), 0.6)
    assert not m.take_report().register


def test_the_scheduler_decides_the_piece_size() -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(replace(running(), content_length=SIZE // 2, piece_size=2 * MiB), 0.0)
    assert (m.content_length, m.piece_size, m.count) == (SIZE // 2, 2 * MiB, PIECES)
    m.store_opened(SIZE // 2, 0, [])
    assert m.take_report().piece_size == 2 * MiB


def test_a_reply_without_a_piece_size_means_the_old_rule() -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(replace(running(), piece_size=None), 0.0)  # an older scheduler's or site holder's
    assert m.piece_size == 4 * MiB and m.count == PIECES and m.back_to_source is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"piece_size": 3 * MiB}, "not a power of two"),
        ({"piece_size": 128 * MiB}, "not a power of two from"),
        ({"piece_size": 512 * 1024}, "not a power of two from"),
        ({"piece_size": 8 * MiB}, "8 piece digests for 4 pieces"),  # the digests are of smaller pieces
        ({"first_digest": 1}, "9 piece digests for 8 pieces"),
    ],
)
def test_a_reply_with_an_unusable_layout_is_refused_not_a_crash(change: dict[str, int], why: str) -> None:
    m = TaskMachine("me", Limits(), random.Random(1), 0.0)
    m.register_answered(replace(running(parent("a")), **change), 0.0)  # type: ignore[arg-type]
    assert m.back_to_source is not None and m.back_to_source.reason is BackToSourceReason.BAD_REPLY
    assert why in m.back_to_source.detail
    assert not m.wants_store and m.poll(1.0) == []


def test_a_reply_cutting_the_blob_otherwise_than_the_store_is_refused() -> None:
    """The store was cut before this scheduler answered (another scheduler, or the rule while
    going to the origin): fetching its pieces from parents cut otherwise would fail at each."""
    m = machine(parent("a"))
    m.sync_answered(m.take_report(), replace(running(parent("a")), piece_size=2 * MiB, piece_digests=[]), 1.0)
    assert m.back_to_source is not None and m.back_to_source.reason is BackToSourceReason.BAD_REPLY
    assert "cut as" in m.back_to_source.detail
    later = TaskMachine("me", Limits(), random.Random(1), 0.0)
    later.store_opened(SIZE, 0, [], 2 * MiB)  # back to source first
    later.register_answered(running(parent("a")), 1.0)
    assert later.back_to_source is not None and later.back_to_source.reason is BackToSourceReason.BAD_REPLY


def test_pieces_in_flight_follow_the_upload_slots_unless_configured() -> None:
    # Slow links keep the 8 the 16-host rollout runs with; a link with 8 upload slots asks for
    # 12 at once: about as many flows as its parents split their uploads into, and half again
    # for requests waiting in a busy parent's line (issue 17).
    assert concurrent_pieces_for(1) == concurrent_pieces_for(4) == MIN_CONCURRENT_PIECES == 8
    assert concurrent_pieces_for(8) == 12
    assert Limits.from_config(PeerConfig(upload_rate_bps=8 << 20)).concurrent_pieces == 8
    assert Limits.from_config(PeerConfig(upload_rate_bps=100 << 20)).concurrent_pieces == 12
    assert Limits.from_config(PeerConfig(upload_rate_bps=100 << 20, concurrent_pieces=5)).concurrent_pieces == 5
    assert Limits.from_config(PeerConfig(upload_slots=2)).concurrent_pieces == 8

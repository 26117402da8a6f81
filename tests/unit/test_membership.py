"""Which schedulers a host counts as alive: a failure sends one into its back-off, its tasks
fall to the next in rank, and an answer (or the back-off running out) brings it back."""

from __future__ import annotations

from p2pdist.cluster.membership import Membership
from p2pdist.cluster.rendezvous import rank

A, B, C = "http://10.0.0.1:8002", "http://10.0.0.2:8002", "http://10.0.0.3:8002"
TASK = "sha256:" + "ab" * 32


def test_a_failed_owner_hands_its_task_to_the_next_in_rank_until_it_answers_again() -> None:
    members = Membership([A, B, C], backoff_s=10.0)
    first, second, third = rank(TASK, [A, B, C])
    assert members.owner(TASK, 0.0) == first
    assert members.failed(first, 1.0) is True
    assert members.owner(TASK, 1.0) == second
    assert members.order(TASK, 1.0) == [second, third]
    assert members.failed(first, 2.0) is False  # already dead: no second "went away"
    assert members.answered(first, 3.0) is True  # came back: tell it what we hold
    assert members.owner(TASK, 3.0) == first
    assert members.answered(first, 4.0) is False


def test_the_back_off_runs_out_and_is_renewed_by_each_failure() -> None:
    members = Membership([A, B], backoff_s=5.0)
    members.failed(A, 0.0)
    members.failed(A, 4.0)
    assert not members.is_alive(A, 8.0)
    assert members.is_alive(A, 9.0)


def test_every_member_dead_means_no_owner() -> None:
    members = Membership([A, B], backoff_s=5.0)
    members.failed(A, 0.0)
    members.failed(B, 0.0)
    assert members.owner(TASK, 1.0) is None
    assert members.order(TASK, 1.0) == []


def test_new_members_from_dns_are_reported_and_gone_ones_forgotten() -> None:
    members = Membership([A, B], backoff_s=5.0)
    members.failed(B, 0.0)
    assert members.set_members([A, C]) == [C]
    assert members.members == (A, C)
    assert members.dead_until == {}
    assert members.failed("http://elsewhere:1", 0.0) is True  # not a member: nothing recorded
    assert members.dead_until == {}

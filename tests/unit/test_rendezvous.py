"""Rendezvous hashing: every host computes the same owner, and a member leaving moves only its
own keys, about 1/n of them."""

from __future__ import annotations

import hashlib
from collections import Counter

from p2pdist.cluster.rendezvous import owner, rank, weight

SCHEDULERS = [f"http://10.0.0.{i}:8002" for i in range(1, 4)]
TASKS = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]


def test_owner_is_deterministic_and_independent_of_member_order() -> None:
    for task in TASKS[:200]:
        first = owner(task, SCHEDULERS)
        assert first == owner(task, list(reversed(SCHEDULERS))) == rank(task, SCHEDULERS)[0]
    # A fixed value, so a change to the hash (which would split a mixed-version cluster) fails here.
    assert weight("sha256:" + "0" * 64, "http://10.0.0.1:8002") == 2286519046460073842
    assert owner("sha256:" + "0" * 64, SCHEDULERS) == owner("sha256:" + "0" * 64, set(SCHEDULERS))


def test_no_members_no_owner() -> None:
    assert owner(TASKS[0], []) is None
    assert rank(TASKS[0], []) == []


def test_tasks_spread_evenly_over_members() -> None:
    counts = Counter(owner(task, SCHEDULERS) for task in TASKS)
    assert set(counts) == set(SCHEDULERS)
    for n in counts.values():
        assert abs(n - len(TASKS) / 3) < len(TASKS) * 0.03, counts


def test_a_member_leaving_moves_only_its_own_tasks_to_their_next_in_rank() -> None:
    for n in (3, 5, 10):
        members = [f"http://10.0.1.{i}:8002" for i in range(n)]
        gone = members[n // 2]
        left = [m for m in members if m != gone]
        before = {task: rank(task, members) for task in TASKS}
        moved = 0
        for task in TASKS:
            after = owner(task, left)
            if before[task][0] == gone:
                moved += 1
                assert after == before[task][1]  # the fallback order every host computed before
            else:
                assert after == before[task][0]  # nobody else's task moves
        assert abs(moved / len(TASKS) - 1 / n) < 0.02, (n, moved)


def test_a_member_joining_takes_about_one_in_n_plus_one_tasks_and_only_from_others() -> None:
    joined = "http://10.0.0.4:8002"
    moved = [t for t in TASKS if owner(t, SCHEDULERS) != owner(t, [*SCHEDULERS, joined])]
    assert all(owner(t, [*SCHEDULERS, joined]) == joined for t in moved)
    assert abs(len(moved) / len(TASKS) - 1 / 4) < 0.02

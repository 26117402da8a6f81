"""Parent choice policy: scoring, cycles, keeping parents, sampling."""

from __future__ import annotations

import random

from scheduler.parents import Candidate, choose_parents, creates_cycle, score


def cand(
    host_id: str,
    *,
    useful: int = 5,
    pieces: int | None = None,
    complete: bool = False,
    children: int = 0,
    slots: int = 4,
    seed: bool = False,
) -> Candidate:
    return Candidate(
        host_id=host_id,
        pieces=useful if pieces is None else pieces,
        useful=useful,
        complete=complete,
        children=children,
        upload_slots=slots,
        is_seed=seed,
    )


def choose(
    child: str,
    candidates: list[Candidate],
    *,
    keep: tuple[str, ...] = (),
    want: int = 4,
    total: int = 10,
    parents_of: dict[str, list[str]] | None = None,
    sample: int = 40,
    seed: int = 0,
) -> list[str]:
    return choose_parents(
        child,
        candidates,
        keep=keep,
        want=want,
        total_pieces=total,
        parents_of=parents_of or {},
        sample=sample,
        rng=random.Random(seed),
    )


def test_never_returns_child() -> None:
    for s in range(20):
        got = choose("c", [cand("c", useful=10), cand("a"), cand("b")], seed=s)
        assert "c" not in got
        assert sorted(got) == ["a", "b"]


def test_creates_cycle() -> None:
    parents_of = {"a": ["b"], "b": ["c"], "c": []}
    assert creates_cycle("c", "a", parents_of)  # c is an ancestor of a
    assert creates_cycle("a", "a", parents_of)
    assert not creates_cycle("a", "c", parents_of)
    assert not creates_cycle("x", "a", parents_of)
    # Tolerates an existing loop without spinning forever.
    assert not creates_cycle("x", "p", {"p": ["q"], "q": ["p"]})


def test_never_returns_candidate_that_closes_a_cycle() -> None:
    # Chain: a <- b <- c <- d (d's parent is c, c's parent is b, b's parent is a).
    parents_of = {"d": ["c"], "c": ["b"], "b": ["a"], "a": []}
    candidates = [cand(h, useful=9) for h in ("b", "c", "d", "e")]
    for s in range(20):
        got = choose("a", candidates, parents_of=parents_of, seed=s)
        assert set(got) == {"e"}, got
        got = choose("c", candidates, parents_of=parents_of, seed=s)
        assert "d" not in got and "c" not in got
        assert set(got) == {"b", "e"}


def test_prefers_more_useful_pieces() -> None:
    candidates = [cand("few", useful=1), cand("many", useful=10), cand("mid", useful=5)]
    for s in range(20):
        assert choose("c", candidates, want=1, seed=s) == ["many"]
        assert choose("c", candidates, want=2, seed=s) == ["many", "mid"]


def test_prefers_free_upload_slots() -> None:
    busy = cand("busy", useful=10, children=4, slots=4)
    idle = cand("idle", useful=10, children=0, slots=4)
    for s in range(20):
        assert choose("c", [busy, idle], want=1, seed=s) == ["idle"]
    # Load counts most: a free parent with fewer useful pieces beats a saturated one with all.
    partly = cand("free", useful=3, children=0, slots=4)
    for s in range(20):
        assert choose("c", [busy, partly], want=1, seed=s) == ["free"]


def test_score_orders() -> None:
    assert score(cand("a", useful=10), 10) > score(cand("a", useful=1), 10)
    assert score(cand("a", children=0), 10) > score(cand("a", children=3), 10)
    assert score(cand("a"), 10) > score(cand("a", seed=True), 10)
    # zero slots / zero total pieces must not divide by zero
    assert score(cand("a", slots=0, useful=0), 0) >= 0


def test_seed_comes_last_among_equals() -> None:
    for s in range(20):
        assert choose("c", [cand("seed", seed=True), cand("peer")], want=1, seed=s) == ["peer"]


def test_keeps_current_useful_parents() -> None:
    weak = cand("weak", useful=1, children=3, slots=4)
    strong = [cand(f"s{i}", useful=10) for i in range(5)]
    for s in range(10):
        got = choose("c", [weak, *strong], keep=("weak",), want=2, seed=s)
        assert got[0] == "weak"
        assert len(got) == 2


def test_drops_kept_parent_that_is_gone_or_useless() -> None:
    done_useless = cand("old", useful=0, complete=True)
    got = choose("c", [done_useless, cand("new")], keep=("old", "vanished"), want=4)
    assert got == ["new"]


def test_keep_truncated_to_want() -> None:
    cands = [cand(h) for h in "abcdef"]
    assert choose("c", cands, keep=("a", "b", "c2", "d"), want=2) == ["a", "b"]


def test_respects_want() -> None:
    cands = [cand(f"p{i}") for i in range(20)]
    for want in (0, 1, 3, 7):
        got = choose("c", cands, want=want)
        assert len(got) == want
        assert len(set(got)) == want
    assert choose("c", cands[:2], want=5) != []
    assert len(choose("c", cands[:2], want=5)) == 2


def test_complete_candidate_with_nothing_useful_excluded() -> None:
    got = choose("c", [cand("done", useful=0, complete=True), cand("other", useful=1)])
    assert got == ["other"]


def test_downloading_seed_with_nothing_useful_yet_may_be_offered() -> None:
    seed = cand("seed", useful=0, pieces=0, complete=False, seed=True)
    assert choose("c", [seed]) == ["seed"]
    peer = cand("peer", useful=0, pieces=0, complete=False)
    assert choose("c", [peer]) == ["peer"]


def test_sampling_bounds_with_thousands_of_candidates() -> None:
    rng = random.Random(1)
    cands = [cand(f"p{i}", useful=rng.randint(0, 9), children=rng.randint(0, 4)) for i in range(5000)]
    cands.append(cand("seed", useful=10, complete=True, seed=True))
    cands.append(cand("done", useful=10, complete=True))
    # a long chain for cycle checks to walk
    parents_of = {f"p{i}": [f"p{i - 1}"] for i in range(1, 5000)}
    # Speed belongs in benchmarks (benchmarks/simulate.py drives this at 5,000 hosts).
    for s in range(50):
        got = choose("child", cands, want=4, sample=40, parents_of=parents_of, seed=s)
        assert len(got) == 4
        assert "child" not in got
    # complete peers and the seed are always considered, so the complete full peer wins a slot
    got = choose("child", cands, want=1, sample=40, seed=3)
    assert got == ["done"]


def test_sampling_never_picks_cycle() -> None:
    n = 2000
    parents_of = {f"p{i}": [f"p{i - 1}"] for i in range(1, n)}
    parents_of["p0"] = ["child"]  # every p_i descends from child
    cands = [cand(f"p{i}") for i in range(n)] + [cand("free")]
    for s in range(20):
        got = choose("child", cands, want=4, sample=30, parents_of=parents_of, seed=s)
        assert all(h == "free" for h in got)


def test_the_sort_key_of_a_decision_is_rank_exactly() -> None:
    from scheduler.parents import _rank_key, rank

    rng = random.Random(7)
    for _ in range(2000):
        c = Candidate(
            host_id="h",
            pieces=rng.randrange(300),
            useful=rng.choice([0, rng.randrange(300)]),
            complete=rng.random() < 0.2,
            children=rng.randrange(40),
            upload_slots=rng.choice([1, 2, 3, 4, 16, 64]),
            is_seed=rng.random() < 0.1,
            same_site=rng.random() < 0.5,
            nearness=rng.randrange(4),
        )
        total = rng.choice([0, 1, 128, 256, 1000])
        assert _rank_key(total)(c) == rank(c, total)

"""Parent choice: which peers a child should fetch a task's pieces from.

Pure: takes the task's peers and hosts as plain records and returns host ids, so the
service, the tests and the 5,000-host simulator all run the same policy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

# A child fetches up to this many pieces at once from one parent (the peer's per_parent_pieces),
# so a parent with `upload_slots` slots serves about slots / 3 children at full speed.
SLOTS_PER_CHILD = 3


class Candidate(NamedTuple):  # a tuple: the scheduler builds dozens per decision
    host_id: str
    pieces: int  # pieces it holds
    useful: int  # pieces it holds that the child lacks
    complete: bool
    children: int  # children currently assigned to it across all tasks
    upload_slots: int
    is_seed: bool
    same_site: bool = True  # behind the child's WAN link (every host is, until sites are configured)
    nearness: int = 0  # leading location parts shared with the child (see p2pdist.site.nearness)


def capacity(c: Candidate) -> float:
    """Children a candidate can serve at full speed."""
    return max(1.0, c.upload_slots / SLOTS_PER_CHILD)


def worth_keeping(c: Candidate) -> bool:
    """A current parent stays while it has pieces the child lacks and is not overloaded."""
    return c.useful > 0 and c.children < max(1, c.upload_slots)


def score(c: Candidate, total_pieces: int) -> float:
    """Higher is better: pieces the child can use, and free upload slots (load counts most).

    A candidate with nothing the child can use now ranks below every one that has something:
    free slots on an empty peer move no bytes, and at the start of a rollout nearly every
    peer is empty and idle.
    """
    free = max(0.0, 1.0 - c.children / capacity(c))
    have = c.useful / max(1, total_pieces)
    # Seeds come last among equals: the origin-facing host is the scarcest upload of all.
    return (1.0 if c.useful else 0.0) + 0.6 * free + 0.4 * have - (0.05 if c.is_seed else 0.0)


def site_pool(candidates: list[Candidate], *, may_cross: bool) -> list[Candidate]:
    """The candidates a child may take under the site rule: pieces cross a site's WAN link only
    through its few WAN fetchers, so each piece crosses about once.

    A child that may not cross keeps to its own site: peers there that hold pieces or are
    fetching them (from the site's WAN fetchers, who pass each piece on as it arrives). A WAN
    fetcher takes what its site already holds from inside, and the rest from outside.
    """
    if may_cross:
        return [c for c in candidates if not c.same_site or c.useful > 0]
    return [c for c in candidates if c.same_site]


def rank(c: Candidate, total_pieces: int) -> tuple[bool, bool, int, float]:
    """Sort key, higher first: something useful now, then the own site, then the nearest
    location, then the score. With one site and no locations it orders exactly as `score`
    (a useful candidate always outscores a useless one)."""
    return (c.useful > 0, c.same_site, c.nearness, score(c, total_pieces))


def _rank_key(total_pieces: int) -> Callable[[Candidate], tuple[bool, bool, int, float]]:
    """`rank` as one function, the same values: it sorts every decision's pool, and the three
    calls per candidate of rank, score and capacity were a tenth of a decision's cost."""
    total = max(1, total_pieces)

    def key(c: Candidate) -> tuple[bool, bool, int, float]:
        useful = c.useful
        spare = c.upload_slots / SLOTS_PER_CHILD
        free = 1.0 - c.children / (spare if spare > 1.0 else 1.0)
        value = (1.0 if useful else 0.0) + 0.6 * (free if free > 0.0 else 0.0) + 0.4 * (useful / total)
        return (useful > 0, c.same_site, c.nearness, value - 0.05 if c.is_seed else value)

    return key


def creates_cycle(child: str, parent: str, parents_of: Mapping[str, Iterable[str]]) -> bool:
    """True if `child` is already an ancestor of `parent` (so child -> parent would close a loop)."""
    seen: set[str] = set()
    stack = [parent]
    while stack:
        node = stack.pop()
        if node == child:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(parents_of.get(node, ()))
    return False


def choose_parents(
    child: str,
    candidates: list[Candidate],
    *,
    keep: Iterable[str],
    want: int,
    total_pieces: int,
    parents_of: Mapping[str, Iterable[str]] | None = None,
    sample: int,
    rng: random.Random,
    closes_cycle: Callable[[str, str], bool] | None = None,
) -> list[str]:
    """Keep the current parents that still hold pieces the child lacks, then fill up to `want` with
    the best-scoring others (a parent with nothing useful now is dropped: the child re-asks every
    sync, and a slot held by an idle parent is download bandwidth lost).

    Never returns the child itself, a complete candidate with nothing the child lacks, or one
    that would make a cycle (peers still downloading, the seed among them, may be offered). Candidates are sampled first so that a task with thousands of peers
    costs a bounded amount of work per decision.

    `closes_cycle(child, parent)` replaces the walk over `parents_of` when the caller keeps a
    cheaper index (the scheduler keeps a topological order); it is called only for a candidate
    that will be chosen if it answers False.
    """
    graph = parents_of or {}
    cycle = closes_cycle or (lambda c, p: creates_cycle(c, p, graph))
    by_id = {c.host_id: c for c in candidates}
    chosen = [h for h in keep if h in by_id and worth_keeping(by_id[h])]
    chosen = chosen[:want]
    pool = [
        c for c in candidates if c.host_id != child and c.host_id not in chosen and (c.useful > 0 or not c.complete)
    ]
    if len(pool) > sample:
        # Always consider complete peers and the seed; sample the rest.
        sure = [c for c in pool if c.complete or c.is_seed]
        rest = [c for c in pool if not (c.complete or c.is_seed)]
        pool = sure[:sample] + rng.sample(rest, max(0, min(len(rest), sample - len(sure))))
    rng.shuffle(pool)  # ties broken at random, not by arrival order
    pool.sort(key=_rank_key(total_pieces), reverse=True)
    for c in pool:
        if len(chosen) >= want:
            break
        if not cycle(child, c.host_id):
            chosen.append(c.host_id)
    return chosen

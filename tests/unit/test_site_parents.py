"""Site-aware parent choice: parents from the own site, pieces into a site through few WAN
fetchers, nearer locations first; and no change at all without sites."""

from __future__ import annotations

import collections
import random

from p2pdist.config import SchedulerConfig
from p2pdist.content.pieces import MiB, PieceLayout
from p2pdist.wire import AnnounceHost, HostKind, Register, SeedProgress, Sync, SyncReply
from scheduler.parents import Candidate, rank, score, site_pool
from scheduler.state import Scheduler

TASK = "sha256:" + "ab" * 32
URL = "http://origin:5000/v2/lib/x/blobs/" + TASK
SIZE = 10 * MiB  # 3 pieces of 4 MiB
COUNT = PieceLayout.for_blob(SIZE).count
DIGESTS = [bytes([i]) * 32 for i in range(COUNT)]


def make(**cfg: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), rng=random.Random(7))  # type: ignore[arg-type]


def announce(s: Scheduler, host: str, site: str, kind: HostKind = "peer", location: str = "") -> None:
    s.announce(
        AnnounceHost(host_id=host, url=f"http://{host}:4000", kind=kind, upload_slots=8, site=site, location=location),
        0.0,
    )


def ready(s: Scheduler, *, seed_site: str = "core", seed_location: str = "") -> None:
    """A seed in `seed_site` that holds the whole blob."""
    announce(s, "seed", seed_site, "seed", seed_location)
    s.register(Register(host_id="seed", task_id=TASK, url=URL), 0.5)
    s.seed_progress(
        SeedProgress(
            host_id="seed", task_id=TASK, content_length=SIZE, first_digest=0, piece_digests=DIGESTS, done=True
        ),
        1.0,
    )


def register(s: Scheduler, host: str, now: float = 2.0) -> set[str]:
    reply, _ = s.register(Register(host_id=host, task_id=TASK, url=URL), now)
    return parents(reply)


def sync(s: Scheduler, host: str, now: float, **kw: object) -> set[str]:
    reply, _ = s.sync(Sync(host_id=host, task_id=TASK, **kw), now)  # type: ignore[arg-type]
    return parents(reply)


def parents(reply: SyncReply) -> set[str]:
    assert reply.state == "running", reply
    return {p.host_id for p in reply.parents}


def cand(host: str, *, useful: int = 1, same_site: bool = True, nearness: int = 0) -> Candidate:
    return Candidate(host, useful, useful, False, 0, 4, False, same_site=same_site, nearness=nearness)


# -- the pure rules ------------------------------------------------------------------------


def test_a_peer_that_may_not_cross_keeps_to_its_site() -> None:
    pool = [cand("in-empty", useful=0), cand("in-full"), cand("out", same_site=False)]
    assert [c.host_id for c in site_pool(pool, may_cross=False)] == ["in-empty", "in-full"]


def test_a_wan_fetcher_takes_from_inside_only_what_the_site_holds() -> None:
    pool = [cand("in-empty", useful=0), cand("in-full"), cand("out", same_site=False)]
    assert [c.host_id for c in site_pool(pool, may_cross=True)] == ["in-full", "out"]


def test_rank_puts_useful_then_own_site_then_nearer_locations_first() -> None:
    pool = [
        cand("out-far", same_site=False),
        cand("out-near", same_site=False, nearness=2),
        cand("useless-in", useful=0),
        cand("in"),
    ]
    pool.sort(key=lambda c: rank(c, 10), reverse=True)
    assert [c.host_id for c in pool] == ["in", "out-near", "out-far", "useless-in"]


def test_without_sites_rank_orders_exactly_as_score() -> None:
    rng = random.Random(3)
    pool = [
        Candidate(f"h{i}", rng.randint(0, 9), rng.randint(0, 3), rng.random() < 0.2, rng.randint(0, 9), 4, i == 0)
        for i in range(200)
    ]
    by_score = sorted(pool, key=lambda c: score(c, 10), reverse=True)
    by_rank = sorted(pool, key=lambda c: rank(c, 10), reverse=True)
    assert by_rank == by_score


# -- the scheduler -------------------------------------------------------------------------


def test_first_peer_of_a_site_fetches_from_outside_and_the_rest_from_it() -> None:
    s = make()
    ready(s)
    for h in ("a1", "a2", "a3"):
        announce(s, h, "store-a")
    assert register(s, "a1") == {"seed"}  # the site's WAN fetcher
    assert register(s, "a2") == {"a1"}  # fetching: its pieces pass on as they arrive
    assert register(s, "a3") <= {"a1", "a2"}
    assert s.tasks[TASK].wan_fetchers["store-a"] == {"a1"}


def test_a_site_gets_a_piece_from_inside_once_someone_there_holds_it() -> None:
    s = make()
    ready(s)
    for h in ("a1", "a2"):
        announce(s, h, "store-a")
    register(s, "a1")
    sync(s, "a1", 2.2, new_pieces=[0, 1])
    assert register(s, "a2", 2.4) == {"a1"}
    # Another site's peers are never parents of a2, even complete ones.
    announce(s, "b1", "store-b")
    register(s, "b1", 2.5)
    sync(s, "b1", 2.6, new_pieces=[0, 1, 2], done=True)
    assert sync(s, "a2", 2.8) == {"a1"}


def test_wan_fetchers_per_site_and_task_are_configurable() -> None:
    s = make(site_wan_fetchers=2)
    ready(s)
    for h in ("a1", "a2", "a3"):
        announce(s, h, "store-a")
    assert "seed" in register(s, "a1")
    assert "seed" in register(s, "a2")
    assert "seed" not in register(s, "a3")
    assert s.tasks[TASK].wan_fetchers["store-a"] == {"a1", "a2"}


def test_each_site_has_its_own_fetcher() -> None:
    s = make()
    ready(s)
    for h, site in (("a1", "store-a"), ("a2", "store-a"), ("b1", "store-b"), ("b2", "store-b")):
        announce(s, h, site)
    register(s, "a1")
    sync(s, "a1", 2.1, new_pieces=[0])
    assert register(s, "b1") >= {"seed"}  # store-b's fetcher: may take a1's piece or the seed's
    assert register(s, "b2") == {"b1"}
    assert s.tasks[TASK].wan_fetchers == {"store-a": {"a1"}, "store-b": {"b1"}}


def test_a_fetcher_that_leaves_is_replaced() -> None:
    s = make()
    ready(s)
    for h in ("a1", "a2"):
        announce(s, h, "store-a")
    register(s, "a1")
    register(s, "a2")
    s.leave_host("a1", 3.0)
    assert sync(s, "a2", 3.2) == {"seed"}
    assert s.tasks[TASK].wan_fetchers["store-a"] == {"a2"}


def test_no_piece_crosses_into_a_site_that_holds_the_whole_blob() -> None:
    s = make(site_wan_fetchers=3)
    ready(s)
    for h in ("a1", "a2"):
        announce(s, h, "store-a")
    register(s, "a1")
    sync(s, "a1", 2.2, new_pieces=[0, 1, 2], done=True)
    assert register(s, "a2", 2.4) == {"a1"}
    assert s.tasks[TASK].wan_fetchers["store-a"] == set()


def test_a_fetcher_takes_what_its_site_holds_from_inside_first() -> None:
    s = make(site_wan_fetchers=2, candidate_parents=1)
    ready(s)
    for h in ("a1", "a2"):
        announce(s, h, "store-a")
    register(s, "a2")
    sync(s, "a2", 2.2, new_pieces=[2])
    assert register(s, "a1", 2.4) == {"a2"}  # not the seed, which holds more
    assert s.tasks[TASK].wan_fetchers["store-a"] == {"a1", "a2"}


def test_a_fetcher_prefers_the_nearest_location_outside() -> None:
    s = make(candidate_parents=1)
    ready(s, seed_location="us/east")
    announce(s, "a1", "store-a", location="eu/fr/paris-3")
    for h, site, location in (("b1", "store-b", "eu/de/berlin-1"), ("c1", "store-c", "eu/fr/lyon-1")):
        announce(s, h, site, location=location)
        register(s, h)
        sync(s, h, 2.1, new_pieces=[0, 1, 2], done=True)
    assert register(s, "a1", 2.5) == {"c1"}  # same region (eu/fr) before same continent before anywhere


def test_a_site_seed_fetching_the_task_is_the_sites_way_in() -> None:
    s = make()
    ready(s)  # the core's seed holds the blob
    announce(s, "edge", "store-a", "seed")
    s.register(Register(host_id="edge", task_id=TASK, url=URL), 1.5)  # the edge seed is on it
    announce(s, "a1", "store-a")
    assert register(s, "a1") == {"edge"}


def test_locations_alone_order_parents_but_nothing_is_held_back() -> None:
    s = make(candidate_parents=1)
    ready(s, seed_site="", seed_location="eu/de")
    announce(s, "p1", "", location="eu/fr/paris-3")
    announce(s, "p2", "", location="eu/fr/paris-3")
    register(s, "p1")
    sync(s, "p1", 2.1, new_pieces=[0, 1, 2], done=True)
    assert register(s, "p2", 2.4) == {"p1"}


def test_site_awareness_can_be_turned_off() -> None:
    s = make(site_aware=False, candidate_parents=8)
    ready(s)
    for h in ("a1", "a2"):
        announce(s, h, "store-a")
    register(s, "a1")
    assert "seed" in register(s, "a2")
    assert not s.tasks[TASK].wan_fetchers


def test_site_indexes_stay_consistent_as_peers_join_and_leave() -> None:
    s = make()
    ready(s)
    rng = random.Random(5)
    hosts = [f"h{i}" for i in range(60)]
    for i, h in enumerate(hosts):
        announce(s, h, f"store-{i % 4}")
        register(s, h, 2.0)
    task = s.tasks[TASK]
    for h in rng.sample(hosts, 25):
        s.leave_host(h, 3.0)
    for site, members in task.site_ids.items():
        assert sorted(members) == sorted(h for h, p in task.peers.items() if p.site == site)
        assert all(members[task.site_slot[h]] == h for h in members)
    for site, fetchers in task.wan_fetchers.items():
        assert fetchers <= set(task.site_ids[site])
    assert s.site_hosts == collections.Counter(h.site for h in s.hosts.values())
    # Hosts not heard from go too, and their sites' counts with them.
    s.expire(1000.0)
    assert not s.site_hosts and not s.hosts

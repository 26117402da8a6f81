"""Piece selection: the pure rarest-first, least-busy-parent policy the downloader and simulator share."""

from __future__ import annotations

import random

from p2pdist.content.pieces import Bitmap, bits_from_bytes
from peer.selection import ParentView, bitmap_bits, choose_requests, piece_set


def test_bitmap_bits_puts_piece_n_at_bit_n() -> None:
    bm = Bitmap(21)
    for n in (0, 3, 8, 20):
        bm.add(n)
    assert bitmap_bits(bm) == piece_set([0, 3, 8, 20])
    assert bits_from_bytes(bm.to_bytes()) == (1 << 0) | (1 << 3) | (1 << 8) | (1 << 20)


def test_rarest_first() -> None:
    parents = [ParentView("a", piece_set([0, 1, 2]), 0), ParentView("b", piece_set([0, 1]), 0)]
    for seed in range(20):
        got = choose_requests(piece_set(range(3)), parents, room=3, per_parent=3, rng=random.Random(seed))
        assert got[0] == (2, "a")  # only a holds piece 2
        assert sorted(n for n, _ in got) == [0, 1, 2]


def test_equally_rare_pieces_are_spread_not_all_earliest() -> None:
    parents = [ParentView("a", piece_set(range(64)), 0)]
    firsts = {
        choose_requests(piece_set(range(64)), parents, room=1, per_parent=3, rng=random.Random(seed))[0][0]
        for seed in range(50)
    }
    assert len(firsts) > 20


def test_per_parent_cap_and_busy_parents_skipped() -> None:
    parents = [ParentView("a", piece_set(range(10)), 2), ParentView("b", piece_set(range(10)), 0, usable=False)]
    got = choose_requests(piece_set(range(10)), parents, room=8, per_parent=3, rng=random.Random(1))
    assert len(got) == 1 and got[0][1] == "a"


def test_random_cases_keep_every_rule() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        size = rng.randint(1, 40)
        parents = [
            ParentView(f"p{i}", rng.getrandbits(size), rng.randint(0, 3), rng.random() > 0.2)
            for i in range(rng.randint(0, 6))
        ]
        need = rng.getrandbits(size)
        room, per = rng.randint(0, 8), rng.randint(1, 3)
        got = choose_requests(need, parents, room=room, per_parent=per, rng=random.Random(seed))
        numbers = [n for n, _ in got]
        assert len(numbers) == len(set(numbers)) <= room
        inflight = {p.host_id: p.inflight for p in parents}
        by_id = {p.host_id: p for p in parents}
        rarity = [sum(1 for p in parents if p.pieces >> n & 1) for n in numbers]
        assert rarity == sorted(rarity), seed  # rarest first
        for number, host_id in got:
            parent = by_id[host_id]
            assert need >> number & 1 and parent.pieces >> number & 1 and parent.usable
            open_holders = [p for p in parents if p.usable and p.pieces >> number & 1 and inflight[p.host_id] < per]
            assert inflight[host_id] == min(inflight[p.host_id] for p in open_holders)  # least busy
            inflight[host_id] += 1
            assert inflight[host_id] <= per
        # Nothing left out that a parent with room could have served.
        if len(got) < room:
            left = need & ~piece_set(numbers)
            assert not any(p.usable and inflight[p.host_id] < per and p.pieces & left for p in parents), seed

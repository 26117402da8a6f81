"""Piece selection: the pure rarest-first, least-busy-parent policy the downloader and simulator share."""

from __future__ import annotations

import random

from p2pdist.pieces import Bitmap
from peer.selection import ParentView, bitmap_bits, bits_from_bytes, choose_requests, piece_set


def reference(need: set[int], parents: list[ParentView], room: int, per_parent: int,
              rng: random.Random) -> list[tuple[int, str]]:
    """The loop peer/download.py's _launch ran before the policy moved to peer/selection.py."""
    inflight = {p.host_id: p.inflight for p in parents}
    usable = [p for p in parents if p.usable and p.inflight < per_parent]
    if room <= 0 or not usable:
        return []
    wanted = []
    for number in sorted(need):
        holders = sum(1 for p in parents if p.pieces >> number & 1)
        if holders:
            wanted.append((holders, number))
    wanted.sort()
    out = []
    for _, number in wanted:
        if room <= 0:
            break
        choices = [p for p in usable if p.pieces >> number & 1 and inflight[p.host_id] < per_parent]
        if not choices:
            continue
        low = min(inflight[p.host_id] for p in choices)
        parent = rng.choice([p for p in choices if inflight[p.host_id] == low])
        inflight[parent.host_id] += 1
        out.append((number, parent.host_id))
        room -= 1
    return out


def test_bitmap_bits_puts_piece_n_at_bit_n() -> None:
    bm = Bitmap(21)
    for n in (0, 3, 8, 20):
        bm.add(n)
    assert bitmap_bits(bm) == piece_set([0, 3, 8, 20])
    assert bits_from_bytes(bm.to_bytes()) == (1 << 0) | (1 << 3) | (1 << 8) | (1 << 20)


def test_rarest_first_then_earliest() -> None:
    parents = [ParentView("a", piece_set([0, 1, 2]), 0), ParentView("b", piece_set([0, 1]), 0)]
    got = choose_requests(piece_set(range(3)), parents, room=3, per_parent=3, rng=random.Random(1))
    assert [n for n, _ in got] == [2, 0, 1]
    assert got[0] == (2, "a")


def test_per_parent_cap_and_busy_parents_skipped() -> None:
    parents = [ParentView("a", piece_set(range(10)), 2), ParentView("b", piece_set(range(10)), 0, usable=False)]
    got = choose_requests(piece_set(range(10)), parents, room=8, per_parent=3, rng=random.Random(1))
    assert got == [(0, "a")]


def test_same_choices_as_the_downloaders_old_loop() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        size = rng.randint(1, 40)
        parents = [ParentView(f"p{i}", rng.getrandbits(size), rng.randint(0, 3), rng.random() > 0.2)
                   for i in range(rng.randint(0, 6))]
        need = rng.getrandbits(size)
        room, per = rng.randint(0, 8), rng.randint(1, 3)
        want = reference({n for n in range(size) if need >> n & 1}, parents, room, per, random.Random(seed))
        got = choose_requests(need, parents, room=room, per_parent=per, rng=random.Random(seed))
        assert got == want, seed

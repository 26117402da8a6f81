"""Piece selection: which missing pieces a peer requests next, and from which parent.

Pure: the downloader (peer/download.py) and the simulator (benchmarks/simulate.py) call the
same function, so a simulated swarm runs the policy the daemon runs. Piece sets are ints
with bit n set for piece n, which keeps a decision cheap at thousands of simulated hosts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from p2pdist.content.pieces import Bitmap


def bitmap_bits(bitmap: Bitmap) -> int:
    return bitmap.to_int()


def piece_set(numbers: Iterable[int]) -> int:
    bits = 0
    for number in numbers:
        bits |= 1 << number
    return bits


@dataclass(frozen=True)
class ParentView:
    """What the downloader knows of one parent when it picks requests."""

    host_id: str
    pieces: int  # bit n set: the parent holds piece n (as of the scheduler's last answer)
    inflight: int  # our requests to it in flight now
    usable: bool = True  # False while it answered busy or is blocked; still counts for rarity


# With a single parent to ask, one request at a time leaves the link idle for a round trip and a
# verify-and-store after every piece: one peer pulling 1 GiB from one parent took 6.2 s with one
# piece in flight and 3.2 s with three. With several parents the other parents fill that gap.
SOLE_PARENT_PIECES = 3


def per_parent_limit(parents: Sequence[ParentView], configured: int) -> int:
    """Pieces in flight allowed per parent: `configured`, or more when only one parent is usable."""
    if sum(1 for p in parents if p.usable) > 1:
        return configured
    return max(configured, SOLE_PARENT_PIECES)


def choose_requests(
    need: int,
    parents: Sequence[ParentView],
    *,
    room: int,
    per_parent: int,
    rng: random.Random,
    in_order: bool = False,
) -> list[tuple[int, str]]:
    """Up to `room` (piece, parent host id) requests for the pieces in `need`.

    Rarest first: pieces held by the fewest parents (all parents count, usable or not); among
    equally rare pieces, from a random starting piece onwards (not always the earliest: children
    that all ask for the earliest piece make their common parents send the same piece to all). Each piece goes to the usable parent holding it with the fewest requests
    in flight (random among equals), never more than `per_parent` in flight to one parent.
    Pieces no usable parent can serve now are skipped, not waited for.

    `in_order`: among equally rare pieces take the earliest. The downloader asks for it when
    every parent already holds the whole blob: rarity then protects nobody, and a client
    streaming the blob gets its bytes as they arrive instead of after the last piece.
    """
    if room <= 0 or need == 0:
        return []
    inflight = {p.host_id: p.inflight for p in parents}
    open_ = [p for p in parents if p.usable and p.inflight < per_parent]
    if not open_:
        return []
    # at_least[k]: pieces held by more than k parents, counted bitwise without touching pieces.
    at_least = [0] * (len(parents) + 1)
    for p in parents:
        held = p.pieces & need
        for k in range(len(parents), 0, -1):
            at_least[k] |= at_least[k - 1] & held
        at_least[0] |= held
    avail = 0
    for p in open_:
        avail |= p.pieces
    chosen: list[tuple[int, str]] = []
    for k in range(len(parents)):
        layer = at_least[k] & ~at_least[k + 1] & avail  # held by exactly k + 1 parents
        while layer and room > 0:
            # A random starting piece, then the next equally rare one after it (wrapping):
            # children asking the same parents for the same earliest piece waste the scarce
            # upload of a parent that holds what nobody else does.
            start = 0 if in_order else rng.randrange(layer.bit_length())
            after = layer >> start
            number = start + (after & -after).bit_length() - 1 if after else (layer & -layer).bit_length() - 1
            low = 1 << number
            layer ^= low
            choices = [p for p in open_ if p.pieces & low]
            fewest = min(inflight[p.host_id] for p in choices)
            parent = rng.choice([p for p in choices if inflight[p.host_id] == fewest])
            inflight[parent.host_id] += 1
            chosen.append((number, parent.host_id))
            room -= 1
            if inflight[parent.host_id] >= per_parent:
                open_.remove(parent)
                avail = 0
                for p in open_:
                    avail |= p.pieces
                layer &= avail
        if room <= 0 or not open_:
            break
    return chosen

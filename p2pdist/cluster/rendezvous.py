"""Rendezvous (highest-random-weight) hashing: the owner of a key among a set of members.

Every host ranks the members by a hash of (key, member) and takes the highest, so hosts that
see the same members agree on the owner without talking to each other, and a member leaving
moves only its own keys (to their next member in rank). Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(key: str, member: str) -> int:
    """The member's weight for `key`: a 64-bit hash, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(f"{key}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, members: Iterable[str]) -> list[str]:
    """The members in the order `key` falls back through them: the owner first.

    Ties (a 64-bit collision) are broken by the member's name, so the order is total.
    """
    return sorted(set(members), key=lambda m: (weight(key, m), m), reverse=True)


def owner(key: str, members: Iterable[str]) -> str | None:
    """The member that owns `key`, or None when there are no members."""
    best: tuple[int, str] | None = None
    for member in members:
        candidate = (weight(key, member), member)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]

"""The schedulers one host knows, and which of them it currently counts as alive.

Pure: calls report their outcome with `now`. A scheduler that failed a call is dead for a
back-off (renewed by every further failure; the announce loop probes it meanwhile), and alive
again once a call to it succeeds or the back-off runs out. Tasks hash over the alive ones.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2pdist.cluster.rendezvous import owner, rank


class Membership:
    def __init__(self, members: Iterable[str], *, backoff_s: float) -> None:
        self.members: tuple[str, ...] = tuple(dict.fromkeys(members))
        self.backoff_s = backoff_s
        self.dead_until: dict[str, float] = {}

    def set_members(self, members: Iterable[str]) -> list[str]:
        """Replace the members (a DNS answer changed); return the new ones, to be told at once."""
        fresh = tuple(dict.fromkeys(members))
        added = [m for m in fresh if m not in self.members]
        self.members = fresh
        self.dead_until = {m: t for m, t in self.dead_until.items() if m in fresh}
        return added

    def is_alive(self, member: str, now: float) -> bool:
        return self.dead_until.get(member, 0.0) <= now

    def alive(self, now: float) -> list[str]:
        return [m for m in self.members if self.is_alive(m, now)]

    def owner(self, key: str, now: float) -> str | None:
        """The alive member that owns `key`; None when every member is in its back-off."""
        return owner(key, self.alive(now))

    def order(self, key: str, now: float) -> list[str]:
        """The alive members in the order `key` falls back through them."""
        return rank(key, self.alive(now))

    def failed(self, member: str, now: float) -> bool:
        """A call to `member` failed: dead for the back-off. True if it was counted alive."""
        was_alive = self.is_alive(member, now)
        if member in self.members:
            self.dead_until[member] = now + self.backoff_s
        return was_alive

    def answered(self, member: str, now: float) -> bool:
        """A call to `member` succeeded: alive. True if it was counted dead until now."""
        return self.dead_until.pop(member, 0.0) > now

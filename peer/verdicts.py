"""The registry's yeses, remembered for when it cannot be reached (issue 13).

A yes to an access check is kept as two facts with the wall time it was given: a *grant*
under a hash of (credentials, registry, repository) — never the credentials themselves —
and a *link*, the digest the registry confirmed in that repository. While the registry
cannot be reached at all, a request may go on if both were confirmed within the grace; a
401/403 removes the grant at once. Pure: the clock is an argument; the proxy loads and saves
the file (`VERDICTS_FILE` in the data dir) so a restarted daemon keeps them.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from p2pdist.errors import StoreError

VERDICTS_FILE = "access-verdicts.json"
FORMAT = 1
MAX_GRANTS = 10_000
MAX_LINKS = 100_000
# A yes already on record is written again only when older than this: a pull of every layer
# of an image must not rewrite the file once per layer.
REFRESH_S = 60.0


def grant_key(authorization: str, registry: str, name: str) -> str:
    """What a grant is remembered under: a hash, so the file holds no credential."""
    return hashlib.sha256("\0".join(("grant", authorization, registry, name)).encode()).hexdigest()


@dataclass(frozen=True)
class PublicLink:
    """A digest anonymous clients were allowed to read in a repository, `age_s` ago."""

    registry: str
    name: str
    age_s: float


class Verdicts:
    """Grants and links with the wall time of the registry's last yes to each."""

    def __init__(self, grace_s: float, *, max_grants: int = MAX_GRANTS, max_links: int = MAX_LINKS) -> None:
        self.grace_s = grace_s
        self.max_grants = max_grants
        self.max_links = max_links
        self.grants: OrderedDict[str, float] = OrderedDict()
        # digest -> (registry, repository) -> when the registry last confirmed it there
        self.links: OrderedDict[str, dict[tuple[str, str], float]] = OrderedDict()
        self.dirty = False  # changed since the last save

    # -- what the registry said -----------------------------------------------------------

    def allowed(self, authorization: str, registry: str, name: str, digest: str, now: float) -> None:
        """The registry said yes to these credentials for `digest` in `name`."""
        key = grant_key(authorization, registry, name)
        if now - self.grants.get(key, float("-inf")) >= REFRESH_S:
            self.dirty = True
        self.grants[key] = now
        self.grants.move_to_end(key)
        while len(self.grants) > self.max_grants:
            self.grants.popitem(last=False)
        places = self.links.get(digest)
        if places is None:
            places = self.links[digest] = {}
        if now - places.get((registry, name), float("-inf")) >= REFRESH_S:
            self.dirty = True
        places[(registry, name)] = now
        self.links.move_to_end(digest)
        while len(self.links) > self.max_links:
            self.links.popitem(last=False)

    def refused(self, authorization: str, registry: str, name: str) -> None:
        """The registry said no (401/403) to these credentials for `name`: its older yes is void."""
        if self.grants.pop(grant_key(authorization, registry, name), None) is not None:
            self.dirty = True

    # -- while it cannot be reached -------------------------------------------------------

    def offline(self, authorization: str, registry: str, name: str, digest: str, now: float) -> float | None:
        """The age of the yes that lets these credentials read `digest` in `name` while the
        registry cannot be reached, or None: no such yes within the grace."""
        granted = self.grants.get(grant_key(authorization, registry, name))
        linked = self.links.get(digest, {}).get((registry, name))
        if granted is None or linked is None:
            return None
        age = now - min(granted, linked)
        return age if 0 <= age <= self.grace_s else None

    def public(self, digest: str, now: float) -> list[PublicLink]:
        """Where anonymous clients were allowed to read `digest` within the grace: what this host
        tells a site peer that has no yes of its own (an anonymous yes holds no credential)."""
        out = []
        for (registry, name), linked in self.links.get(digest, {}).items():
            granted = self.grants.get(grant_key("", registry, name))
            if granted is None:
                continue
            age = now - min(granted, linked)
            if 0 <= age <= self.grace_s:
                out.append(PublicLink(registry, name, age))
        return out

    # -- the file -------------------------------------------------------------------------

    def to_json(self, now: float) -> bytes:
        """What is still within the grace, as the file's bytes."""
        grants = {k: t for k, t in self.grants.items() if now - t <= self.grace_s}
        links = [
            [digest, registry, name, t]
            for digest, places in self.links.items()
            for (registry, name), t in places.items()
            if now - t <= self.grace_s
        ]
        return json.dumps({"format": FORMAT, "grants": grants, "links": links}, separators=(",", ":")).encode()

    def load_json(self, data: bytes) -> None:
        """Take the entries of a file written by `to_json`; a malformed file is a StoreError."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            grants = {str(k): float(t) for k, t in sorted(raw["grants"].items(), key=lambda kv: float(kv[1]))}
            links = sorted(((str(d), str(r), str(n), float(t)) for d, r, n, t in raw["links"]), key=lambda e: e[3])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"unreadable {VERDICTS_FILE}: {exc}") from None
        for key, t in grants.items():
            self.grants[key] = t
        for digest, registry, name, t in links:
            self.links.setdefault(digest, {})[(registry, name)] = t
            self.links.move_to_end(digest)
        while len(self.grants) > self.max_grants:
            self.grants.popitem(last=False)
        while len(self.links) > self.max_links:
            self.links.popitem(last=False)

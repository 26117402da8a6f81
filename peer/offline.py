"""The mirror's access check when the registry cannot be reached at all (issue 13).

A registry that answers 401/403 is obeyed as ever. One that cannot be reached (no
connection, a timeout: the site's WAN link is down) is replaced by the last yes it gave the
same credentials for the same registry, repository and digest within `offline_grace_s`
(peer/verdicts.py); an anonymous client may also rely on a site host that holds the blob and
saw anonymous clients allowed to read it. The yeses live in the data dir, so a restarted
daemon keeps them; the file holds hashes of credentials, never credentials.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from p2pdist.content.digest import short
from p2pdist.errors import OriginError, StoreError
from peer.verdicts import VERDICTS_FILE, Verdicts

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

log = logging.getLogger("p2pdist.mirror")

SAVE_INTERVAL_S = 2.0


def unreachable(exc: OriginError) -> bool:
    """Whether the registry could not be reached at all (no answer), as opposed to answering
    with a refusal or a server error: only then may an earlier yes stand in for it."""
    return exc.upstream_status is None


class OfflineAccess:
    """The remembered yeses of one peer, and the decision made from them while the registry
    cannot be reached."""

    def __init__(self, daemon: PeerDaemon) -> None:
        self.daemon = daemon
        self.verdicts = Verdicts(daemon.config.offline_grace_s)
        self.path = Path(daemon.config.data_dir) / VERDICTS_FILE
        try:
            self.verdicts.load_json(self.path.read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, StoreError) as exc:
            log.warning("starting without the registry's earlier yeses: %s", exc)

    def allowed(self, authorization: str, registry: str, name: str, digest: str) -> None:
        self.verdicts.allowed(authorization, registry, name, digest, time.time())

    def refused(self, authorization: str, registry: str, name: str) -> None:
        self.verdicts.refused(authorization, registry, name)

    async def decide(self, authorization: str, registry: str, name: str, digest: str) -> str | None:
        """Why the client may read `digest` in `name` although the registry cannot be reached,
        or None when nothing allows it."""
        if self.daemon.config.offline_grace_s <= 0:
            return None
        age = self.verdicts.offline(authorization, registry, name, digest, time.time())
        if age is not None:
            return f"the registry allowed these credentials {age:.0f}s ago"
        if authorization:
            return None  # a site host vouches for anonymous reads only: it holds no one's credentials
        grace = self.daemon.config.offline_grace_s
        for holder in await self.daemon.site.find(digest):
            for link in holder.public:
                if (link.registry, link.name) == (registry, name) and 0 <= link.age_s <= grace:
                    return f"site host {holder.url} saw anonymous reads allowed {link.age_s:.0f}s ago"
        return None

    def save(self) -> None:
        if not self.verdicts.dirty:
            return
        self.verdicts.dirty = False
        tmp = self.path.with_name(f".{VERDICTS_FILE}.tmp")
        try:
            tmp.write_bytes(self.verdicts.to_json(time.time()))
            tmp.replace(self.path)
        except OSError as exc:
            self.verdicts.dirty = True
            log.warning("cannot keep the registry's yeses in %s: %s", self.path, exc)

    async def save_loop(self) -> None:
        """Write changes every few seconds (a pull's many layers make one write), and on the way out."""
        try:
            while True:
                await trio.sleep(SAVE_INTERVAL_S)
                self.save()
        finally:
            self.save()


def offline_note(digest: str, why: str) -> str:
    return f"registry unreachable: serving {short(digest)} on an earlier yes ({why})"

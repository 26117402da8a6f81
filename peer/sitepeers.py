"""Finding the holders of a blob, or a manifest, in this host's site without the scheduler or
the registry (issue 13).

When no scheduler answers (the site's WAN link is down), a peer asks the hosts of its site
directly: those in `site_peers` (HOST:PORT, or one DNS name with an address per host) and
those the scheduler named as site members while it answered (kept in the data dir). Each is
asked `GET /v1/tasks/<digest>` on its piece port, which answers only for a blob it holds
whole with its sha256 checked: the size, the BLAKE3 digest of every piece, and where
anonymous clients were allowed to read it; `GET /v1/manifests/<digest>` answers a manifest
its mirror kept. Short timeouts: this is the path of a cut link.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from p2pdist import wire
from p2pdist.config import parse_hostport
from p2pdist.content.digest import PIECE_DIGEST_BYTES, parse_digest, sha256_digest, short
from p2pdist.content.pieces import PieceLayout, piece_size_problem, piece_size_read, piece_size_sent
from p2pdist.errors import UpstreamError
from p2pdist.transport.server import Request, Response, text_response
from p2pdist.transport.trust import refuse_unauthorized
from peer.verdicts import PublicLink

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

log = logging.getLogger("p2pdist.site")

HOLDING_PATH = re.compile(r"/v1/tasks/(?P<task>[^/]+)")
MANIFEST_PATH = re.compile(r"/v1/manifests/(?P<digest>[^/]+)")
MEMBERS_FILE = "site-members.json"
MAX_MEMBERS = 256  # remembered site members, the most recently named kept
MEMBER_TTL_S = 24 * 3600.0  # a member the scheduler has not named for this long is forgotten
LEARN_INTERVAL_S = 30.0  # how often the scheduler is asked for the site's members
MAX_ASKED = 64  # hosts asked at once for one blob
MAX_ANSWER_BYTES = 256 << 10
MAX_MANIFEST_ANSWER_BYTES = 6 << 20  # a 4 MiB manifest in base64, and its fields
# One lookup answers the access check and the download that follows it.
LOOKUP_CACHE_S = 5.0


# -- the holder's side ---------------------------------------------------------------------


def holding_answer(daemon: PeerDaemon, request: Request) -> Response | None:
    """`GET /v1/tasks/<digest>` on the piece port: what this host holds of a blob, if whole and
    checked; None for a path that is not this endpoint."""
    m = HOLDING_PATH.fullmatch(request.path)
    if m is None:
        return None
    if (refused := refuse_unauthorized(request, daemon.config.cluster_secret)) is not None:
        return refused
    if request.method not in ("GET", "HEAD"):
        return text_response(405, "/v1/tasks/<digest> is read-only: use GET", [("allow", "GET, HEAD")])
    task_id = parse_digest(m.group("task"))  # BadRequest: a 400 with the reason
    task = daemon.store.get(task_id)
    if task is None or not task.verified():
        return text_response(404, f"{short(task_id)} is not held whole here")
    digests = task.load_digests()
    if len(digests) < task.layout.count:
        return text_response(404, f"{short(task_id)} is held without its piece digests")
    verdicts = daemon.proxy.offline.verdicts if daemon.proxy is not None else None
    public = verdicts.public(task_id, time.time()) if verdicts is not None else []
    body = {
        "digest": task_id,
        "host_id": daemon.host_id,
        "size": task.layout.blob_size,
        "piece_digests": [d.hex() for d in digests[: task.layout.count]],
        "public": [{"registry": p.registry, "repository": p.name, "age_s": round(p.age_s, 1)} for p in public],
    }
    # Left out when it is the old rule's: what a reader from before it assumes.
    if (sent := piece_size_sent(task.layout.blob_size, task.layout.piece_size)) is not None:
        body["piece_size"] = sent
    return Response(200, [("content-type", "application/json")], json.dumps(body).encode())


def manifest_answer(daemon: PeerDaemon, request: Request) -> Response | None:
    """`GET /v1/manifests/<digest>` on the piece port: a manifest this host's mirror served and
    keeps, for a site host whose registry cannot be reached; None for another path."""
    m = MANIFEST_PATH.fullmatch(request.path)
    if m is None:
        return None
    if (refused := refuse_unauthorized(request, daemon.config.cluster_secret)) is not None:
        return refused
    if request.method not in ("GET", "HEAD"):
        return text_response(405, "/v1/manifests/<digest> is read-only: use GET", [("allow", "GET, HEAD")])
    digest = parse_digest(m.group("digest"))
    cached = daemon.proxy.manifests.get(digest) if daemon.proxy is not None else None
    if cached is None or daemon.proxy is None:
        return text_response(404, f"manifest {short(digest)} is not kept here")
    public = daemon.proxy.offline.verdicts.public(digest, time.time())
    body = {
        "digest": digest,
        "media_type": cached.media_type,
        "body": base64.b64encode(cached.body).decode(),
        "public": [{"registry": p.registry, "repository": p.name, "age_s": round(p.age_s, 1)} for p in public],
    }
    return Response(200, [("content-type", "application/json")], json.dumps(body).encode())


def site_answer(daemon: PeerDaemon, request: Request) -> Response | None:
    """The piece port's endpoints for site hosts that cannot reach the scheduler or registry."""
    return holding_answer(daemon, request) or manifest_answer(daemon, request)


@dataclass(frozen=True)
class SiteManifest:
    """A manifest a site host kept, its bytes checked against the digest asked for."""

    url: str
    digest: str
    media_type: str
    body: bytes
    public: tuple[PublicLink, ...]


def parse_manifest(url: str, digest: str, data: bytes) -> SiteManifest | None:
    """A site host's manifest answer, checked field by field and the bytes against `digest`."""
    try:
        raw = json.loads(data)
        body = base64.b64decode(raw["body"], validate=True)
        media_type = raw["media_type"]
        public = tuple(
            PublicLink(str(p["registry"]), str(p["repository"]), float(p["age_s"])) for p in raw.get("public", [])
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if raw.get("digest") != digest or not isinstance(media_type, str) or sha256_digest(body) != digest:
        return None
    return SiteManifest(url, digest, media_type, body, public)


# -- the asker's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A site host that holds a blob whole and checked."""

    url: str
    host_id: str
    size: int
    piece_digests: tuple[bytes, ...]
    public: tuple[PublicLink, ...]
    piece_size: int  # the pieces its digests are of


def parse_holding(url: str, task_id: str, body: bytes) -> Holder | None:
    """A holder's answer, checked field by field; None for anything malformed."""
    try:
        raw = json.loads(body)
        size = raw["size"]
        host_id = raw["host_id"]
        digests = tuple(bytes.fromhex(d) for d in raw["piece_digests"])
        public = tuple(
            PublicLink(str(p["registry"]), str(p["repository"]), float(p["age_s"])) for p in raw.get("public", [])
        )
        if raw["digest"] != task_id or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        if not isinstance(host_id, str) or not host_id or len(host_id) > 200:
            return None
        # Absent: a holder from before the piece size travelled, which cut by the old rule.
        piece_size = piece_size_read(size, raw.get("piece_size"))
        if piece_size_problem(piece_size) is not None:
            return None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if len(digests) != PieceLayout(size, piece_size).count or any(len(d) != PIECE_DIGEST_BYTES for d in digests):
        return None
    return Holder(url, host_id, size, digests, public, piece_size)


class SitePeers:
    """The site's hosts this peer can ask, and the lookups it made recently."""

    def __init__(self, daemon: PeerDaemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.path = Path(self.config.data_dir) / MEMBERS_FILE
        self.members: dict[str, float] = {}  # piece URL -> when the scheduler last named it
        self._lookups: dict[str, tuple[float, list[Holder]]] = {}
        self._asked: dict[str, int] = {}  # task -> hosts its last lookup asked
        self._load()

    # -- members --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_bytes())
            self.members = {str(u): float(t) for u, t in raw["members"].items() if _is_url(str(u))}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)

    def learned(self, urls: list[str], now: float) -> None:
        """The scheduler named these hosts of this site: kept, newest first, with those it named
        within MEMBER_TTL_S (it names a sample of a big site), and in the data dir for a restart
        while the link is down."""
        merged = merge_members(self.members, urls, self.daemon.advertise.rstrip("/"), now)
        changed = set(merged) != set(self.members)
        self.members = merged
        if changed:
            self._save()

    async def learn_loop(self) -> None:
        """Ask the scheduler for this site's hosts now and then, while it answers."""
        if not self.config.site:
            return  # no named site: every host is "in the site", nothing to keep apart
        await trio.sleep(self.config.announce_interval_s)  # after the first announce
        query = wire.SiteMembersQuery(host_id=self.daemon.host_id)
        while True:
            try:
                reply, _ = await self.daemon.scheduler.call_task(
                    self.daemon.host_id, "/v1/sites/members", query, wire.SiteMembers
                )
            except UpstreamError as exc:
                log.debug("site members not refreshed: %s", exc)
            else:
                self.learned(reply.urls, time.time())
            await trio.sleep(LEARN_INTERVAL_S)

    def _save(self) -> None:
        try:
            tmp = self.path.with_name(f".{MEMBERS_FILE}.tmp")
            tmp.write_text(json.dumps({"members": self.members}))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot keep the site's members in %s: %s", self.path, exc)

    async def candidates(self) -> list[str]:
        """Piece URLs of the site's hosts: configured ones (names resolved now) and remembered ones."""
        scheme = urlsplit(self.daemon.advertise).scheme or "http"
        urls: list[str] = []
        for entry in self.config.site_peers:
            if "://" in entry:
                scheme_of, address = urlsplit(entry).scheme, urlsplit(entry).netloc
            else:
                scheme_of, address = scheme, entry
            host, port = parse_hostport(address)
            for resolved in await _resolve(host):
                urls.append(f"{scheme_of}://{resolved}:{port}")
        urls.extend(self.members)
        own = self.daemon.advertise.rstrip("/")
        return [u for u in dict.fromkeys(urls) if u != own][:MAX_ASKED]

    # -- lookups --------------------------------------------------------------------------

    async def find(self, task_id: str) -> list[Holder]:
        """The site's hosts that hold `task_id` whole, asked all at once within
        `site_lookup_timeout_s`; answered from a lookup of the last few seconds if there is one."""
        now = time.monotonic()
        cached = self._lookups.get(task_id)
        if cached is not None and now - cached[0] < LOOKUP_CACHE_S:
            return cached[1]
        holders: list[Holder] = []
        asked = await self.candidates()
        if asked:
            with trio.move_on_after(self.config.site_lookup_timeout_s):
                async with trio.open_nursery() as nursery:
                    for url in asked:
                        nursery.start_soon(self._ask, url, task_id, holders)
        self._lookups = {k: v for k, v in self._lookups.items() if now - v[0] < LOOKUP_CACHE_S}
        self._lookups[task_id] = (now, holders)
        self._asked = {k: v for k, v in self._asked.items() if k in self._lookups}
        self._asked[task_id] = len(asked)
        log.info("task %s: asked %d site host(s) directly, %d hold it", short(task_id), len(asked), len(holders))
        return holders

    def recent(self, task_id: str) -> tuple[int, list[Holder]] | None:
        """The last few seconds' lookup of `task_id`: (hosts asked, holders), or None."""
        found = self._lookups.get(task_id)
        if found is None or time.monotonic() - found[0] >= LOOKUP_CACHE_S:
            return None
        return self._asked.get(task_id, 0), found[1]

    async def find_manifest(self, digest: str) -> SiteManifest | None:
        """A manifest some host of the site kept, asked of all at once within
        `site_lookup_timeout_s`: the first whose bytes hash to `digest`."""
        asked = await self.candidates()
        found: list[SiteManifest] = []
        if asked:
            with trio.move_on_after(self.config.site_lookup_timeout_s):
                async with trio.open_nursery() as nursery:
                    for url in asked:
                        nursery.start_soon(self._ask_manifest, url, digest, found, nursery.cancel_scope)
        log.info(
            "manifest %s: asked %d site host(s) directly, %s",
            short(digest),
            len(asked),
            "found" if found else "none kept it",
        )
        return found[0] if found else None

    async def _fetch(self, url: str, cap: int) -> bytes | None:
        """The body of a GET to a site host, or None if it does not answer 200 within `cap` bytes."""
        try:
            async with self.daemon.piece_client.get(url, {"x-p2pdist": "1"}) as response:
                if response.status != 200 or response.length > cap:
                    return None
                return await response.read()
        except UpstreamError as exc:
            log.debug("site host %s did not answer: %s", url, exc)
            return None

    async def _ask_manifest(self, url: str, digest: str, found: list[SiteManifest], done: trio.CancelScope) -> None:
        data = await self._fetch(f"{url}/v1/manifests/{digest}", MAX_MANIFEST_ANSWER_BYTES)
        manifest = None if data is None else parse_manifest(url, digest, data)
        if manifest is not None:
            found.append(manifest)
            done.cancel()  # one checked copy is all it takes

    async def _ask(self, url: str, task_id: str, holders: list[Holder]) -> None:
        body = await self._fetch(f"{url}/v1/tasks/{task_id}", MAX_ANSWER_BYTES)
        holder = None if body is None else parse_holding(url, task_id, body)
        if holder is not None:
            holders.append(holder)


def merge_members(known: dict[str, float], named: list[str], own: str, now: float) -> dict[str, float]:
    """The members to keep after the scheduler named `named` now: those, and the ones named
    within MEMBER_TTL_S, newest first, at most MAX_MEMBERS; never this host itself."""
    fresh = {u.rstrip("/"): now for u in named if _is_url(u) and u.rstrip("/") != own}
    kept = {u: t for u, t in known.items() if u not in fresh and u != own and 0 <= now - t <= MEMBER_TTL_S}
    return dict(sorted({**kept, **fresh}.items(), key=lambda ut: -ut[1])[:MAX_MEMBERS])


def agreeing(holders: list[Holder]) -> list[Holder]:
    """The holders that agree with the most others on the size, piece size and digests (the blob's
    sha256, checked at the end, decides; one lying holder must not steer the rest)."""
    groups: dict[tuple[int, int, tuple[bytes, ...]], list[Holder]] = {}
    for h in holders:
        groups.setdefault((h.size, h.piece_size, h.piece_digests), []).append(h)
    return max(groups.values(), key=len) if groups else []


def _is_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


async def _resolve(host: str) -> list[str]:
    """The addresses of `host` (itself when it is one); none when the lookup fails."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return [f"[{host}]" if ":" in host else host]
    except OSError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve site peer name %s: %s", host, exc)
        return []
    v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({f"[{i[4][0]}]" for i in infos if i[0] == socket.AF_INET6})
    return v4 or v6

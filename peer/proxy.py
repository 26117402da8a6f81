"""The peer's proxy port: a read-only OCI registry mirror for the host's container runtime.

Blobs come through P2P, streamed in order as pieces are verified (the last byte waits for
the blob's sha256), and only after the registry accepted the client's credentials for them
(`peer.auth`). Manifests, tags, referrers and `/v2/` go straight to the upstream registry
that `peer.upstream` picks per request. Requests that change the registry are refused.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import urlencode

import httpx
from prometheus_client import Counter, Histogram

from p2pdist.content.digest import parse_digest, parse_name, parse_reference, short
from p2pdist.errors import (
    LoopDetected,
    NotFound,
    OriginError,
    P2PError,
    RangeNotSatisfiable,
    StoreError,
    UpstreamError,
)
from p2pdist.node.endpoints import health_response, metrics_response
from p2pdist.node.pieceserver import parse_range
from p2pdist.registry.oci import SCHEME_HEADER
from p2pdist.transport.server import FileBody, Request, Response
from peer.auth import AccessCheck, Verdict
from peer.daemon import PeerDaemon
from peer.download import TaskDownload
from peer.manifests import MAX_MANIFEST_BYTES, CachedManifest, ManifestCache, is_digest
from peer.offline import OfflineAccess, offline_note, unreachable
from peer.upstream import (
    MAX_HOPS,
    Upstream,
    UpstreamClient,
    body_of,
    forwarded_headers,
    hops_of,
    redact,
    relayed_headers,
    resolve_upstream,
)
from peer.verdicts import PublicLink

log = logging.getLogger("p2pdist.proxy")

BLOB_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
MANIFEST_PATH = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
TAGS_PATH = re.compile(r"/v2/(?P<name>.+)/tags/list")
REFERRERS_PATH = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")
# Read-only: the state of this peer's download of a blob and why it failed, if it did.
DOWNLOAD_STATUS_PATH = re.compile(r"/v1/downloads/(?P<digest>[^/]+)")
API_VERSION = ("docker-distribution-api-version", "registry/2.0")
PULL_ONLY = "p2pdist is a pull-only registry mirror: push to the registry itself"
_FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The code of a registry's bare no (a refusal without a body), relayed with its status.
_REFUSAL_CODES = {401: "UNAUTHORIZED", 403: "DENIED"}
# On a blob answer: 1 when the peer held the whole blob before the request came.
HELD_HEADER = "x-p2pdist-held"
# On a blob answered while the registry could not be reached: the earlier yes it relied on.
OFFLINE_HEADER = "x-p2pdist-offline-access"
# On a manifest by tag answered from the last known resolution (serve_stale_tags).
STALE_HEADER = "x-p2pdist-stale"
# The same upstream failure is logged at most this often.
WARN_INTERVAL_S = 60.0


def oci_error(status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Response(status, [("content-type", "application/json"), *headers], body)


def error_response(exc: P2PError, context: str = "") -> Response:
    """The OCI error answer to `exc`, from its own `status` and `code`; `context` prefixes its message."""
    headers = [("content-range", f"bytes */{exc.length}")] if isinstance(exc, RangeNotSatisfiable) else []
    return oci_error(exc.status, exc.code, f"{context}{exc}", headers)


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def head_response(status: int, headers: list[tuple[str, str]]) -> Response:
    """A HEAD answer whose Content-Length (in `headers`) is the GET's, not zero."""
    return Response(status, headers, _no_body())


class MirrorMetrics:
    def __init__(self, daemon: PeerDaemon) -> None:
        r, p = daemon.metrics.registry, f"p2pdist_{daemon.kind}_mirror"
        self.requests = Counter(
            f"{p}_requests", "Registry API requests answered, by kind and status", ["kind", "status"], registry=r
        )
        self.access_checks = Counter(
            f"{p}_access_checks", "Access checks of a client's credentials, by result", ["result"], registry=r
        )
        self.blob_bytes = Counter(
            f"{p}_blob_bytes", "Blob bytes sent to local clients, by how they were served", ["source"], registry=r
        )
        self.first_byte = Histogram(
            f"{p}_first_byte_seconds", "Time from a blob GET to its first byte", registry=r, buckets=_FIRST_BYTE_BUCKETS
        )


class Proxy:
    def __init__(self, daemon: PeerDaemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.metrics = MirrorMetrics(daemon)
        self.upstream_client = UpstreamClient(connect_timeout_s=self.config.registry_connect_timeout_s)
        self.offline = OfflineAccess(daemon)
        self.manifests = ManifestCache(Path(self.config.data_dir) / "manifests")
        self.access = AccessCheck(
            self.upstream_client,
            on_result=lambda r: self.metrics.access_checks.labels(r).inc(),
            on_allowed=self.offline.allowed,
            on_refused=self.offline.refused,
        )
        self.upstream_warnings = RateLimitedLog(WARN_INTERVAL_S)

    async def aclose(self) -> None:
        await self.upstream_client.aclose()

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return health_response()
        if request.path == "/metrics":
            return metrics_response(self.daemon.metrics.registry)
        if m := DOWNLOAD_STATUS_PATH.fullmatch(request.path):
            return self.download_status(request, m.group("digest"))
        if request.path != "/v2" and not request.path.startswith("/v2/"):
            raise NotFound(f"no such endpoint {request.path[:100]}")
        # Counted by what was asked, so a request that failed is not lost among "other".
        kind = request_kind(request.method, request.path)
        try:
            _, response = await self._route(request)
        except P2PError as exc:
            if isinstance(exc, UpstreamError):
                self.warn_upstream(exc)
            response = error_response(exc)
        self.metrics.requests.labels(kind, str(response.status)).inc()
        return response

    def warn_upstream(self, exc: UpstreamError, context: str = "") -> None:
        """A warning for an upstream failure, with its likely fix; the same failure at most
        once a minute (a runtime retrying every layer would flood the log)."""
        message = f"{context}{exc}"
        if exc.hint and exc.hint not in message:
            message += f"; {exc.hint}"
        # Keyed by the failure, not by the blob it hit: one line per broken registry, not per layer.
        logged, suppressed = self.upstream_warnings.allow(str(exc), time.monotonic())
        if logged:
            more = f" (and {suppressed} more like it since the last such line)" if suppressed else ""
            log.warning("mirror upstream failure: %s%s", message, more)

    def download_status(self, request: Request, digest: str) -> Response:
        if request.method not in ("GET", "HEAD"):
            return oci_error(405, "UNSUPPORTED", "/v1/downloads/<digest> takes GET", [("allow", "GET, HEAD")])
        try:
            status = self.daemon.download_status(parse_digest(digest))
        except P2PError as exc:
            return error_response(exc)
        return Response(200, [("content-type", "application/json")], json.dumps(status).encode())

    async def _route(self, request: Request) -> tuple[str, Response]:
        if request.method not in ("GET", "HEAD"):
            return "push", oci_error(405, "UNSUPPORTED", PULL_ONLY, [("allow", "GET, HEAD")])
        path = request.path
        if path in ("/v2", "/v2/"):
            return "base", await self.base(request)
        if m := BLOB_PATH.fullmatch(path):
            name, digest = parse_name(m.group("name")), parse_digest(m.group("digest"))
            return "blob", await self.blob(request, name, digest)
        if m := MANIFEST_PATH.fullmatch(path):
            name, reference = parse_name(m.group("name")), parse_reference(m.group("reference"))
            return "manifest", await self.manifest(request, name, reference)
        if m := TAGS_PATH.fullmatch(path):
            return "tags", await self.relay(request, f"/v2/{parse_name(m.group('name'))}/tags/list")
        if m := REFERRERS_PATH.fullmatch(path):
            name, digest = parse_name(m.group("name")), parse_digest(m.group("digest"))
            return "referrers", await self.relay(request, f"/v2/{name}/referrers/{digest}")
        if path == "/v2/_catalog":
            return "catalog", await self.relay(request, path)
        raise NotFound(f"no such registry endpoint {path[:100]}")

    def upstream(self, request: Request) -> Upstream:
        return resolve_upstream(
            request.query.get("ns"),
            request.headers.get(SCHEME_HEADER),
            insecure=self.config.insecure_registries,
            default=self.config.registry_mirror,
        )

    def _hops(self, request: Request) -> int:
        hops = hops_of(request.headers)
        if hops >= MAX_HOPS:
            raise LoopDetected(f"request passed {hops} p2pdist daemons: the mirrors form a loop")
        return hops

    # -- straight to the upstream ---------------------------------------------------------

    async def base(self, request: Request) -> Response:
        """`/v2/`: the upstream's answer, so its auth challenge reaches the client."""
        if not request.query.get("ns") and not self.config.registry_mirror:
            return Response(200, [("content-type", "application/json"), API_VERSION], b"{}")
        return await self.relay(request, "/v2/")

    async def relay(self, request: Request, path: str) -> Response:
        """Forward a read to the upstream with the client's headers; relay the answer unchanged."""
        up = self.upstream(request)
        hops = self._hops(request)
        query = {k: v for k, v in request.query.items() if k != "ns"}
        url = f"{up.base}{path}" + (f"?{urlencode(query)}" if query else "")
        response = await self.upstream_client.send(request.method, url, forwarded_headers(request.headers, hops=hops))
        headers = [*relayed_headers(response), ("oci-namespace", up.namespace)]
        log.debug("%s %s → %d", request.method, redact(url), response.status_code)
        if response.status_code >= 500:
            self.warn_upstream(UpstreamError(f"{request.method} {redact(url)} answered {response.status_code}"))
        if request.method == "HEAD":
            await response.aclose()
            return head_response(response.status_code, headers)
        return Response(response.status_code, headers, body_of(response))

    # -- manifests ------------------------------------------------------------------------

    async def manifest(self, request: Request, name: str, reference: str) -> Response:
        """A manifest from the registry, kept by digest on the way through; from that cache
        when the registry cannot be reached (peer/manifests.py)."""
        up = self.upstream(request)
        hops = self._hops(request)
        url = f"{up.base}/v2/{name}/manifests/{reference}"
        headers = forwarded_headers(request.headers, hops=hops)
        try:
            response = await self.upstream_client.send(request.method, url, headers)
        except OriginError as exc:
            if not unreachable(exc):
                raise
            self.warn_upstream(exc, f"manifest {name}:{reference[:19]}: ")
            return await self._manifest_offline(request, up, name, reference, exc)
        relayed = [*relayed_headers(response), ("oci-namespace", up.namespace)]
        if response.status_code >= 500:
            self.warn_upstream(UpstreamError(f"{request.method} {redact(url)} answered {response.status_code}"))
        named = response.headers.get("docker-content-digest", "")
        media_type = response.headers.get("content-type", "")
        if response.status_code in (401, 403):
            self.offline.refused(request.headers.get("authorization", ""), up.base, name)
        if response.status_code != 200 or request.method == "HEAD":
            if response.status_code == 200 and named.startswith("sha256:") and not is_digest(reference):
                # containerd resolves a tag with a HEAD and GETs the manifest by digest.
                self.manifests.resolved(up.base, name, reference, named, media_type, time.time())
            if request.method == "HEAD":
                await response.aclose()
                return head_response(response.status_code, relayed)
            return Response(response.status_code, relayed, body_of(response))
        length = response.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
            return Response(200, relayed, body_of(response))  # too big to keep: passed through as it comes
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise OriginError(f"registry {redact(url)} cut the manifest short: {exc}") from None
        finally:
            await response.aclose()
        kept = self.manifests.put(up.base, name, reference, body, media_type, named, time.time())
        if kept is not None:
            # The registry's yes to these credentials for this manifest, as for a blob's check.
            self.offline.allowed(request.headers.get("authorization", ""), up.base, name, kept)
        return Response(200, relayed, body)

    async def _manifest_offline(
        self, request: Request, up: Upstream, name: str, reference: str, exc: OriginError
    ) -> Response:
        """The registry cannot be reached: a manifest by digest from the cache (or kept by a
        site host, checked against its digest), if the registry gave these credentials a yes
        for it within offline_grace_s (or, for an anonymous client, a site host saw anonymous
        reads of it allowed); a tag only when the operator enabled serve_stale_tags, marked
        stale. Anything else: a one-line error at once."""
        authorization = request.headers.get("authorization", "")
        extra: list[tuple[str, str]] = []
        digest = reference
        if not is_digest(reference):
            known = self.manifests.tag(up.base, name, reference)
            if not self.config.serve_stale_tags:
                return oci_error(
                    exc.status,
                    exc.code,
                    f"manifest {name}:{reference}: {exc}; a tag is resolved only by the registry "
                    "(serve_stale_tags is off; pull by digest to use the cache)",
                )
            if known is None:
                return oci_error(
                    exc.status, exc.code, f"manifest {name}:{reference}: {exc}; this peer never saw the tag resolved"
                )
            resolved_ago = max(0.0, time.time() - known.resolved_at)
            digest = known.digest
            extra = [
                ("warning", '110 - "stale: registry unreachable"'),
                (STALE_HEADER, f"tag resolved {resolved_ago:.0f}s ago; registry unreachable"),
            ]
        cached = self.manifests.get(digest)
        public: tuple[PublicLink, ...] = ()
        if cached is None:
            found = await self.daemon.site.find_manifest(digest)
            if found is None:
                return oci_error(
                    exc.status,
                    exc.code,
                    f"manifest {name}@{short(digest)}: {exc}; neither this peer nor a host of its site keeps it",
                )
            self.manifests.put(up.base, name, digest, found.body, found.media_type, "", time.time())
            cached, public = CachedManifest(found.digest, found.media_type, found.body), found.public
        grace = self.config.offline_grace_s
        yes_age = self.offline.verdicts.offline(authorization, up.base, name, digest, time.time())
        why = None if yes_age is None else f"the registry allowed these credentials {yes_age:.0f}s ago"
        if why is None and not authorization and not public:
            # No yes of its own: what a site host that keeps the manifest saw of anonymous reads.
            found = await self.daemon.site.find_manifest(digest)
            public = found.public if found is not None else ()
        if why is None and not authorization:
            seen = [p.age_s for p in public if (p.registry, p.name) == (up.base, name) and 0 <= p.age_s <= grace]
            if seen:
                why = f"a site host saw anonymous reads allowed {min(seen):.0f}s ago"
        if why is None or grace <= 0:
            return oci_error(
                exc.status,
                exc.code,
                f"cannot check the client's access to {name}: {exc}; no yes from it for these credentials "
                f"within offline_grace_s ({grace:g}s)",
            )
        self.metrics.access_checks.labels("offline").inc()
        headers = [
            ("content-type", cached.media_type or "application/vnd.oci.image.manifest.v1+json"),
            ("content-length", str(len(cached.body))),
            ("docker-content-digest", cached.digest),
            ("etag", f'"{cached.digest}"'),
            ("oci-namespace", up.namespace),
            (OFFLINE_HEADER, why),
            *extra,
        ]
        if request.method == "HEAD":
            return head_response(200, headers)
        return Response(200, headers, cached.body)

    # -- blobs ----------------------------------------------------------------------------

    async def blob(self, request: Request, name: str, digest: str) -> Response:
        started = time.monotonic()
        up = self.upstream(request)
        hops = self._hops(request)
        path = f"/v2/{name}/blobs/{digest}"
        if hops:
            # A p2pdist daemon (a seed or peer whose origin is this mirror) is fetching on
            # P2P's behalf: sending it back into P2P would loop.
            return await self.relay(request, path)
        offline = ""
        try:
            verdict = await self.access.check(up.base, name, "blobs", digest, request.headers, hops=hops)
        except OriginError as exc:
            self.warn_upstream(exc, f"blob {short(digest)} in {name}: access check failed: ")
            authorization = request.headers.get("authorization", "")
            if unreachable(exc) and (reason := await self.offline.decide(authorization, up.base, name, digest)):
                self.metrics.access_checks.labels("offline").inc()
                log.info("blob %s in %s: %s", short(digest), name, offline_note(digest, reason))
                verdict, offline = Verdict(True, 200), reason
            else:
                return self._unchecked(exc, name, digest)
        if not verdict.allowed:
            return _refusal(verdict, digest, up)
        url = f"{up.base}{path}"
        headers = {"authorization": request.headers["authorization"]} if "authorization" in request.headers else {}
        size = verdict.size
        held = self.daemon.store.get(digest)
        if held is not None and held.complete():
            size = held.layout.blob_size
        dl: TaskDownload | None = None
        if request.method == "GET" or size is None:
            dl = self.daemon.download(digest, url, headers, size_hint=verdict.size)
            try:
                size = (await dl.wait_sized()).layout.blob_size
            except P2PError as exc:
                if isinstance(exc, UpstreamError):
                    self.warn_upstream(exc, f"cannot fetch {short(digest)}: ")
                return error_response(exc, f"cannot fetch {short(digest)}: ")
        base = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("accept-ranges", "bytes"),
            ("etag", f'"{digest}"'),
            ("oci-namespace", up.namespace),
        ]
        try:
            span = parse_range(request.headers.get("range", ""), size)
        except RangeNotSatisfiable as exc:
            return error_response(exc)  # answered here, so it counts as a blob request
        start, end = (0, size) if span is None else span
        reply = [*base, ("content-length", str(end - start))]
        status = 200
        if span is not None:
            status = 206
            reply.append(("content-range", f"bytes {start}-{end - 1}/{size}"))
        if offline:
            reply.append((OFFLINE_HEADER, offline))
        if request.method == "HEAD":
            return head_response(status, reply)
        assert dl is not None
        source = "local" if dl.finished.is_set() and dl.verified else "p2p"
        body = self._timed(stream_blob(dl, start, end), dl, source, end - start, started)
        # `p2pdist get` tells a blob served from the cache from one fetched for this request.
        return Response(status, [*reply, (HELD_HEADER, "1" if source == "local" else "0")], body)

    def _unchecked(self, exc: OriginError, name: str, digest: str) -> Response:
        """The answer when the registry could not check the client's access and no earlier yes
        stands in for it: fail closed, saying why in one line."""
        local = self.daemon.store.get(digest)
        if not unreachable(exc):
            why = "no blob is served or fetched without its yes"
        elif self.config.offline_grace_s <= 0:
            why = "offline_grace_s is 0: no earlier yes stands in for it"
        elif local is not None and local.complete():
            why = (
                f"{short(digest)} is held here, but the registry gave these credentials no yes for it "
                f"within offline_grace_s ({self.config.offline_grace_s:g}s)"
            )
        else:
            why = f"no yes from it for these credentials within offline_grace_s ({self.config.offline_grace_s:g}s)"
            if (lookup := self.daemon.site.recent(digest)) is not None and not lookup[1]:
                why = f"no host of this site holds {short(digest)} ({lookup[0]} asked) and {why}"
        return oci_error(exc.status, exc.code, f"cannot check the client's access to {name}: {exc}; {why}")

    async def _timed(
        self, body: AsyncIterator[bytes | FileBody], dl: TaskDownload, source: str, length: int, started: float
    ) -> AsyncIterator[bytes | FileBody]:
        """`body`, counted: time to its first byte (from the request) and bytes by source:
        `local` (held whole when asked), `p2p`, or `origin` (the download went back to source)."""
        first = True
        sent = 0
        self.daemon.store.pin(dl.task_id)  # the cache quota never evicts a blob being sent
        try:
            async for chunk in body:
                if first:
                    self.metrics.first_byte.observe(time.monotonic() - started)
                    first = False
                yield chunk
                n = chunk.length if isinstance(chunk, FileBody) else len(chunk)
                sent += n
                # A download that went back to source sends the client origin bytes, not P2P ones.
                if source != "local":
                    source = "origin" if dl.back_to_source_reason else "p2p"
                self.metrics.blob_bytes.labels(source).inc(n)
        except P2PError as exc:
            # The 200 is out: the client sees the connection close short of Content-Length,
            # and reads the reason from /v1/downloads/<digest> (p2pdist get does).
            log.warning("blob %s: stream cut after %d of %d bytes: %s", short(dl.task_id), sent, length, exc)
            raise
        finally:
            self.daemon.store.unpin(dl.task_id)
            await body.aclose()  # type: ignore[attr-defined]
            log.info(
                "blob %s: sent %d of %d bytes (%s) in %.2fs",
                short(dl.task_id),
                sent,
                length,
                source,
                time.monotonic() - started,
            )


def request_kind(method: str, path: str) -> str:
    """The metric label of a registry API request, from its method and path alone."""
    if method not in ("GET", "HEAD"):
        return "push"
    if path in ("/v2", "/v2/"):
        return "base"
    for kind, pattern in (
        ("blob", BLOB_PATH),
        ("manifest", MANIFEST_PATH),
        ("tags", TAGS_PATH),
        ("referrers", REFERRERS_PATH),
    ):
        if pattern.fullmatch(path):
            return kind
    return "catalog" if path == "/v2/_catalog" else "other"


class RateLimitedLog:
    """Lets each distinct message through at most once per `interval_s`, and counts the
    repeats it held back. Pure: the caller passes the clock."""

    def __init__(self, interval_s: float, *, max_messages: int = 256) -> None:
        self.interval_s = interval_s
        self.max_messages = max_messages
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, message: str, now: float) -> tuple[bool, int]:
        """(whether to log it now, how many repeats were held back since it was last logged)."""
        last = self._last.get(message)
        if last is not None and now - last[0] < self.interval_s:
            self._last[message] = (last[0], last[1] + 1)
            return False, 0
        if last is None and len(self._last) >= self.max_messages:
            # Bounded memory whatever the upstream says: forget the oldest line.
            del self._last[min(self._last, key=lambda k: self._last[k][0])]
        self._last[message] = (now, 0)
        return True, last[1] if last is not None else 0


async def stream_blob(dl: TaskDownload, start: int, end: int) -> AsyncIterator[bytes | FileBody]:
    """Bytes [start, end) of the blob as its pieces arrive.

    A response that reaches the blob's end is held back before its last piece until the
    whole blob's sha256 checks out, so a client never sees a complete-looking wrong blob; a
    range inside the blob is served from its verified pieces without waiting for the rest.
    If the local disk fails (full), the rest comes straight from the origin, uncached.
    """
    store = await dl.wait_sized()
    layout = store.layout
    if (start, end) != (0, layout.blob_size):
        dl.want_first(start, end)  # a Range: its pieces before the rest of the blob
    offset = start
    try:
        for number in layout.pieces_for_range(start, end):
            await dl.wait_piece(number)
            piece_start, piece_end = layout.span(number)
            first, last = max(start, piece_start) - piece_start, min(end, piece_end) - piece_start
            if piece_end >= end and end == layout.blob_size:
                await dl.wait_verified()
            # Each piece goes out with sendfile, straight from the page cache.
            yield FileBody(store.path(number), first, last - first)
            offset += last - first
    except StoreError as exc:
        log.warning("blob %s: %s; passing the rest through from the origin uncached", dl.task_id[:19], exc)
        async with dl.daemon.origin.open_blob(dl.url, dl.headers, start=offset, end=end) as body:
            async for chunk in body.chunks():
                dl.daemon.metrics.download_bytes.labels("origin").inc(len(chunk))
                yield chunk


def _refusal(verdict: Verdict, digest: str, up: Upstream) -> Response:
    """The registry's no, as the registry said it (its WWW-Authenticate challenge included)."""
    headers = [(k, v) for k, v in verdict.headers if k.lower() not in ("content-length", "content-type")]
    headers.append(("oci-namespace", up.namespace))
    if verdict.body:
        kept = [(k, v) for k, v in verdict.headers if k.lower() == "content-type"]
        return Response(verdict.status, [*headers, *kept], verdict.body)
    if verdict.status == 404:
        return oci_error(404, "BLOB_UNKNOWN", f"blob {digest} unknown to the registry", headers)
    code = _REFUSAL_CODES.get(verdict.status, "UNSUPPORTED")
    return oci_error(verdict.status, code, f"the registry answered {verdict.status} for {short(digest)}", headers)

"""The peer's proxy port: where local clients pull blobs, served through P2P as pieces arrive.

Blob requests name their registry with `?ns=HOST[:PORT]` (containerd's mirror convention) or
fall back to the configured default upstream. Bytes are streamed in order as pieces are
verified; the last byte is held back until the whole blob's sha256 checks out.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Sequence

from p2pdist.digest import parse_digest, parse_name
from p2pdist.errors import BadRequest, NotFound, OriginError, P2PError, StoreError
from p2pdist.http import Request, Response
from p2pdist.oci import SCHEME_HEADER
from p2pdist.pieceserver import RangeNotSatisfiable, parse_range
from p2pdist.service import health_response, metrics_response
from peer.daemon import PeerDaemon
from peer.download import TaskDownload

log = logging.getLogger("p2pdist.proxy")

BLOB_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9a-fA-F:]+\](:\d{1,5})?")


def oci_error(status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Response(status, [("content-type", "application/json"), *headers], body)


class Proxy:
    def __init__(self, daemon: PeerDaemon) -> None:
        self.daemon = daemon
        self.config = daemon.config

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return health_response()
        if request.path == "/metrics":
            return metrics_response(self.daemon.metrics.registry)
        m = BLOB_PATH.fullmatch(request.path)
        if m:
            if request.method not in ("GET", "HEAD"):
                return oci_error(405, "UNSUPPORTED", "p2pdist is a pull-only mirror", [("allow", "GET, HEAD")])
            return await self.blob(request, parse_name(m.group("name")), parse_digest(m.group("digest")))
        raise NotFound(f"no such endpoint {request.path[:100]}")

    def upstream(self, request: Request) -> str:
        """Scheme and host of the registry this request is for, e.g. `https://registry.example`."""
        ns = request.query.get("ns")
        if ns:
            if not _HOST.fullmatch(ns):
                raise BadRequest(f"invalid ns {ns[:80]!r}: want a registry HOST[:PORT]")
            wanted = request.headers.get(SCHEME_HEADER, "").lower()
            if wanted not in ("", "http", "https"):
                raise BadRequest(f"invalid {SCHEME_HEADER} {wanted[:20]!r}: want http or https")
            insecure = ns in self.config.insecure_registries
            return f"{wanted or ('http' if insecure else 'https')}://{ns}"
        if self.config.registry_mirror:
            return self.config.registry_mirror
        raise BadRequest("no upstream registry: pass ?ns=HOST or start the peer with --registry-mirror")

    async def blob(self, request: Request, name: str, digest: str) -> Response:
        url = f"{self.upstream(request)}/v2/{name}/blobs/{digest}"
        headers = {"authorization": request.headers["authorization"]} if "authorization" in request.headers else {}
        dl = self.daemon.download(digest, url, headers)
        try:
            store = await dl.wait_sized()
        except OriginError as exc:
            return _origin_error(exc, digest)
        except P2PError as exc:
            return oci_error(502, "UNAVAILABLE", f"cannot fetch {digest[:19]}: {exc}")
        size = store.layout.blob_size
        base = [("content-type", "application/octet-stream"), ("docker-content-digest", digest),
                ("accept-ranges", "bytes"), ("etag", f'"{digest}"')]
        try:
            span = parse_range(request.headers.get("range", ""), size)
        except RangeNotSatisfiable as exc:
            return oci_error(416, "RANGE_INVALID", str(exc), [("content-range", f"bytes */{exc.length}")])
        start, end = (0, size) if span is None else span
        reply = [*base, ("content-length", str(end - start))]
        status = 200
        if span is not None:
            status = 206
            reply.append(("content-range", f"bytes {start}-{end - 1}/{size}"))
        if request.method == "HEAD":
            return Response(status, reply, b"")
        return Response(status, reply, stream_blob(dl, start, end))


async def stream_blob(dl: TaskDownload, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of the blob as its pieces arrive; the end waits for the sha256 check.

    If the local disk fails (full), the rest comes straight from the origin, uncached.
    """
    store = await dl.wait_sized()
    layout = store.layout
    offset = start
    try:
        for number in layout.pieces_for_range(start, end):
            await dl.wait_piece(number)
            piece_start, piece_end = layout.span(number)
            first, last = max(start, piece_start) - piece_start, min(end, piece_end) - piece_start
            if piece_end >= end:
                await dl.finished.wait()
                if dl.error is not None or not dl.verified:
                    raise dl.error or P2PError("download did not verify")
            for chunk in store.read_chunks(number, first, last):
                yield chunk
                offset += len(chunk)
    except StoreError as exc:
        log.warning("blob %s: %s; passing the rest through from the origin uncached", dl.task_id[:19], exc)
        async with dl.daemon.origin.open_blob(dl.url, dl.headers, start=offset, end=end) as body:
            async for chunk in body.chunks():
                dl.daemon.metrics.download_bytes.labels("origin").inc(len(chunk))
                yield chunk


def _origin_error(exc: OriginError, digest: str) -> Response:
    if exc.status == 404:
        return oci_error(404, "BLOB_UNKNOWN", f"blob {digest} unknown to the registry")
    if exc.status in (401, 403):
        return oci_error(exc.status, "UNAUTHORIZED" if exc.status == 401 else "DENIED", str(exc))
    return oci_error(502, "UNAVAILABLE", str(exc))

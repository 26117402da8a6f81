"""Which registry a mirror request is for, and talking to it on the client's behalf.

`resolve_upstream` is the pure rule (containerd's `?ns=`, docker's default upstream, plain
HTTP only where configured). `UpstreamClient` forwards a request with the client's own
credentials and hands back the registry's answer unchanged, for the proxy to relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from p2pdist.errors import BadRequest, OriginError
from p2pdist.registry.client import redirected, send_streamed
from p2pdist.registry.oci import DAEMON_HEADER, is_registry_host

# containerd names Docker Hub `docker.io`; its registry API lives on another host.
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "https://registry-1.docker.io"
MAX_REDIRECTS = 5
# Mirrors that forward to mirrors: give up after this many p2pdist hops (a loop).
MAX_HOPS = 3

# What the client may tell the registry, and what of the registry's answer the client sees.
FORWARDED_REQUEST_HEADERS = ("authorization", "accept", "range", "if-none-match", "user-agent")
RELAYED_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-range",
    "content-encoding",
    "accept-ranges",
    "docker-content-digest",
    "docker-distribution-api-version",
    "www-authenticate",
    "etag",
    "last-modified",
    "link",
    "retry-after",
    "oci-subject",
    "oci-filters-applied",
)


@dataclass(frozen=True)
class Upstream:
    """A registry: `base` is scheme://host[:port] of its API, `namespace` its name for clients."""

    base: str
    namespace: str


def resolve_upstream(ns: str | None, scheme: str | None, *, insecure: Collection[str], default: str | None) -> Upstream:
    """The registry a request is for.

    `ns` is containerd's `?ns=HOST[:PORT]`; `scheme` is the scheme `p2pdist get` read from its
    URL (`x-p2pdist-origin-scheme`). Without `ns` the request is docker's (registry-mirrors
    mirror Docker Hub only) and goes to `default`. HTTPS unless the host is listed insecure or
    the client's URL said http.
    """
    if ns:
        if not is_registry_host(ns):
            raise BadRequest(f"invalid ns {ns[:80]!r}: want a registry HOST[:PORT]")
        wanted = (scheme or "").lower()
        if wanted not in ("", "http", "https"):
            raise BadRequest(f"invalid x-p2pdist-origin-scheme {wanted[:20]!r}: want http or https")
        if ns == DOCKER_HUB and not wanted:
            return Upstream(DOCKER_HUB_API, ns)
        return Upstream(f"{wanted or ('http' if ns in insecure else 'https')}://{ns}", ns)
    if default:
        return Upstream(default.rstrip("/"), urlsplit(default).netloc)
    raise BadRequest("no upstream registry: the request has no ?ns= and the peer no --registry-mirror")


def hops_of(headers: Mapping[str, str]) -> int:
    """How many p2pdist daemons this request has passed (0: it comes from a real client)."""
    value = headers.get(DAEMON_HEADER)
    if value is None:
        return 0
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 4 else 1


def forwarded_headers(headers: Mapping[str, str], *, hops: int) -> dict[str, str]:
    out = {k: headers[k] for k in FORWARDED_REQUEST_HEADERS if k in headers}
    # Bytes are relayed raw: ask for them unencoded so the client sees what the registry stores.
    out["accept-encoding"] = "identity"
    out[DAEMON_HEADER] = str(hops + 1)
    return out


def relayed_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items() if k.lower() in RELAYED_RESPONSE_HEADERS]


def redact(url: str) -> str:
    """A URL fit for a log line: no user info, no query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


CONNECT_TIMEOUT_S = 5.0
# For this long after a registry could not be reached, it is dialled with a short connect
# timeout (see _send_once): a cut link costs a pull one full timeout, not one per request.
DOWN_S = 10.0
PROBE_CONNECT_S = 0.5


class UpstreamClient:
    """Sends one request to a registry with the client's headers; never adds credentials."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        down_s: float = DOWN_S,
        probe_connect_s: float = PROBE_CONNECT_S,
    ) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.down_s = down_s
        self.probe_connect_s = probe_connect_s
        # host -> when it may be dialled again, after it could not be reached at all
        self._down_until: dict[str, float] = {}
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            # A registry that is down must fail a pull in seconds, not a read timeout's half minute.
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(
        self, method: str, url: str, headers: dict[str, str], *, follow_redirects: bool = True
    ) -> httpx.Response:
        """The registry's response, its body not yet read: the caller must close it.

        Redirects (registries send blob GETs to storage) are followed, and `authorization`
        is dropped when one leads to another host. Unreachable: OriginError.
        """
        origin_host = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._send_once(method, url, headers)
            if not (
                follow_redirects
                and response.status_code in (301, 302, 303, 307, 308)
                and "location" in response.headers
            ):
                return response
            await response.aclose()
            url, headers = redirected(response, origin_host, headers)
        raise OriginError(f"too many redirects from {redact(url)}")

    async def _send_once(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        """One request. For `down_s` after a host could not be reached it is dialled with a
        connect timeout of `probe_connect_s` only, so the requests of one pull (a manifest HEAD,
        its GET, the blobs) with the WAN link down do not each wait out the full connect
        timeout one after the other, while a link that is back answers at once. The window is
        not extended by its own short dials: after it the full timeout is tried again."""
        host = urlsplit(url).netloc
        until = self._down_until.get(host)
        timeouts = None
        if until is not None and trio.current_time() < until:
            timeouts = httpx.Timeout(self.timeout_s, connect=min(self.probe_connect_s, self.connect_timeout_s))
        try:
            response = await send_streamed(self.client, method, url, headers, who="registry", timeouts=timeouts)
        except OriginError as exc:
            if exc.upstream_status is None and timeouts is None:
                # Only a dial with the full timeout opens the window: were short dials to extend
                # it, a link whose connect takes over probe_connect_s (a long round trip, a
                # loaded host) would fail every request for as long as requests keep coming.
                self._down_until[host] = trio.current_time() + self.down_s
            raise
        self._down_until.pop(host, None)
        return response


async def body_of(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body as it arrives; the response is closed when the iteration ends."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()

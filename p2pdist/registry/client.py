"""Fetching blobs from the registry origin: Bearer token flow, redirects to blob storage, ranges.

Used by seeds in the normal case and by any peer going back to source. Credentials are
passed per request and never logged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx

from p2pdist.errors import OriginError
from p2pdist.registry.diagnose import unreachable
from p2pdist.registry.oci import DAEMON_HEADER, SCHEME_HEADER
from p2pdist.transport.ratelimit import TokenBucket

log = logging.getLogger("p2pdist.origin")

MAX_REDIRECTS = 5
# A request that cannot reach its server. Besides httpx's own errors: a URL httpx cannot parse
# (a redirect's Location), and a host name the resolver's IDNA step refuses ("a..b", a label
# over 63 characters), which surfaces as a bare UnicodeError from getaddrinfo.
UNREACHABLE: tuple[type[Exception], ...] = (httpx.HTTPError, httpx.InvalidURL, UnicodeError)
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# httpcore reads a response 64 KiB at a time, and every read is a trip through h11 and httpx:
# a blob streamed with aiter_raw cost 2.5-3.4 CPU-s per GiB here against 0.7-0.8 with 1 MiB
# reads (benchmarks/README.md, issue 18), and a seed receives every byte of the swarm this way.
# A class attribute, so it holds for every httpx client in the process (the mirror's relays too).
READ_BYTES = 1 << 20
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES


async def send_streamed(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    *,
    who: str = "origin",
    timeouts: httpx.Timeout | None = None,
) -> httpx.Response:
    """One request, its body left to stream; a registry that cannot be reached is an OriginError
    naming `who` and the host. `timeouts`, if given, replace the client's for this request."""
    try:
        request = (
            client.build_request(method, url, headers=headers)
            if timeouts is None
            else client.build_request(method, url, headers=headers, timeout=timeouts)
        )
        return await client.send(request, stream=True)
    except UNREACHABLE as exc:
        why = unreachable(url, exc)
        error = OriginError(f"{who} {why}")
        error.hint = why.hint
        raise error from None


def redirected(response: httpx.Response, origin_host: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Where a redirect leads, and the headers to send there: never credentials to another
    host (registries send blob GETs to storage). A Location that is no URL is an OriginError."""
    try:
        url = str(response.url.join(response.headers["location"]))
    except UNREACHABLE:
        raise OriginError(f"{origin_host} redirected to an invalid URL") from None
    if urlsplit(url).netloc != origin_host:
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return url, headers


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a `WWW-Authenticate: Bearer realm=...,service=...,scope=...` header."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params = dict(_CHALLENGE_PARAM.findall(rest))
    return params if "realm" in params else None


@dataclass
class OriginResponse:
    """An open blob response: the blob's total size, where this body starts, and the body."""

    blob_size: int
    start: int
    length: int
    response: httpx.Response
    bucket: TokenBucket | None
    counter: list[int]

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in self.response.aiter_raw():
                if self.bucket is not None:
                    await self.bucket.take(len(chunk))
                self.counter[0] += len(chunk)
                received += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            # A reset or a stall mid-body is the origin failing: callers retry and resume.
            raise OriginError(
                f"origin {self.response.url.netloc.decode()} failed after {received} of "
                f"{self.length} bytes: {type(exc).__name__}"
            ) from None


class OriginClient:
    def __init__(
        self, *, rate: TokenBucket | None = None, timeout_s: float = 30.0, connect_timeout_s: float | None = None
    ) -> None:
        self.bucket = rate
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s if connect_timeout_s is not None else timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self.bytes_received = [0]

    async def aclose(self) -> None:
        await self.client.aclose()

    @asynccontextmanager
    async def open_blob(
        self,
        url: str,
        headers: dict[str, str],
        *,
        start: int = 0,
        end: int | None = None,
        through_mirror: str | None = None,
    ) -> AsyncIterator[OriginResponse]:
        """GET bytes [start, end) of a blob, following auth challenges and redirects.

        `through_mirror` is the origin's scheme when `url` is another cluster's p2pdist mirror
        (a tiered site's seed pulling through the core): asked as a runtime would ask it, so
        that mirror fetches through its own swarm instead of relaying to the origin."""
        request_headers = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        if through_mirror is None:
            # A p2pdist mirror as origin then relays instead of sending it back into P2P.
            request_headers[DAEMON_HEADER] = "1"
        else:
            request_headers[SCHEME_HEADER] = through_mirror
        if start or end is not None:
            request_headers["range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        response = await self._send(url, request_headers)
        try:
            if response.status_code not in (200, 206):
                await response.aread()
                raise OriginError(_describe(response, url), upstream_status=response.status_code)
            if response.status_code == 200:
                size = _int_header(response, "content-length")
                start = 0
                length = size
            else:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("content-range", ""))
                if not m:
                    raise OriginError("origin sent 206 without a usable Content-Range")
                start, last, size = int(m.group(1)), int(m.group(2)), int(m.group(3))
                length = last - start + 1
            yield OriginResponse(size, start, length, response, self.bucket, self.bytes_received)
        finally:
            await response.aclose()

    async def head(self, url: str, headers: dict[str, str]) -> httpx.Response:
        request_headers = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        # A p2pdist mirror as origin then relays instead of sending it back into P2P.
        request_headers[DAEMON_HEADER] = "1"
        response = await self._send(url, request_headers, method="HEAD")
        await response.aclose()
        return response

    async def get_manifest(self, url: str, headers: dict[str, str], accept: str, *, limit: int) -> tuple[str, bytes]:
        """(content type, body) of a manifest, by the same auth and redirects as a blob; a body
        over `limit` bytes or any answer but 200 is an OriginError."""
        request_headers = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        request_headers["accept"] = accept
        request_headers[DAEMON_HEADER] = "1"
        response = await self._send(url, request_headers)
        try:
            if response.status_code != 200:
                await response.aread()
                raise OriginError(_describe(response, url), upstream_status=response.status_code)
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise OriginError(f"manifest {_redact(url)} is over {limit} bytes")
        except httpx.HTTPError as exc:
            raise OriginError(f"origin failed sending {_redact(url)}: {type(exc).__name__}") from None
        finally:
            await response.aclose()
        return response.headers.get("content-type", "").split(";")[0].strip(), bytes(body)

    async def _send(self, url: str, headers: dict[str, str], method: str = "GET") -> httpx.Response:
        origin_host = urlsplit(url).netloc
        tried_token = False
        for _ in range(MAX_REDIRECTS + 2):
            response = await send_streamed(self.client, method, url, headers)
            if response.status_code == 401 and not tried_token:
                challenge = parse_bearer_challenge(response.headers.get("www-authenticate", ""))
                if challenge is None:
                    return response  # Basic auth: the caller's credentials were all we had
                await response.aclose()
                tried_token = True
                token = await self._token(challenge, headers.get("authorization", ""))
                headers = {**headers, "authorization": f"Bearer {token}"}
                continue
            if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
                await response.aclose()
                url, headers = redirected(response, origin_host, headers)
                continue
            return response
        raise OriginError(f"too many redirects fetching {_redact(url)}")

    def forget_expired_tokens(self) -> None:
        """Drop expired tokens: one is cached per (realm, scope, credentials), and a scope per
        repository, so a stream of distinct repositories would otherwise grow this for good."""
        now = time.monotonic()
        for key in [k for k, (_, until) in self._tokens.items() if until <= now]:
            del self._tokens[key]

    async def _token(self, challenge: dict[str, str], authorization: str) -> str:
        key = (challenge["realm"], challenge.get("scope", ""), authorization)
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        token, expires_in = await request_token(self.client, challenge, authorization)
        self._tokens[key] = (token, time.monotonic() + max(0.0, expires_in - 5))
        return token


async def request_token(client: httpx.AsyncClient, challenge: dict[str, str], authorization: str) -> tuple[str, float]:
    """(token, seconds it lasts) from the challenge's realm, for the scope it names, paying
    with the client's Basic credentials if it has them (anonymous otherwise)."""
    realm = challenge["realm"]
    params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
    headers = {}
    if authorization.lower().startswith("basic "):
        headers["authorization"] = authorization
    try:
        response = await client.get(realm, params=params, headers=headers)
    except UNREACHABLE as exc:
        raise OriginError(f"token service {urlsplit(realm).netloc} unreachable: {type(exc).__name__}") from None
    if response.status_code != 200:
        # The client's credentials did not buy a token: it must authenticate, whatever the
        # token service's own failure was.
        raise OriginError(
            f"token service refused: HTTP {response.status_code}",
            upstream_status=response.status_code,
            status=403 if response.status_code == 403 else 401,
        )
    try:
        body = response.json()
        token = body.get("token") or body["access_token"]
        expires = float(body.get("expires_in", 60))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OriginError("token service sent no token") from None
    return str(token), expires


def _int_header(response: httpx.Response, name: str) -> int:
    try:
        return int(response.headers[name])
    except (KeyError, ValueError):
        raise OriginError(f"origin sent no usable {name}") from None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _describe(response: httpx.Response, url: str) -> str:
    code = ""
    try:
        errors = response.json().get("errors") or []
        if errors:
            code = f" {errors[0].get('code', '')}"
    except (ValueError, AttributeError):
        pass
    return f"origin answered HTTP {response.status_code}{code} for {_redact(url)}"

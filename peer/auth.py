"""The mirror's access check: a blob held here or by other peers goes to a client only after
the registry itself accepted that client's credentials for that repository and digest.

The check is an authenticated HEAD with the client's own `Authorization`; a yes is cached
for a short time under a hash of (credentials, registry, repository, digest), never under
the credentials themselves. A no is not cached and its answer (401 with the registry's
`WWW-Authenticate`, 403, 404) goes to the client unchanged, so it performs the token dance
with the registry as it would without the mirror.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from p2pdist.content.digest import short
from p2pdist.errors import OriginError
from p2pdist.registry.client import parse_bearer_challenge, request_token
from peer.upstream import UpstreamClient, forwarded_headers, relayed_headers

log = logging.getLogger("p2pdist.mirror")

ALLOWED_TTL_S = 60.0
MAX_ENTRIES = 10_000
# Error bodies relayed from the registry are small; don't hold more than this of one.
MAX_ERROR_BODY_BYTES = 64 * 1024


def cache_key(authorization: str, registry: str, name: str, digest: str) -> str:
    """What a yes is remembered under.

    The digest is part of it: a registry answers for a blob only in the repositories it is
    linked to, so a yes for `public/app` must not open a private layer under that name.
    """
    material = "\0".join((authorization, registry, name, digest)).encode()
    return hashlib.sha256(material).hexdigest()


@dataclass
class Verdict:
    """The registry's answer to the check. `allowed` → serve; else relay status/headers/body."""

    allowed: bool
    status: int
    size: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    cached: bool = False


class AccessCheck:
    def __init__(
        self,
        client: UpstreamClient,
        *,
        ttl_s: float = ALLOWED_TTL_S,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str], None] | None = None,
        on_allowed: Callable[[str, str, str, str], None] | None = None,
        on_refused: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.on_result = on_result
        # The registry's yes (credentials, registry, repository, digest) and no (401/403), for
        # the verdicts kept for when it cannot be reached (peer/offline.py).
        self.on_allowed = on_allowed
        self.on_refused = on_refused
        self._allowed: OrderedDict[str, tuple[float, int | None]] = OrderedDict()

    def remember(self, key: str, size: int | None) -> None:
        self._allowed[key] = (self.clock() + self.ttl_s, size)
        self._allowed.move_to_end(key)
        while len(self._allowed) > self.max_entries:
            self._allowed.popitem(last=False)

    def recall(self, key: str) -> tuple[bool, int | None]:
        entry = self._allowed.get(key)
        if entry is None:
            return False, None
        if entry[0] <= self.clock():
            del self._allowed[key]
            return False, None
        return True, entry[1]

    async def check(
        self, registry: str, name: str, kind: str, digest: str, request_headers: dict[str, str], *, hops: int = 0
    ) -> Verdict:
        """May the client with `request_headers` read `registry`/v2/`name`/`kind`/`digest`?"""
        key = cache_key(request_headers.get("authorization", ""), registry, name, digest)
        known, size = self.recall(key)
        if known:
            self._count("cached")
            return Verdict(True, 200, size, cached=True)
        headers = {k: v for k, v in forwarded_headers(request_headers, hops=hops).items() if k != "range"}
        url = f"{registry}/v2/{name}/{kind}/{digest}"
        # A registry that redirects blobs to storage has already checked access when it
        # redirects; the signed storage URL would refuse a HEAD anyway.
        response = await self.client.send("HEAD", url, headers, follow_redirects=False)
        if response.status_code == 401:
            response = await self._with_token(response, url, headers)
        try:
            status = response.status_code
            if 200 <= status < 400:
                size = _content_length(response) if status == 200 else None
                self.remember(key, size)
                if self.on_allowed is not None:
                    self.on_allowed(request_headers.get("authorization", ""), registry, name, digest)
                self._count("allowed")
                return Verdict(True, status, size)
            body = await _limited_body(response)
        finally:
            await response.aclose()
        self._count("denied" if status in (401, 403) else "absent" if status == 404 else "failed")
        if status in (401, 403) and self.on_refused is not None:
            self.on_refused(request_headers.get("authorization", ""), registry, name)
        log.info("access check for %s in %s: registry answered %d", short(digest), name, status)
        if status >= 500 or status in (408, 429):
            raise OriginError(f"registry answered HTTP {status} to the access check", upstream_status=status)
        return Verdict(False, status, None, relayed_headers(response), body)

    async def _with_token(self, refused: httpx.Response, url: str, headers: dict[str, str]) -> httpx.Response:
        """A client that sent Basic credentials (`p2pdist get --user`) to a registry that wants
        a Bearer token: buy the token with them, as docker would, and ask again. Any other
        refusal, or credentials the token service turns down, stays the registry's answer."""
        challenge = parse_bearer_challenge(refused.headers.get("www-authenticate", ""))
        authorization = headers.get("authorization", "")
        if challenge is None or not authorization.lower().startswith("basic "):
            return refused
        try:
            token, _ = await request_token(self.client.client, challenge, authorization)
        except OriginError as exc:
            if exc.upstream_status not in (401, 403):
                await refused.aclose()
                raise
            return refused
        await refused.aclose()
        return await self.client.send(
            "HEAD", url, {**headers, "authorization": f"Bearer {token}"}, follow_redirects=False
        )

    def _count(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


async def _limited_body(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ERROR_BODY_BYTES:
            break
    return b"".join(chunks)[:MAX_ERROR_BODY_BYTES]

"""OCI distribution names shared by the proxy and the `get` client, kept free of heavy imports
so that `p2pdist get` starts fast."""

from __future__ import annotations

import base64
import ipaddress
import re

from p2pdist.errors import BadRequest

# Tells the proxy which scheme the origin named by ?ns= speaks (p2pdist get passes the URL's).
SCHEME_HEADER = "x-p2pdist-origin-scheme"
# Marks requests made by p2pdist daemons, so they are never proxied back into P2P.
DAEMON_HEADER = "x-p2pdist"

_BLOB_URL = re.compile(r"https?://[^/\s]+/v2/(?P<name>[^\s?#]+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")


# [0-9], not \d: \d also matches other scripts' digits, which would then be dialled. DNS labels
# as the OCI reference grammar has them, at most 63 long (the resolver refuses longer ones).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:(?P<name>{_LABEL}(?:\.{_LABEL})*)|\[(?P<ip6>[0-9a-fA-F:.]+)\])(?::(?P<port>[0-9]{{1,5}}))?")


def is_registry_host(text: str) -> bool:
    """HOST[:PORT] that can be dialled: DNS labels or a bracketed IPv6 address, port 1-65535.

    "..", "a..b" or a 64-character label pass a looser pattern and then fail in the resolver's
    IDNA step, deep inside a connection attempt."""
    m = _HOST.fullmatch(text)
    if m is None:
        return False
    if m["name"] is not None and len(m["name"]) > 253:
        return False
    if m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            return False
    return m["port"] is None or 1 <= int(m["port"]) <= 65535


def parse_blob_url(url: str) -> tuple[str, str]:
    """(repository name, digest) of an OCI blob URL, or raise BadRequest."""
    m = _BLOB_URL.fullmatch(url)
    if not m:
        raise BadRequest(f"not a blob URL: {url[:200]} (want http(s)://REGISTRY/v2/NAME/blobs/sha256:...)")
    return m.group("name"), m.group("digest")


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

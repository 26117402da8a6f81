"""OCI distribution names shared by the proxy and the `get` client, kept free of heavy imports
so that `p2pdist get` starts fast."""

from __future__ import annotations

import base64
import re

# Tells the proxy which scheme the origin named by ?ns= speaks (p2pdist get passes the URL's).
SCHEME_HEADER = "x-p2pdist-origin-scheme"
# Marks requests made by p2pdist daemons, so they are never proxied back into P2P.
DAEMON_HEADER = "x-p2pdist"

_BLOB_URL = re.compile(r"https?://[^/\s]+/v2/(?P<name>[^\s?#]+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")


def parse_blob_url(url: str) -> tuple[str, str]:
    """(repository name, digest) of an OCI blob URL, or raise ValueError."""
    m = _BLOB_URL.fullmatch(url)
    if not m:
        raise ValueError(f"not a blob URL: {url[:200]} (want http(s)://REGISTRY/v2/NAME/blobs/sha256:...)")
    return m.group("name"), m.group("digest")


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

"""Which URLs a seed may be asked to fetch: an OCI blob URL whose digest is the task's, on a
registry the operator allows. The scheduler checks it when a peer registers, the seed again
before it fetches, so a forged registration cannot turn a seed into a fetcher of any URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from p2pdist.content.digest import parse_name
from p2pdist.errors import BadRequest, ConfigError, Forbidden
from p2pdist.registry.oci import is_registry_host, parse_blob_url

ANY_REGISTRY = "*"
# How image references name Docker Hub, and the API hosts its blob URLs are on.
_DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
# What `p2pdist mirror-config` configures peers for when no --registry is given, and the only
# registry docker's registry-mirrors sends to a peer: the registries peers are configured for
# out of the box. An operator who mirrors others lists them (deploy/kubernetes does).
DEFAULT_ALLOWED_REGISTRIES = ("docker.io",)


def parse_allowed_registries(value: object) -> tuple[str, ...]:
    """The `allowed_registries` config value: `HOST` (any port), `HOST:PORT`, or `*` (any)."""
    entries = (value,) if isinstance(value, str) else value
    if not isinstance(entries, list | tuple) or not all(isinstance(v, str) for v in entries):
        raise ConfigError(f"expected a list of registries, got {value!r}")
    out = []
    for entry in entries:
        entry = entry.strip().lower()
        if entry != ANY_REGISTRY and not is_registry_host(entry):
            raise ConfigError(f"invalid registry {entry!r}: want HOST, HOST:PORT or '*'")
        out.append(entry)
    return tuple(out)


def _split(hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = hostport.partition(":")
    return host, port if sep else None


def registry_allowed(netloc: str, allowed: tuple[str, ...]) -> bool:
    """Whether a URL's `host[:port]` is one of the allowed registries."""
    if ANY_REGISTRY in allowed:
        return True
    host, port = _split(netloc.lower())
    for entry in allowed:
        want_host, want_port = _split(entry)
        if want_port is not None and want_port != port:
            continue
        if want_host == host or (want_host in _DOCKER_HUB_NAMES and host in _DOCKER_HUB_NAMES):
            return True
    return False


def check_seed_url(url: str, task_id: str, allowed: tuple[str, ...]) -> None:
    """Raise BadRequest (not a blob URL of this task) or Forbidden (registry not allowed)."""
    name, digest = parse_blob_url(url)
    parse_name(name)  # no `..` or other path tricks inside the registry
    if digest != task_id:
        raise BadRequest(f"blob URL names {digest[:19]}, not the task {task_id[:19]}", code="DIGEST_INVALID")
    netloc = urlsplit(url).netloc
    if "@" in netloc:
        raise BadRequest("blob URL must not carry credentials")
    if not registry_allowed(netloc, allowed):
        raise Forbidden(f"registry {netloc[:100]} is not in allowed_registries")

"""What an image is made of, for preheating: a manifest URL resolved to the blobs a pull fetches.

A tag or digest names an image manifest (its config and layers) or an index (one manifest per
platform, of which the wanted platforms are followed). Parsing is pure (`parse_manifest`,
`parse_manifest_url`); `resolve_image` fetches with the caller's credentials.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from p2pdist.content.digest import parse_digest, parse_name
from p2pdist.errors import BadRequest, OriginError, PreheatError
from p2pdist.registry.client import OriginClient

MEDIA_INDEX = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MEDIA_MANIFEST = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
ACCEPT = ", ".join((*MEDIA_INDEX, *MEDIA_MANIFEST))
MAX_MANIFEST_BYTES = 4 << 20
# An index's entries for attestations and signatures carry this platform; nothing runs them.
UNKNOWN_PLATFORM = "unknown/unknown"

_MANIFEST_URL = re.compile(r"(?P<base>https?://[^/\s?#]+)/v2/(?P<name>[^\s?#]+)/manifests/(?P<ref>[^/\s?#]+)")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


@dataclass(frozen=True)
class ManifestURL:
    base: str  # scheme://host[:port]
    name: str
    reference: str  # a tag or a digest

    def manifest(self, reference: str) -> str:
        return f"{self.base}/v2/{self.name}/manifests/{reference}"

    def blob(self, digest: str) -> str:
        return f"{self.base}/v2/{self.name}/blobs/{digest}"


@dataclass(frozen=True)
class ImageBlob:
    """One blob a pull of the image fetches: a layer or a config."""

    digest: str
    size: int
    url: str
    platform: str  # os/arch[/variant] of the manifest it belongs to ("" for a single manifest)


def parse_manifest_url(url: str) -> ManifestURL:
    """`scheme://registry/v2/<name>/manifests/<tag or digest>`, or BadRequest."""
    m = _MANIFEST_URL.fullmatch(url)
    if m is None:
        raise BadRequest(f"not a manifest URL: {url[:200]} (want http(s)://REGISTRY/v2/NAME/manifests/TAG)")
    name = parse_name(m["name"])
    ref = m["ref"]
    if ref.startswith("sha256:"):
        parse_digest(ref)
    elif not _TAG.fullmatch(ref):
        raise BadRequest(f"invalid tag {ref[:140]!r}")
    return ManifestURL(m["base"], name, ref)


def parse_platform(text: str) -> str:
    """`os/arch` or `os/arch/variant`, lowercase, or BadRequest."""
    if not _PLATFORM.fullmatch(text):
        raise BadRequest(f"invalid platform {text[:60]!r}: want OS/ARCH[/VARIANT], e.g. linux/amd64")
    return text


def platform_of(entry: dict[str, Any]) -> str:
    platform = entry.get("platform")
    if not isinstance(platform, dict):
        return UNKNOWN_PLATFORM
    parts = [str(platform.get("os", "unknown")), str(platform.get("architecture", "unknown"))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _matches(platform: str, wanted: tuple[str, ...]) -> bool:
    # linux/arm64 also picks linux/arm64/v8; linux/arm/v7 picks only itself.
    return any(platform == w or platform.startswith(w + "/") for w in wanted)


@dataclass(frozen=True)
class Parsed:
    """A manifest: `children` ((digest, platform)) if it is an index, else `blobs` ((digest, size))."""

    children: tuple[tuple[str, str], ...] = ()
    blobs: tuple[tuple[str, int], ...] = ()


def parse_manifest(content_type: str, body: bytes) -> Parsed:
    """The blobs of an image manifest, or the platform manifests of an index."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise PreheatError("the registry sent a manifest that is not JSON") from None
    if not isinstance(doc, dict):
        raise PreheatError("the registry sent a manifest that is not a JSON object")
    media = doc.get("mediaType") or content_type
    try:
        if media in MEDIA_INDEX or (not media and "manifests" in doc):
            return Parsed(children=tuple((parse_digest(m["digest"]), platform_of(m)) for m in doc["manifests"]))
        if media in MEDIA_MANIFEST or (not media and "layers" in doc):
            described = [doc["config"], *doc["layers"]]
            return Parsed(blobs=tuple((parse_digest(d["digest"]), _size(d["size"])) for d in described))
    except (KeyError, TypeError, BadRequest) as exc:
        raise PreheatError(f"the registry sent a malformed manifest ({type(exc).__name__}: {exc})") from None
    raise PreheatError(f"unsupported manifest type {str(media)[:100]!r}")


def _size(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"bad size {value!r}")
    return value


async def resolve_image(
    client: OriginClient, url: str, headers: dict[str, str], platforms: tuple[str, ...] = ()
) -> list[ImageBlob]:
    """Every config and layer blob of the image at manifest `url` (each once), following an
    index to the manifests of `platforms` (all but unknown/unknown when empty).

    The registry refusing or not finding it is an OriginError (with its status); an index
    with none of the platforms, or a manifest that is not one, a PreheatError."""
    where = parse_manifest_url(url)
    top = await _fetch(client, where, where.reference, headers)
    manifests: list[tuple[str, Parsed]] = []
    if top.children:
        listed = [(digest, platform) for digest, platform in top.children if platform != UNKNOWN_PLATFORM]
        chosen = [(d, p) for d, p in listed if not platforms or _matches(p, platforms)]
        if not chosen:
            have = ", ".join(sorted({p for _, p in listed})) or "none"
            raise PreheatError(f"no manifest for {', '.join(platforms)} in the index (it has {have})")
        for digest, platform in chosen:
            child = await _fetch(client, where, digest, headers)
            if child.children:
                raise PreheatError(f"index entry {digest[:19]} is itself an index")
            manifests.append((platform, child))
    else:
        manifests.append(("", top))
    seen: set[str] = set()
    blobs: list[ImageBlob] = []
    for platform, parsed in manifests:
        for digest, size in parsed.blobs:
            if digest not in seen:
                seen.add(digest)
                blobs.append(ImageBlob(digest, size, where.blob(digest), platform))
    return blobs


async def _fetch(client: OriginClient, where: ManifestURL, reference: str, headers: dict[str, str]) -> Parsed:
    url = where.manifest(reference)
    content_type, body = await client.get_manifest(url, headers, ACCEPT, limit=MAX_MANIFEST_BYTES)
    if reference.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != reference:
        raise OriginError(f"manifest {reference[:19]} from {where.base} does not match its digest")
    return parse_manifest(content_type, body)

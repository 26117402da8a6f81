"""Manifests and indexes the mirror passed through, kept by digest for when the registry
cannot be reached (issue 13).

Every manifest a client got through this peer is stored under the sha256 of its bytes (only
when that is the digest the registry or the request named), and every tag's last resolution
beside it. A manifest by digest is served from here only after its bytes hash to that digest
again; a tag's last resolution is used only if the operator asked for it (`serve_stale_tags`).
The logic is pure over a directory: no trio, no sockets.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from p2pdist.content.digest import digest_hex, sha256_digest
from p2pdist.errors import BadRequest

log = logging.getLogger("p2pdist.mirror")

# Distribution refuses manifests over 4 MiB; a bigger answer passes through uncached.
MAX_MANIFEST_BYTES = 4 << 20
MAX_TAGS = 10_000
# Manifests kept; past it the least recently written tenth goes (a few KiB each: ~100 MiB at most).
MAX_MANIFESTS = 20_000
TAGS_FILE = "tags.json"


@dataclass(frozen=True)
class CachedManifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class TagResolution:
    digest: str
    media_type: str
    resolved_at: float  # wall time of the registry's answer


def is_digest(reference: str) -> bool:
    return reference.startswith("sha256:")  # a reference is a parsed tag or digest already


def manifest_digest(body: bytes) -> str:
    return sha256_digest(body)


class ManifestCache:
    """`root/<hex digest>` holds a manifest's bytes, `root/<hex digest>.type` its media type,
    `root/tags.json` each tag's last resolution, keyed by registry, repository and tag."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.tags: OrderedDict[str, TagResolution] = OrderedDict()
        self._load_tags()
        self.max_manifests = MAX_MANIFESTS
        self._count = sum(1 for p in self.root.iterdir() if _is_manifest_file(p))

    # -- writing --------------------------------------------------------------------------

    def put(
        self, registry: str, name: str, reference: str, body: bytes, media_type: str, named: str, now: float
    ) -> str | None:
        """Keep a manifest the registry sent for `reference`; `named` is its Docker-Content-Digest
        header ("" if none). Returns the digest it is kept under, or None when its bytes do not
        hash to the digest the request or the registry named (nothing is kept then)."""
        digest = manifest_digest(body)
        for claimed in (named, reference if is_digest(reference) else ""):
            if claimed and claimed != digest:
                log.warning("manifest of %s: bytes hash to %s, not %s: not cached", name, digest[:19], claimed[:19])
                return None
        if len(body) > MAX_MANIFEST_BYTES:
            return None
        path = self.root / digest_hex(digest)
        if not path.exists():
            _atomic_write(path.with_name(path.name + ".type"), media_type.encode())
            _atomic_write(path, body)
            self._count += 1
            if self._count > self.max_manifests:
                self._evict()
        if not is_digest(reference):
            self.resolved(registry, name, reference, digest, media_type, now)
        return digest

    def resolved(self, registry: str, name: str, tag: str, digest: str, media_type: str, now: float) -> None:
        """The registry resolved `tag` to `digest` (a HEAD's Docker-Content-Digest, or a GET)."""
        key = _tag_key(registry, name, tag)
        known = self.tags.get(key)
        self.tags[key] = TagResolution(digest, media_type, now)
        self.tags.move_to_end(key)
        while len(self.tags) > MAX_TAGS:
            self.tags.popitem(last=False)
        if known is None or known.digest != digest or now - known.resolved_at > 60:
            self._save_tags()

    # -- reading --------------------------------------------------------------------------

    def get(self, digest: str) -> CachedManifest | None:
        """The manifest stored under `digest`, if its bytes still hash to it (else it is dropped)."""
        path = self.root / digest_hex(digest)
        try:
            body = path.read_bytes()
            media_type = path.with_name(path.name + ".type").read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        except OSError as exc:
            log.warning("cannot read cached manifest %s: %s", digest[:19], exc)
            return None
        if manifest_digest(body) != digest:
            log.warning("cached manifest %s is corrupt: dropped", digest[:19])
            path.unlink(missing_ok=True)
            return None
        return CachedManifest(digest, media_type, body)

    def _evict(self) -> None:
        """Drop the least recently written tenth of the manifests (at least one)."""
        files = sorted((p for p in self.root.iterdir() if _is_manifest_file(p)), key=_mtime)
        for path in files[: max(1, len(files) // 10)]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".type").unlink(missing_ok=True)
        self._count = sum(1 for p in self.root.iterdir() if _is_manifest_file(p))

    def tag(self, registry: str, name: str, tag: str) -> TagResolution | None:
        return self.tags.get(_tag_key(registry, name, tag))

    # -- the tags file --------------------------------------------------------------------

    def _load_tags(self) -> None:
        try:
            raw = json.loads((self.root / TAGS_FILE).read_bytes())
            for key, (digest, media_type, at) in raw.items():
                if isinstance(key, str) and isinstance(digest, str) and _valid_digest(digest):
                    self.tags[key] = TagResolution(digest, str(media_type), float(at))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.root / TAGS_FILE, exc)

    def _save_tags(self) -> None:
        data = {k: [t.digest, t.media_type, t.resolved_at] for k, t in self.tags.items()}
        try:
            _atomic_write(self.root / TAGS_FILE, json.dumps(data).encode())
        except OSError as exc:
            log.warning("cannot keep tag resolutions in %s: %s", self.root, exc)


def _is_manifest_file(path: Path) -> bool:
    return len(path.name) == 64 and not path.name.startswith(".")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _valid_digest(value: str) -> bool:
    try:
        digest_hex(value)
    except BadRequest:
        return False
    return True


def _tag_key(registry: str, name: str, tag: str) -> str:
    return f"{registry} {name} {tag}"  # no part can hold a space


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)

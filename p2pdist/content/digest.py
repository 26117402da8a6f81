"""OCI digests, repository names and the BLAKE3 piece digests: parsing, validation, hashing.

Everything that decides whether a string names a blob, or whether bytes are the bytes
they claim to be, lives here.
"""

from __future__ import annotations

import hashlib
import re

import blake3

from p2pdist.errors import BadRequest

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# OCI distribution spec: path components of lowercase alphanumerics with separators.
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_REFERENCE_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
PIECE_DIGEST_BYTES = 32


def parse_digest(value: object) -> str:
    """Return `value` if it is `sha256:` + 64 lowercase hex, else raise BadRequest."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        shown = repr(value)[:80]
        raise BadRequest(
            f"invalid digest {shown}: want sha256: followed by 64 lowercase hex digits", code="DIGEST_INVALID"
        )
    return value


def parse_name(value: object) -> str:
    """Validate an OCI repository name (rejects `..`, absolute paths, uppercase, empty parts)."""
    if not isinstance(value, str) or len(value) > 255 or not _NAME.fullmatch(value):
        shown = repr(value)[:80]
        raise BadRequest(f"invalid repository name {shown}", code="NAME_INVALID")
    return value


def parse_reference(value: object) -> str:
    """A manifest reference: a tag or a digest."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return parse_digest(value)
    if not isinstance(value, str) or not _REFERENCE_TAG.fullmatch(value):
        raise BadRequest(f"invalid reference {repr(value)[:80]}")
    return value


def short(digest: str) -> str:
    """Twelve hex digits, for logs."""
    return digest.split(":", 1)[-1][:12]


def digest_hex(digest: str) -> str:
    return parse_digest(digest).split(":", 1)[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def piece_digest(data: bytes | memoryview) -> bytes:
    """BLAKE3 of one piece's bytes."""
    return bytes(blake3.blake3(data).digest())


class PieceHasher:
    """Incremental BLAKE3 for one piece, fed in chunks as they arrive."""

    __slots__ = ("_h", "length")

    def __init__(self) -> None:
        self._h = blake3.blake3()
        self.length = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._h.update(chunk)
        self.length += len(chunk)

    def digest(self) -> bytes:
        return bytes(self._h.digest())

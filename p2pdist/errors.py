"""The error hierarchy every p2pdist component raises, flat and named for what the caller can do.

    P2PError
    ├── BadRequest        the input is malformed: answer 4xx, keep serving
    ├── NotFound          the thing asked for does not exist here: answer 404
    ├── IntegrityError    bytes did not match their digest: drop them, avoid their sender
    ├── UpstreamError     a parent, seed, scheduler or origin failed: retry elsewhere or back to source
    │   └── OriginError   the origin itself refused or failed (carries its HTTP status)
    └── StoreError        the local disk failed (e.g. full): the download fails, nothing partial is kept
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of all p2pdist errors."""


class BadRequest(P2PError):
    status = 400


class NotFound(P2PError):
    status = 404


class IntegrityError(P2PError):
    """Bytes did not match the digest they were promised under."""


class UpstreamError(P2PError):
    """A remote party (parent, seed, scheduler, origin) failed to answer usefully."""


class OriginError(UpstreamError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StoreError(P2PError):
    """The local piece store could not write or read (disk full, permissions)."""

"""Every p2pdist error, in one tree named for what the caller can do.

Each error carries what an HTTP boundary needs to answer it: `status`, the HTTP status to
answer, and `code`, the OCI error code of a registry-API error body. Neither is ever parsed
back out of the message. What a remote party itself answered is `upstream_status`, apart
from the status we answer.

    P2PError                     500 UNKNOWN         a failure nothing below names
    ├── BadRequest               400 UNSUPPORTED     the input is malformed: answer 4xx, keep serving
    │   │                                            (raise sites name NAME_INVALID, DIGEST_INVALID...)
    │   ├── BodyTooLarge         413 SIZE_INVALID    a request body over the limit
    │   ├── RangeNotSatisfiable  416 RANGE_INVALID   a Range past the end (carries the length)
    │   ├── Forbidden            403 DENIED          well-formed, but this party may not ask it (e.g. a
    │   │                                            registry the operator does not allow)
    │   ├── TooManyRequests      429 TOOMANYREQUESTS over a rate or a cap: try again later
    │   └── LoopDetected         508 UNSUPPORTED     p2pdist mirrors forward to each other in a loop
    ├── NotFound                 404 UNSUPPORTED     the thing asked for does not exist here
    │                                                (raise sites name BLOB_UNKNOWN...)
    ├── IntegrityError           502 UNAVAILABLE     bytes did not match their digest: drop them, avoid their sender
    ├── UpstreamError            502 UNAVAILABLE     a parent, seed, scheduler or origin failed: retry elsewhere
    │   │                                            or back to source (`upstream_status`: what it answered)
    │   └── OriginError          from upstream_status the origin registry or its token service refused or failed
    ├── StoreError               503 UNAVAILABLE     the local disk failed (e.g. full): nothing partial is kept
    ├── StartupError             500 UNKNOWN         a service cannot start on this host (a port taken, a data
    │                                                dir it cannot use): fix the host and restart (exit 1)
    ├── ConfigError              500 UNKNOWN         a config file or flag is invalid: fix it and restart (exit 2)
    │   └── MirrorConfigError                        a mirror-config flag or runtime config file is unusable
    ├── GetError                 500 UNKNOWN         `p2pdist get` could not deliver the blob
    └── PreheatError             500 UNKNOWN         a preheat job could not hold the image where asked
        └── JobsBusy             429 TOOMANYREQUESTS the scheduler keeps no more preheat jobs: retry later

OriginError answers 401 UNAUTHORIZED, 403 DENIED, 404 BLOB_UNKNOWN or 429 TOOMANYREQUESTS when
the origin said so (the origin is asked for blobs only), else 502 UNAVAILABLE.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of all p2pdist errors. `code` may be named per raise site."""

    status: int = 500
    code: str = "UNKNOWN"
    # What the `p2pdist` command exits with when this ends it: 1 for a failure at run time,
    # 2 for unusable input (a flag, a config file), as argparse does for usage errors.
    exit_code: int = 1

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadRequest(P2PError):
    """The request is malformed; the answer is a 4xx with a one-line reason."""

    status = 400
    code = "UNSUPPORTED"


class BodyTooLarge(BadRequest):
    status = 413
    code = "SIZE_INVALID"


class RangeNotSatisfiable(BadRequest):
    """A Range that starts past the end; the answer names the length (`Content-Range: bytes */N`)."""

    status = 416
    code = "RANGE_INVALID"

    def __init__(self, length: int) -> None:
        super().__init__(f"range not satisfiable: the resource has {length} bytes")
        self.length = length


class Forbidden(BadRequest):
    """Well-formed, but not allowed: a blob URL on a registry the operator does not allow."""

    status = 403
    code = "DENIED"


class TooManyRequests(BadRequest):
    """Over a per-host rate or a global cap; the same request may succeed later."""

    status = 429
    code = "TOOMANYREQUESTS"


class LoopDetected(BadRequest):
    status = 508


class NotFound(P2PError):
    status = 404
    code = "UNSUPPORTED"  # an unknown endpoint; a missing blob names BLOB_UNKNOWN


class IntegrityError(P2PError):
    """Bytes did not match the digest they were promised under."""

    status = 502
    code = "UNAVAILABLE"


class UpstreamError(P2PError):
    """A remote party (parent, seed, scheduler, origin) failed to answer usefully.

    `upstream_status` is the HTTP status it answered, None if it did not answer at all
    (unreachable, reset, timed out, or the answer was unusable)."""

    status = 502
    code = "UNAVAILABLE"
    # The likely fix, when one is known (`registry.diagnose`): logged and shown to the operator.
    hint: str = ""

    def __init__(self, message: str = "", *, upstream_status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.upstream_status = upstream_status


# What the mirror answers for the origin's own no; anything else is the origin failing (502).
_ORIGIN_ANSWERS = {
    401: (401, "UNAUTHORIZED"),
    403: (403, "DENIED"),
    404: (404, "BLOB_UNKNOWN"),
    429: (429, "TOOMANYREQUESTS"),
}


class OriginError(UpstreamError):
    """The origin registry (or its token service) refused or failed.

    `status`/`code` follow from `upstream_status` (see the module docstring); a raise site
    that knows better (a token service failing means the client must authenticate) passes
    `status` and `code` itself."""

    def __init__(
        self,
        message: str = "",
        *,
        upstream_status: int | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        answer = status if status is not None else upstream_status
        self.status, default_code = _ORIGIN_ANSWERS.get(answer or 0, (status or 502, "UNAVAILABLE"))
        super().__init__(message, upstream_status=upstream_status, code=code or default_code)


class StoreError(P2PError):
    """The local piece store could not write or read (disk full, permissions)."""

    status = 503
    code = "UNAVAILABLE"


class StartupError(P2PError):
    """A service cannot start on this host: its address is taken, its data dir unusable. The
    message names the address or path."""


class ConfigError(P2PError):
    """The configuration file or a flag is invalid."""

    exit_code = 2


class MirrorConfigError(ConfigError):
    """A flag or an existing runtime config file is unusable."""

    exit_code = 1  # mostly a runtime's file found broken on this host


class GetError(P2PError):
    """`p2pdist get` failed: the URL or flags are unusable, or the transfer or its digest failed."""


class PreheatError(P2PError):
    """A preheat job (or `p2pdist preheat`) could not hold the image where it was asked to:
    the image does not resolve, access is refused, or a target failed."""


class JobsBusy(PreheatError):
    """The scheduler holds as many preheat jobs as it keeps: try again later."""

    status = 429
    code = "TOOMANYREQUESTS"

"""How cluster members trust each other: the shared cluster secret every scheduler, seed and
piece request carries as a Bearer token (checked in constant time), and the TLS contexts for
the scheduler and piece ports. The proxy port serves local clients and takes neither.
"""

from __future__ import annotations

import hmac
import ssl

from p2pdist.config import ConfigError
from p2pdist.transport.protocol import Request, Response, text_response

# Paths any monitoring system may read without the secret.
OPEN_PATHS = frozenset({"/healthz", "/metrics"})
_CHALLENGE = ("www-authenticate", 'Bearer realm="p2pdist-cluster"')


def bearer_headers(secret: str | None) -> dict[str, str]:
    """The header a request to another cluster member carries (none without a secret)."""
    return {"authorization": f"Bearer {secret}"} if secret else {}


def refuse_unauthorized(request: Request, secret: str | None) -> Response | None:
    """A 401 for a request that lacks the cluster secret, or None to let it through.

    The reason never repeats what the client sent, and the comparison takes the same time
    however much of the token is right.
    """
    if not secret or request.path in OPEN_PATHS:
        return None
    sent = request.headers.get("authorization", "")
    scheme, _, token = sent.partition(" ")
    if not sent:
        return text_response(401, "missing cluster secret: send Authorization: Bearer <secret>", [_CHALLENGE])
    expected = secret.encode("ascii")
    # latin-1 round-trips every header byte; a non-ASCII token simply compares unequal.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), expected):
        return text_response(401, "wrong cluster secret", [_CHALLENGE])
    return None


def server_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context a scheduler or piece port serves with; None when no certificate is set."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert (tls_cert) and --tls-key (tls_key) go together: set both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(
            f"cannot load --tls-cert (tls_cert) {cert} with --tls-key (tls_key) {key}: {reason}"
        ) from None
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """The context https:// scheduler, seed and parent URLs are verified with: `ca` if set,
    else the system's trust store."""
    try:
        return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot load --tls-ca (tls_ca) {ca}: {reason}") from None

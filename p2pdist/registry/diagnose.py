"""Why a registry could not be reached, in words an operator can act on.

`unreachable` turns the exception httpx raised into a reason (what failed) and a hint (the
likely fix), e.g. TLS spoken to a plain-HTTP registry → start with --insecure-registry.
Pure: it reads the exception and its causes, it opens nothing.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True)
class Unreachable:
    """What was tried (`base`: scheme://host:port), why it failed, and the likely fix."""

    base: str
    reason: str
    hint: str

    def __str__(self) -> str:
        return f"{self.base} unreachable: {self.reason}" + (f" ({self.hint})" if self.hint else "")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes, and the members of any exception group among them (trio reports a
    failed connect as an OSError caused by a group of one error per address tried)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def _detail(chain: list[BaseException]) -> str:
    """The most telling message in the chain: the innermost one that says anything."""
    for e in reversed(chain):
        if str(e) and not isinstance(e, BaseExceptionGroup):
            return f"{type(e).__name__}: {str(e)[:160]}"
    return type(chain[0]).__name__


def unreachable(url: str, exc: BaseException) -> Unreachable:
    """The reason and hint for a request to `url` that failed with `exc` before any answer."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2][:100]
    base = f"{parts.scheme}://{host}"
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    detail = _detail(chain)
    https = parts.scheme == "https"
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in text:
        return Unreachable(
            base,
            f"its TLS certificate is not trusted ({detail})",
            "add the registry's CA to this host's trust store, or fix the registry's certificate",
        )
    if https and (
        any(isinstance(e, ssl.SSLError) for e in chain)
        or "WRONG_VERSION_NUMBER" in text
        or "record layer failure" in text
        or "SSL" in text
    ):
        return Unreachable(
            base,
            f"the TLS handshake failed ({detail})",
            f"TLS to a plain-HTTP registry? start the peer with --insecure-registry {host}",
        )
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text:
        return Unreachable(
            base,
            f"connection refused ({detail})",
            f"is the registry running and listening on {host}?",
        )
    if any(isinstance(e, socket.gaierror) for e in chain) or "Name or service not known" in text:
        return Unreachable(
            base, f"cannot resolve {parts.hostname} ({detail})", "check the registry name and this host's DNS"
        )
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(
            base, f"timed out ({detail})", "a firewall dropping packets, or a registry too busy to answer"
        )
    return Unreachable(base, detail, "")

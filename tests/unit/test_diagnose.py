"""Upstream failures in words an operator can act on: the reason and the likely fix for each
way a registry cannot be reached, the once-a-minute warning, and the mirror's request kinds."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from p2pdist.registry.diagnose import unreachable
from peer.proxy import RateLimitedLog, request_kind


def caused(outer: Exception, inner: BaseException) -> Exception:
    outer.__cause__ = inner
    return outer


def test_tls_to_a_plain_http_registry_names_what_was_tried_and_the_flag_that_fixes_it() -> None:
    # What trio's httpx raises: an empty ConnectError caused by the SSLError.
    exc = caused(httpx.ConnectError(""), ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    why = unreachable("https://127.0.0.1:5000/v2/library/app/manifests/1", exc)
    assert why.base == "https://127.0.0.1:5000"
    assert "TLS handshake failed" in why.reason and "WRONG_VERSION_NUMBER" in why.reason
    assert why.hint == "TLS to a plain-HTTP registry? start the peer with --insecure-registry 127.0.0.1:5000"
    assert str(why).startswith("https://127.0.0.1:5000 unreachable: the TLS handshake failed")


def test_a_refused_connection_inside_trios_exception_group_is_found() -> None:
    group = ExceptionGroup("connect", [ConnectionRefusedError(111, "Connection refused")])
    exc = caused(httpx.ConnectError("all attempts to connect to 127.0.0.1:1 failed"), caused(OSError("all"), group))
    why = unreachable("http://user:pw@127.0.0.1:1/v2/", exc)
    assert why.base == "http://127.0.0.1:1"  # never the credentials
    assert why.reason.startswith("connection refused") and "listening on 127.0.0.1:1" in why.hint


@pytest.mark.parametrize(
    "inner, reason",
    [
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve registry.example"),
        (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"), "certificate is not trusted"),
    ],
)
def test_dns_and_untrusted_certificates_have_their_own_reasons(inner: BaseException, reason: str) -> None:
    why = unreachable("https://registry.example/v2/", caused(httpx.ConnectError(""), inner))
    assert reason in why.reason and why.hint and "--insecure-registry" not in why.hint


def test_a_timeout_says_so() -> None:
    assert unreachable("https://r.example/v2/", httpx.ReadTimeout("")).reason.startswith("timed out")


def test_the_same_warning_goes_out_once_per_interval_and_counts_what_it_held_back() -> None:
    limiter = RateLimitedLog(60.0)
    assert limiter.allow("a", 0.0) == (True, 0)
    assert limiter.allow("a", 1.0) == (False, 0)
    assert limiter.allow("a", 2.0) == (False, 0)
    assert limiter.allow("b", 3.0) == (True, 0)  # another failure is not held back
    assert limiter.allow("a", 61.0) == (True, 2)


def test_the_warning_limiter_forgets_the_oldest_message_past_its_bound() -> None:
    limiter = RateLimitedLog(60.0, max_messages=2)
    limiter.allow("a", 0.0)
    limiter.allow("b", 1.0)
    limiter.allow("c", 2.0)
    assert limiter.allow("a", 3.0) == (True, 0)


@pytest.mark.parametrize(
    "method, path, kind",
    [
        ("GET", "/v2/", "base"),
        ("GET", "/v2/library/app/blobs/sha256:" + "0" * 64, "blob"),
        ("HEAD", "/v2/library/app/manifests/latest", "manifest"),
        ("GET", "/v2/library/app/tags/list", "tags"),
        ("GET", "/v2/_catalog", "catalog"),
        ("PUT", "/v2/library/app/manifests/latest", "push"),
        ("GET", "/v2/nonsense", "other"),
    ],
)
def test_a_mirror_request_is_counted_by_what_was_asked(method: str, path: str, kind: str) -> None:
    assert request_kind(method, path) == kind

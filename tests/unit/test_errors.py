"""The error tree: every error carries the HTTP status to answer and its OCI code, the mirror
builds its OCI error body from those fields alone, and no error class lives outside errors.py."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from p2pdist import errors, wire
from p2pdist.content.digest import parse_digest, parse_name
from p2pdist.errors import (
    BadRequest,
    BodyTooLarge,
    ConfigError,
    Forbidden,
    GetError,
    IntegrityError,
    LoopDetected,
    MirrorConfigError,
    NotFound,
    OriginError,
    P2PError,
    RangeNotSatisfiable,
    StoreError,
    TooManyRequests,
    UpstreamError,
)
from p2pdist.node.pieceserver import parse_range
from p2pdist.registry.oci import parse_blob_url
from peer.proxy import error_response

ROOT = Path(__file__).resolve().parents[2]
# The codes of the OCI distribution spec, plus the Distribution registry's UNAVAILABLE, UNKNOWN
# and RANGE_INVALID.
OCI_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "UNAVAILABLE",
    "UNKNOWN",
    "RANGE_INVALID",
}


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (P2PError("x"), 500, "UNKNOWN"),
        (BadRequest("x"), 400, "UNSUPPORTED"),
        (BadRequest("x", code="NAME_INVALID"), 400, "NAME_INVALID"),
        (BodyTooLarge("x"), 413, "SIZE_INVALID"),
        (RangeNotSatisfiable(10), 416, "RANGE_INVALID"),
        (LoopDetected("x"), 508, "UNSUPPORTED"),
        (Forbidden("x"), 403, "DENIED"),
        (TooManyRequests("x"), 429, "TOOMANYREQUESTS"),
        (NotFound("x"), 404, "UNSUPPORTED"),
        (NotFound("x", code="BLOB_UNKNOWN"), 404, "BLOB_UNKNOWN"),
        (IntegrityError("x"), 502, "UNAVAILABLE"),
        (UpstreamError("x"), 502, "UNAVAILABLE"),
        (StoreError("x"), 503, "UNAVAILABLE"),
        (ConfigError("x"), 500, "UNKNOWN"),
        (MirrorConfigError("x"), 500, "UNKNOWN"),
        (GetError("x"), 500, "UNKNOWN"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_error_carries_its_status_and_code(error: P2PError, status: int, code: str) -> None:
    assert (error.status, error.code) == (status, code)


@pytest.mark.parametrize(
    ("upstream_status", "status", "code"),
    [
        (401, 401, "UNAUTHORIZED"),
        (403, 403, "DENIED"),
        (404, 404, "BLOB_UNKNOWN"),
        (429, 429, "TOOMANYREQUESTS"),
        (400, 502, "UNAVAILABLE"),
        (500, 502, "UNAVAILABLE"),
        (503, 502, "UNAVAILABLE"),
        (None, 502, "UNAVAILABLE"),
    ],
)
def test_origin_error_answers_for_what_the_origin_said_and_keeps_it_apart(
    upstream_status: int | None, status: int, code: str
) -> None:
    error = OriginError("origin answered", upstream_status=upstream_status)
    assert (error.status, error.code, error.upstream_status) == (status, code, upstream_status)


def test_a_raise_site_can_name_the_answer_apart_from_the_origins_status() -> None:
    # A token service that fails: the client must authenticate, whatever the service said.
    error = OriginError("token service refused: HTTP 500", upstream_status=500, status=401)
    assert (error.status, error.code, error.upstream_status) == (401, "UNAUTHORIZED", 500)


def test_upstream_error_keeps_what_the_remote_party_answered() -> None:
    assert UpstreamError("parent answered 503", upstream_status=503).upstream_status == 503
    assert UpstreamError("parent unreachable").upstream_status is None


def test_parsers_name_their_oci_code() -> None:
    with pytest.raises(BadRequest) as name:
        parse_name("UPPER/case")
    assert name.value.code == "NAME_INVALID"
    with pytest.raises(BadRequest) as digest:
        parse_digest("sha256:short")
    assert digest.value.code == "DIGEST_INVALID"
    with pytest.raises(BadRequest) as nested:  # the wire format keeps the digest parser's code
        wire.decode(wire.Leave, wire.encode(wire.Leave(host_id="h", task_id="sha256:short")))
    assert nested.value.code == "DIGEST_INVALID"
    with pytest.raises(BadRequest):
        parse_blob_url("http://registry/v2/a/manifests/latest")


def body_of(error: P2PError) -> tuple[int, str, str]:
    response = error_response(error)
    assert ("content-type", "application/json") in response.headers
    assert isinstance(response.body, bytes)
    (entry,) = json.loads(response.body)["errors"]
    return response.status, entry["code"], entry["message"]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BadRequest("invalid repository name 'A'", code="NAME_INVALID"), 400, "NAME_INVALID"),
        (BadRequest("invalid digest 'x'", code="DIGEST_INVALID"), 400, "DIGEST_INVALID"),
        (LoopDetected("request passed 3 p2pdist daemons"), 508, "UNSUPPORTED"),
        (NotFound("no such registry endpoint /v2/x"), 404, "UNSUPPORTED"),
        (OriginError("origin answered HTTP 404", upstream_status=404), 404, "BLOB_UNKNOWN"),
        (OriginError("origin answered HTTP 401", upstream_status=401), 401, "UNAUTHORIZED"),
        (OriginError("origin answered HTTP 503", upstream_status=503), 502, "UNAVAILABLE"),
        (OriginError("registry 127.0.0.1:1 unreachable: ConnectError"), 502, "UNAVAILABLE"),
        (StoreError("piece 3: disk full"), 503, "UNAVAILABLE"),
        (IntegrityError("origin sent sha256:ab for sha256:cd"), 502, "UNAVAILABLE"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_mirror_answers_an_error_from_its_status_and_code(error: P2PError, status: int, code: str) -> None:
    assert body_of(error) == (status, code, str(error))


def test_mirror_error_code_never_comes_from_the_message() -> None:
    """Words that once picked the code ("repository name", "digest") no longer do."""
    assert body_of(BadRequest("invalid digest in repository name", code="NAME_INVALID"))[1] == "NAME_INVALID"
    assert body_of(OriginError("digest of repository name", upstream_status=404))[1] == "BLOB_UNKNOWN"
    assert body_of(BadRequest("bad repository name digest"))[1] == "UNSUPPORTED"


def test_mirror_range_error_names_the_length() -> None:
    with pytest.raises(BadRequest) as past:
        parse_range("bytes=2000-", 1234)
    response = error_response(past.value)
    assert response.status == 416
    assert ("content-range", "bytes */1234") in response.headers


def test_every_error_class_is_a_p2p_error_with_a_known_code() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) == 18
    for cls in classes:
        assert issubclass(cls, P2PError), cls
        assert 400 <= cls.status <= 599 and cls.code in OCI_CODES, cls


# Not errors a caller handles.
NOT_IN_ERRORS = {
    ("p2pdist/transport/server.py", "_ClientGone"),  # control flow inside the HTTP server
}


def test_every_error_class_lives_in_errors_py() -> None:
    error_names = {name for name, v in vars(errors).items() if isinstance(v, type)} | {"Exception"}
    found = set()
    for package in ("p2pdist", "peer", "seed", "scheduler"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == "p2pdist/errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id in error_names or b.id.endswith("Error")) for b in node.bases
                ):
                    found.add((relative, node.name))
    assert found <= NOT_IN_ERRORS

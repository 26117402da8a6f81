"""Digest, repository name and reference parsing; piece hashing."""

from __future__ import annotations

import hashlib

import blake3
import pytest

from p2pdist.content.digest import (
    PieceHasher,
    digest_hex,
    parse_digest,
    parse_name,
    parse_reference,
    piece_digest,
    sha256_digest,
    short,
)
from p2pdist.errors import BadRequest

HEX = "0123456789abcdef" * 4
GOOD = "sha256:" + HEX


def test_parse_digest_accepts() -> None:
    assert parse_digest(GOOD) == GOOD


@pytest.mark.parametrize(
    "value",
    [
        "sha256:" + HEX.upper(),
        "sha256:" + HEX[:63],
        "sha256:" + HEX + "0",  # 65 hex
        HEX,  # no prefix
        "sha512:" + HEX,
        "SHA256:" + HEX,
        "sha256:" + HEX[:63] + "g",
        " " + GOOD,
        GOOD + "\n",
        "",
        None,
        123,
        GOOD.encode(),
    ],
)
def test_parse_digest_rejects(value: object) -> None:
    with pytest.raises(BadRequest, match="invalid digest") as info:
        parse_digest(value)
    assert (info.value.status, info.value.code) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize(
    "name",
    ["library/alpine", "alpine", "a/b/c", "my-org/my_repo", "a__b", "a--b", "a.b/c-d", "x9/0"],
)
def test_parse_name_accepts(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "a/../b",
        "../etc",
        "a/..",
        "/abs",
        "abs/",
        "a//b",
        "Library/alpine",
        "UPPER",
        "a..b",
        "a___b",
        "-a",
        "a-",
        "a b",
        "a/./b",
        "a\\b",
        "a" * 256,
        None,
        7,
    ],
)
def test_parse_name_rejects(name: object) -> None:
    with pytest.raises(BadRequest, match="invalid repository name") as info:
        parse_name(name)
    assert (info.value.status, info.value.code) == (400, "NAME_INVALID")


def test_parse_name_length_limit() -> None:
    assert parse_name("a" * 255) == "a" * 255


@pytest.mark.parametrize("ref", ["latest", "v1.2.3", "1", "_x", "A-b_c.d", "a" * 128, GOOD])
def test_parse_reference_accepts(ref: str) -> None:
    assert parse_reference(ref) == ref


@pytest.mark.parametrize(
    "ref",
    ["", "-x", ".x", "a" * 129, "a/b", "a:b", "../x", "sha256:" + HEX.upper(), "sha256:abc", None, 1],
)
def test_parse_reference_rejects(ref: object) -> None:
    with pytest.raises(BadRequest):
        parse_reference(ref)


def test_helpers() -> None:
    assert short(GOOD) == HEX[:12]
    assert digest_hex(GOOD) == HEX
    with pytest.raises(BadRequest):
        digest_hex("sha256:xyz")
    assert sha256_digest(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_piece_hashing() -> None:
    data = bytes(range(256)) * 100
    assert piece_digest(data) == blake3.blake3(data).digest()
    assert len(piece_digest(data)) == 32
    h = PieceHasher()
    for i in range(0, len(data), 1000):
        h.update(memoryview(data)[i : i + 1000])
    assert h.length == len(data)
    assert h.digest() == piece_digest(data)
    assert piece_digest(b"a") != piece_digest(b"b")

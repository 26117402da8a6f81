"""The mirror's content-addressed manifest cache (peer/manifests.py): kept only under the
digest its bytes hash to, served only after hashing again, tags remembered across a restart."""

from __future__ import annotations

import os
from pathlib import Path

from p2pdist.content.digest import digest_hex, sha256_digest
from peer.manifests import ManifestCache

REG = "http://registry.example:5000"
OCI = "application/vnd.oci.image.manifest.v1+json"
BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
DIGEST = sha256_digest(BODY)


def test_a_manifest_by_tag_is_kept_by_digest_and_the_tag_resolution_beside_it(tmp_path: Path) -> None:
    cache = ManifestCache(tmp_path)
    assert cache.put(REG, "edge/app", "v1", BODY, OCI, DIGEST, now=100.0) == DIGEST
    cached = cache.get(DIGEST)
    assert cached is not None and cached.body == BODY and cached.media_type == OCI
    tag = cache.tag(REG, "edge/app", "v1")
    assert tag is not None and (tag.digest, tag.resolved_at) == (DIGEST, 100.0)
    assert cache.tag(REG, "edge/other", "v1") is None and cache.tag("http://x:1", "edge/app", "v1") is None
    again = ManifestCache(tmp_path)  # a restarted daemon
    assert again.tag(REG, "edge/app", "v1") == tag
    assert again.get(DIGEST) == cached


def test_bytes_that_do_not_hash_to_the_named_digest_are_not_kept(tmp_path: Path) -> None:
    cache = ManifestCache(tmp_path)
    other = "sha256:" + "ab" * 32
    assert cache.put(REG, "edge/app", other, BODY, OCI, "", now=1.0) is None  # asked by another digest
    assert cache.put(REG, "edge/app", "v1", BODY, OCI, other, now=1.0) is None  # the header names another
    assert cache.get(DIGEST) is None and cache.tag(REG, "edge/app", "v1") is None
    assert cache.put(REG, "edge/app", DIGEST, BODY, OCI, "", now=1.0) == DIGEST  # by digest, no header


def test_a_corrupted_cache_file_is_dropped_not_served(tmp_path: Path) -> None:
    cache = ManifestCache(tmp_path)
    cache.put(REG, "edge/app", DIGEST, BODY, OCI, DIGEST, now=1.0)
    (tmp_path / digest_hex(DIGEST)).write_bytes(BODY.replace(b"2", b"3"))
    assert cache.get(DIGEST) is None
    assert not (tmp_path / digest_hex(DIGEST)).exists()


def test_a_head_resolution_is_remembered_for_the_get_by_digest_that_follows(tmp_path: Path) -> None:
    cache = ManifestCache(tmp_path)
    cache.resolved(REG, "edge/app", "latest", DIGEST, OCI, now=5.0)
    tag = cache.tag(REG, "edge/app", "latest")
    assert tag is not None and tag.digest == DIGEST
    assert cache.get(DIGEST) is None  # only the GET brings the bytes


def test_an_unreadable_tags_file_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "tags.json").write_text("{not json")
    assert ManifestCache(tmp_path).tags == {}


def test_the_cache_is_bounded_the_oldest_written_going_first(tmp_path: Path) -> None:
    cache = ManifestCache(tmp_path)
    cache.max_manifests = 10
    digests = []
    for i in range(11):
        body = BODY.replace(b"[]", f"[{i}]".encode())
        digest = sha256_digest(body)
        assert cache.put(REG, "edge/app", digest, body, OCI, "", now=float(i)) == digest
        digests.append(digest)
        os.utime(tmp_path / digest_hex(digest), (i, i))  # written in this order
    assert cache.get(digests[0]) is None  # the oldest went
    assert all(cache.get(d) is not None for d in digests[1:])
    assert ManifestCache(tmp_path)._count == 10

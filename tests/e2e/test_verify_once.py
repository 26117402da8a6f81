"""Verify once, with real processes: a peer given the seed's public key does not hash a blob
it fetched whole from peers against digests the seed signed after checking the sha256; a peer
with another key, or none, hashes it as before; and a corrupt origin still fails every pull,
attestation or not (the seed signs nothing it did not check)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lab.attest import write_key_pair
from lab.registry import Origin
from tests.e2e.test_hardening import flip_byte, stored_blob
from tests.support.cluster import ClusterFactory, MiB, sha256_file
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

CHECKS = "p2pdist_peer_blob_checks_total"


def key_pair(directory: Path, name: str) -> tuple[str, str]:
    private, public = write_key_pair(directory, name)
    return str(private), str(public)


def test_a_peer_with_the_seeds_key_skips_the_second_hash_and_others_still_hash(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((13 * MiB + 77,), 1801, "verify/once")
    layer = image.layers[0]
    seed_key, seed_public = key_pair(tmp_path, "seed")
    _, rogue_public = key_pair(tmp_path, "rogue")
    cluster = cluster_factory(seed_args=("--attest-key", seed_key))
    trusting, doubting = (cluster.add_peers(1, ("--attest-public-key", key))[0] for key in (seed_public, rogue_public))
    (plain,) = cluster.add_peers(1)
    url = cluster.blob_url("verify/once", layer.digest)
    outs = cluster.pull_all([trusting, doubting, plain], url, "once", timeout=120)
    assert [sha256_file(out) for out in outs] == [layer.digest] * 3
    assert metric(trusting.url, CHECKS, 'how="attested"') == 1
    assert metric(trusting.url, CHECKS, 'how="hashed"') == 0
    for peer in (doubting, plain):
        assert metric(peer.url, CHECKS, 'how="hashed"') == 1
        assert metric(peer.url, CHECKS, 'how="attested"') == 0


def test_a_corrupt_origin_fails_the_pull_of_a_peer_that_takes_attestations(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, origin: Origin, tmp_path: Path
) -> None:
    image = push_to_origin((9 * MiB + 5,), 1802, "verify/corrupt")
    layer = image.layers[0]
    seed_key, seed_public = key_pair(tmp_path, "seed")
    data = stored_blob(origin, layer.digest)
    flip_byte(data, 5 * MiB + 1)
    try:
        cluster = cluster_factory(seed_args=("--attest-key", seed_key))
        (peer,) = cluster.add_peers(1, ("--attest-public-key", seed_public))
        out = tmp_path / "corrupt.blob"
        job = cluster.start_get(peer, cluster.blob_url("verify/corrupt", layer.digest), out)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 1, err
        assert "digest mismatch" in err, err
        assert not out.exists()
        status = json.loads(urllib.request.urlopen(f"{peer.proxy_url}/v1/downloads/{layer.digest}", timeout=10).read())
        assert status["state"] == "failed"
        assert metric(peer.url, CHECKS, 'how="attested"') == 0
    finally:
        flip_byte(data, 5 * MiB + 1)

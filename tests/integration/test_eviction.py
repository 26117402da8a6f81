"""The cache quota in a real peer process: over its quota the peer evicts the least recently
used blob and fetches it again on demand. (The rule itself is tests/unit/test_quota.py.)"""

from __future__ import annotations

from p2pdist.content.digest import digest_hex
from tests.support.cluster import ClusterFactory, MiB, sha256_file
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin


def test_peer_over_its_quota_evicts_the_least_recently_used_blob_and_refetches_it_on_demand(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    images = [push_to_origin((16 * MiB,), 51 + i, f"evict/b{i}") for i in range(3)]
    layers = [image.layers[0] for image in images]
    cluster = cluster_factory()
    (peer,) = cluster.add_peers(
        1, ("--cache-quota", "40MiB", "--cache-high-watermark", "0.9", "--cache-low-watermark", "0.85")
    )
    urls = [cluster.blob_url(f"evict/b{i}", layer.digest) for i, layer in enumerate(layers)]
    tasks = cluster.workdir / f"{peer.name}-data" / "tasks"

    for i in (0, 1, 0, 2):  # blob 0 is used again after blob 1: blob 1 becomes the oldest
        (out,) = cluster.pull_all([peer], urls[i], f"pull{i}")
        assert sha256_file(out) == layers[i].digest

    held = {p.name for p in tasks.iterdir()}
    assert held == {digest_hex(layers[0].digest), digest_hex(layers[2].digest)}
    assert metric(peer.url, "p2pdist_peer_cache_evictions_total") == 1
    assert metric(peer.url, "p2pdist_peer_cache_bytes") <= 40 * MiB
    # The evicted blob comes back on demand, right.
    (out,) = cluster.pull_all([peer], urls[1], "again")
    assert sha256_file(out) == layers[1].digest

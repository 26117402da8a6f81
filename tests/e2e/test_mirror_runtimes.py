"""Real runtimes pulling through the mirror: containerd (`ctr image pull --hosts-dir`) on three
hosts at once, and dockerd with `registry-mirrors`. Each runtime is private to the test (own
root, state and socket); the origin is the real Distribution registry behind a counting relay."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from lab.registry import Origin
from lab.runtimes import Containerd, Dockerd, write_hosts_toml
from tests.support.cluster import Cluster, ClusterFactory
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

MiB = 1 << 20


@pytest.fixture
def cluster(cluster_factory: ClusterFactory) -> Cluster:
    return cluster_factory()


def test_three_hosts_pull_with_containerd_and_the_origin_sends_each_layer_once(
    cluster: Cluster, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((20 * MiB, 12 * MiB, 6 * MiB), 41, "mirror/multi")
    relay = cluster.relay
    peers = cluster.add_peers(3, ("--insecure-registry", relay.host))
    hosts = []
    try:
        for i, peer in enumerate(peers):
            hosts_dir = tmp_path / f"host{i}-certs.d"
            write_hosts_toml(hosts_dir, relay.host, relay.url, peer.proxy_url)
            hosts.append((Containerd(tmp_path, f"containerd{i}"), hosts_dir))
        before = relay.downstream_bytes()
        ref = f"{relay.host}/mirror/multi:latest"

        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
            times = list(pool.map(lambda h: h[0].pull(ref, h[1], timeout=180), hosts))

        wanted = {layer.digest for layer in image.layers} | {image.config_digest, image.manifest_digest}
        for containerd, _ in hosts:
            assert wanted <= containerd.content_digests()
            # Unpacked: the image's layers became a snapshot chain.
            snapshots = containerd.ctr("snapshots", "ls")
            assert snapshots.returncode == 0 and len(snapshots.stdout.splitlines()) - 1 >= len(image.layers)
        sent = relay.downstream_bytes() - before
        total = image.total_layer_bytes
        assert total <= sent <= 1.1 * total + 256 * 1024, f"origin sent {sent} bytes for {total} bytes of layers"
        served = sum(metric(p.url, "p2pdist_peer_mirror_blob_bytes_total") for p in peers)
        assert served >= 3 * total
        assert max(times) < 120
    finally:
        for containerd, _ in hosts:
            containerd.stop()


def test_docker_pull_through_the_mirror_gives_the_image_of_a_direct_pull(
    cluster: Cluster, origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    # docker's registry-mirrors mirror Docker Hub only: `p2pdist-tiny` means
    # docker.io/library/p2pdist-tiny, which the peer maps to the origin, its default upstream.
    image = push_to_origin((3 * MiB, 1 * MiB), 42, "library/p2pdist-tiny")
    (peer,) = cluster.add_peers(1, ("--registry-mirror", cluster.relay.url))
    assert peer.proxy_url is not None
    with (
        Containerd(tmp_path, "containerd-docker") as containerd,
        Dockerd(tmp_path, containerd, registry_mirrors=[peer.proxy_url], insecure_registries=[origin.host]) as dockerd,
    ):
        dockerd.pull("p2pdist-tiny:latest", timeout=120)
        through_mirror = dockerd.image_id("p2pdist-tiny:latest")
        # Nothing else could have served it: this machine cannot reach Docker Hub.
        assert metric(peer.url, "p2pdist_peer_mirror_blob_bytes_total") >= image.total_layer_bytes
        assert dockerd.docker("image", "rm", "p2pdist-tiny:latest").returncode == 0

        direct_ref = f"{origin.host}/library/p2pdist-tiny:latest"
        dockerd.pull(direct_ref, timeout=120)
        assert dockerd.image_id(direct_ref) == through_mirror == image.config_digest

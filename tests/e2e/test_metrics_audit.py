"""Metrics you can trust: each service is scraped before and after two known pulls, and every
figure is checked against the bytes that actually moved (the relay in front of the origin
counts what the origin sent; sha256 of what the client got). Scrapes of /metrics and
/healthz in between must not count as uploads."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.support.cluster import ClusterFactory, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

MiB = 1 << 20


def labels_of(url: str, name: str) -> list[str]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [m.group(1) for m in re.finditer(rf"^{name}\{{([^}}]*)\}}", text, re.M)]


def test_every_byte_figure_matches_the_bytes_moved_by_two_pulls(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    cluster = cluster_factory()
    image = push_to_origin((24 * MiB,), 164, "audit/app")
    layer = image.layers[0]
    size = layer.size
    registry = cluster.relay.host
    first, second = cluster.add_peers(2, ("--insecure-registry", registry, "--upload-slots", "3"))
    (seed,) = cluster.seeds
    scheduler = cluster.scheduler
    assert first.proxy_url and second.proxy_url
    origin_before = cluster.relay.downstream_bytes()
    for service in (seed, first, second):  # scrapes and probes: none of it is an upload
        for _ in range(3):
            assert httpx.get(f"{service.url}/metrics", timeout=5).status_code == 200
            assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
    assert metric(seed.url, "p2pdist_seed_upload_bytes_total") == 0
    assert metric(first.url, "p2pdist_peer_upload_bytes_total") == 0

    url = cluster.blob_url("audit/app", layer.digest)
    (a,) = cluster.pull_all([first], url, "first")
    (b,) = cluster.pull_all([second], url, "second")
    assert sha256_file(a) == sha256_file(b) == layer.digest

    # The origin sent the blob once, to the seed, and the seed says so.
    origin_sent = cluster.relay.downstream_bytes() - origin_before
    assert size <= origin_sent <= size + 64 * 1024
    assert metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"') == size
    # Each peer got the whole blob once, from the seed or the other peer, none from the origin.
    for peer in (first, second):
        got = {s: metric(peer.url, "p2pdist_peer_download_bytes_total", f'source="{s}"') for s in ("seed", "peer")}
        assert got["seed"] + got["peer"] == size, got
        assert metric(peer.url, "p2pdist_peer_download_bytes_total", 'source="origin"') == 0
        assert metric(peer.proxy_url or "", "p2pdist_peer_mirror_blob_bytes_total", 'source="p2p"') == size
        assert metric(peer.proxy_url or "", "p2pdist_peer_mirror_requests_total", 'kind="blob",status="200"') == 1
        assert metric(peer.url, "p2pdist_peer_task_duration_seconds_count", 'size_class="le_64MiB"') == 1
    first_from_seed = metric(first.url, "p2pdist_peer_download_bytes_total", 'source="seed"')
    assert first_from_seed == size  # nobody else held it
    second_from_first = metric(second.url, "p2pdist_peer_download_bytes_total", 'source="peer"')
    second_from_seed = metric(second.url, "p2pdist_peer_download_bytes_total", 'source="seed"')
    # Uploads are piece bodies only: exactly what the children received from each.
    wait_until(
        lambda: metric(seed.url, "p2pdist_seed_upload_bytes_total") == first_from_seed + second_from_seed,
        10,
        "the seed's upload count to match what the peers got from it",
    )
    wait_until(
        lambda: metric(first.url, "p2pdist_peer_upload_bytes_total") == second_from_first,
        10,
        "the first peer's upload count to match what the second got from it",
    )
    assert metric(second.url, "p2pdist_peer_upload_bytes_total") == 0

    # Gauges and build info.
    for service, role in ((seed, "seed"), (first, "peer"), (scheduler, "scheduler")):
        build = labels_of(service.url, "p2pdist_build_info")
        assert len(build) == 1 and f'role="{role}"' in build[0] and 'version="0.1.0"' in build[0], build
        assert metric(service.url, "process_resident_memory_bytes") > 0
    assert metric(first.url, "p2pdist_peer_upload_slots") == 3
    assert metric(first.url, "p2pdist_peer_cache_quota_bytes") == float("inf")
    assert metric(first.url, "p2pdist_peer_disk_free_bytes") > size
    assert metric(first.url, "p2pdist_peer_cache_bytes") == size
    # The scheduler's request statuses are HTTP codes.
    statuses = {
        dict(re.findall(r'(\w+)="([^"]*)"', lb))["status"]
        for lb in labels_of(scheduler.url, "p2pdist_scheduler_requests_total")
    }
    assert statuses and all(s.isdigit() for s in statuses), statuses
    assert metric(scheduler.url, "p2pdist_scheduler_requests_total", 'endpoint="/v1/tasks/register",status="200"') >= 2

"""Restarts with real processes: the scheduler killed and restarted mid-rollout rebuilds its
state from the peers' and seeds' announces, and a peer killed mid-pull reuses its verified
pieces and discards partial ones when it comes back on the same data dir."""

from __future__ import annotations

import re

from p2pdist.content.digest import digest_hex
from tests.support.cluster import ClusterFactory, MiB, restart, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin


def test_rollout_survives_scheduler_killed_and_restarted_on_the_same_port(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((48 * MiB,), 31, "restart/scheduler")
    layer = image.layers[0]
    cluster = cluster_factory(seed_args=("--origin-rate", "8MiB"))
    peers = cluster.add_peers(4, ("--download-rate", "16MiB"))
    url = cluster.blob_url("restart/scheduler", layer.digest)
    jobs = [
        (cluster.workdir / f"rs-{p.name}.blob", cluster.start_get(p, url, cluster.workdir / f"rs-{p.name}.blob"))
        for p in peers
    ]
    wait_until(
        lambda: sum(metric(p.url, "p2pdist_peer_download_bytes_total") for p in peers) >= 8 * MiB,
        60,
        "the rollout to be under way",
    )
    cluster.scheduler.kill()
    scheduler = restart(cluster, cluster.scheduler)

    for out, job in jobs:
        _, err = job.communicate(timeout=180)
        assert job.returncode == 0, err
        assert sha256_file(out) == layer.digest
    # The restarted scheduler learnt the task again from announces and re-registrations.
    assert metric(scheduler.url, "p2pdist_scheduler_schedule_decisions_total") > 0
    back_to_source = sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers)
    assert back_to_source <= 1, f"{back_to_source} peers went back to source"
    sent = cluster.relay.downstream_bytes()
    assert sent <= (1 + back_to_source) * layer.size * 1.05, f"origin sent {sent} bytes"


def test_restarted_peer_reuses_verified_pieces_and_discards_partial_ones(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((48 * MiB,), 32, "restart/peer")
    layer = image.layers[0]
    cluster = cluster_factory()
    (peer,) = cluster.add_peers(1, ("--download-rate", "6MiB"))
    url = cluster.blob_url("restart/peer", layer.digest)
    job = cluster.start_get(peer, url, cluster.workdir / "first.blob")
    wait_until(
        lambda: metric(peer.url, "p2pdist_peer_download_bytes_total") >= 20 * MiB, 60, "the first pull to be under way"
    )
    peer.kill()
    job.communicate(timeout=30)
    assert job.returncode != 0

    task_dir = cluster.workdir / f"{peer.name}-data" / "tasks" / digest_hex(layer.digest)
    pieces = sorted(p for p in task_dir.iterdir() if re.fullmatch(r"\d{6}", p.name))
    assert len(pieces) >= 3, "the kill should land after a few pieces"
    # A piece cut short on disk and a half-written temporary file: neither may survive.
    damaged = pieces[1]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (task_dir / ".000011.dead.tmp").write_bytes(b"partial")

    peer = restart(cluster, peer)
    reused = int(re.findall(r"reusing (\d+) verified piece", peer.log_path.read_text())[-1])
    assert reused == len(pieces) - 1
    assert not list(task_dir.glob(".*.tmp"))
    assert not damaged.exists()

    (out,) = cluster.pull_all([peer], url, "second")

    assert sha256_file(out) == layer.digest
    fetched = metric(peer.url, "p2pdist_peer_download_bytes_total")
    piece_size = pieces[0].stat().st_size
    assert fetched <= layer.size - reused * piece_size, f"fetched {fetched} bytes after restart"
    assert damaged.exists()  # refetched

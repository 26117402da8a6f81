"""End-to-end tests of the P2P engine: real scheduler, seed and peer processes, the real
Distribution registry as origin behind a counting relay, and `p2pdist get` as the client."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import ClusterFactory, MiB, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin


def test_one_blob_through_seed_and_four_peers_reaches_origin_once(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((48 * MiB,), 11, "engine/once")
    layer = image.layers[0]
    # A seed whose upload is capped, as in a real cluster: uncapped on loopback it can serve
    # all four peers itself, and then nobody needs to serve anyone.
    cluster = cluster_factory(seed_args=("--upload-rate", "16MiB"))
    peers = cluster.add_peers(4)
    before = cluster.relay.downstream_bytes()

    outs = cluster.pull_all(peers, cluster.blob_url("engine/once", layer.digest), "once")

    assert [sha256_file(out) for out in outs] == [layer.digest] * 4
    sent = cluster.relay.downstream_bytes() - before
    assert layer.size <= sent <= 1.05 * layer.size, f"origin sent {sent} bytes for a {layer.size}-byte blob"
    # Every byte came over P2P, from the seed or from other peers.
    over_p2p = sum(
        metric(p.url, "p2pdist_peer_download_bytes_total", f'source="{source}"')
        for p in peers
        for source in ("seed", "peer")
    )
    assert over_p2p >= 4 * layer.size
    # Peers served each other, not only the seed.
    assert sum(metric(p.url, "p2pdist_peer_upload_bytes_total") for p in peers) > 0


def test_pull_survives_a_parent_killed_mid_transfer(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((32 * MiB,), 12, "engine/killed")
    layer = image.layers[0]
    cluster = cluster_factory(seed_args=("--upload-rate", "4MiB"))
    first, doomed = cluster.add_peers(2, ("--upload-rate", "4MiB"))
    url = cluster.blob_url("engine/killed", layer.digest)
    cluster.pull_all([first, doomed], url, "warm")
    (late,) = cluster.add_peers(1)
    out = cluster.workdir / "late.blob"
    job = cluster.start_get(late, url, out)
    wait_until(
        lambda: metric(doomed.url, "p2pdist_peer_upload_bytes_total") > 0,
        30,
        "the late peer to fetch from the doomed parent",
    )
    doomed.kill()

    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert sha256_file(out) == layer.digest


def test_corrupt_parent_is_avoided_and_pull_comes_out_right(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((40 * MiB,), 13, "engine/corrupt")
    layer = image.layers[0]
    cluster = cluster_factory()
    liar, honest = cluster.add_peers(2)
    url = cluster.blob_url("engine/corrupt", layer.digest)
    cluster.pull_all([liar, honest], url, "warm")
    # The liar's disk now holds wrong bytes under every piece name; it serves them as they are.
    pieces = sorted((cluster.workdir / f"{liar.name}-data" / "tasks").glob("*/0*"))
    assert pieces
    for piece in pieces:
        piece.write_bytes(os.urandom(piece.stat().st_size))
    for seed in cluster.seeds:
        seed.stop()  # leave the liar and the honest peer as the only parents
    (victim,) = cluster.add_peers(1)

    (out,) = cluster.pull_all([victim], url, "victim")

    assert sha256_file(out) == layer.digest
    assert metric(victim.url, "p2pdist_peer_pieces_total", 'result="corrupt"') >= 1
    assert metric(cluster.scheduler.url, "p2pdist_scheduler_bad_parent_reports_total") >= 1
    # Nothing the liar sent was kept: every piece the victim stored verifies.
    assert metric(victim.url, "p2pdist_peer_tasks_total", 'result="done"') == 1


@pytest.mark.parametrize("news", ["true", "false"], ids=["piece-news", "sync-clock"])
def test_scheduler_stopped_mid_pull_pulls_still_finish(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, news: str
) -> None:
    image = push_to_origin((48 * MiB,), 14, "engine/nosched")
    layer = image.layers[0]
    cluster = cluster_factory(seed_args=("--upload-rate", "8MiB", "--origin-rate", "8MiB"))
    peers = cluster.add_peers(3, ("--peer-news", news))
    url = cluster.blob_url("engine/nosched", layer.digest)
    jobs = [
        (cluster.workdir / f"ns-{p.name}", cluster.start_get(p, url, cluster.workdir / f"ns-{p.name}")) for p in peers
    ]
    wait_until(lambda: any(metric(p.url, "p2pdist_peer_download_bytes_total") > 0 for p in peers), 30, "first piece")
    cluster.scheduler.kill()

    for out, job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert sha256_file(out) == layer.digest
    back_to_source = sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers)
    if news == "false":
        # Parents' pieces come only in the scheduler's replies: without it the pulls go to the origin.
        assert back_to_source >= 1
    # With piece news a peer that has parents hears their pieces from them and may finish there.
    print(f"peer news {news}: {back_to_source:.0f} of 3 pulls went back to source")


def test_disk_full_fails_cleanly_and_leaves_no_valid_looking_piece(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((24 * MiB,), 15, "engine/full")
    layer = image.layers[0]
    cluster = cluster_factory()
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        (peer,) = cluster.add_peers(1, ("--data-dir", str(small)))
        out = cluster.workdir / "full.blob"
        job = cluster.start_get(peer, cluster.blob_url("engine/full", layer.digest), out)
        _, err = job.communicate(timeout=120)
        # The client still gets the right bytes (straight from the origin) or a clear error.
        if job.returncode == 0:
            assert sha256_file(out) == layer.digest
        else:
            assert "disk full" in err or "failed" in err
            assert not out.exists()
        assert "disk full" in peer.log_path.read_text()
        # Nothing stays that could be served as a piece.
        leftovers = [
            p
            for p in small.rglob("*")
            if p.is_file()
            and p.parent.name != small.name
            and p.name not in ("meta.json",)
            and not p.name.startswith(".")
        ]
        assert leftovers == []
        assert httpx.get(f"{peer.url}/healthz", timeout=5).status_code == 200
    finally:
        for p in cluster.peers:
            p.stop()
        subprocess.run(["umount", str(small)], check=False)

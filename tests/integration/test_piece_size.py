"""The piece size travels with the task, on real processes: the scheduler's min_piece_bytes
reaches the seed it wakes and every peer's store (and is kept in it) for peers whose upload is
capped, peers with no cap get the old 4 MiB floor, and a scheduler that restarts with another
min_piece_bytes keeps serving a blob its seed cut the earlier way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.registry import Origin
from p2pdist.content.digest import digest_hex
from p2pdist.content.pieces import PieceLayout
from tests.support.cluster import Cluster, restart, sha256_file
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

MiB = 1 << 20
BLOB = 6 * MiB + 12345  # 1 MiB pieces: 7; 2 MiB: 4; 4 MiB (the old rule): 2
# Peers capped at this upload ask for pieces of a quarter second's upload: 1 MiB, so the
# scheduler's min_piece_bytes is what decides.
SLOW_UPLOAD = ("--upload-rate", "4MiB")


def held_layout(data_dir: Path, digest: str) -> tuple[int, list[int]]:
    """The piece size a node's store recorded for a blob, and the sizes of its piece files."""
    root = data_dir / "tasks" / digest_hex(digest)
    meta = json.loads((root / "meta.json").read_text())
    pieces = sorted(p for p in root.iterdir() if p.name.isdigit())
    return meta["piece_size"], [p.stat().st_size for p in pieces]


@pytest.mark.parametrize("min_piece", [1 * MiB, 4 * MiB])
def test_the_schedulers_piece_size_reaches_the_seed_and_every_peers_store(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path, min_piece: int
) -> None:
    image = push_to_origin((BLOB,), 40 + min_piece // MiB, "pieces/size")
    layer = image.layers[0]
    cluster = Cluster(tmp_path, origin.host, scheduler_args=("--min-piece-bytes", str(min_piece)))
    try:
        peers = cluster.add_peers(2, SLOW_UPLOAD)
        outs = cluster.pull_all(peers, cluster.blob_url("pieces/size", layer.digest), "size")
        assert all(sha256_file(out) == layer.digest for out in outs)
        expected = PieceLayout.for_blob(layer.size, min_piece)
        assert expected.piece_size == min_piece
        lengths = [expected.length(n) for n in range(expected.count)]
        for node in (*cluster.seeds, *peers):
            assert held_layout(tmp_path / f"{node.name}-data", layer.digest) == (min_piece, lengths), node.name
        assert sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers) == 0
    finally:
        cluster.stop()


def test_a_scheduler_restarted_with_another_min_piece_bytes_keeps_the_swarm_of_a_blob_cut_before(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    """An operator ends a rolling upgrade (min_piece_bytes 4MiB removed, the scheduler
    restarted): a blob the swarm already holds in 4 MiB pieces is still served by it, in those
    pieces, rather than fetched again from the origin in 2 MiB ones."""
    image = push_to_origin((BLOB,), 50, "pieces/upgrade")
    layer = image.layers[0]
    url_path = ("pieces/upgrade", layer.digest)
    cluster = Cluster(tmp_path, origin.host, scheduler_args=("--min-piece-bytes", "4MiB"))
    try:
        first, second = cluster.add_peers(2, SLOW_UPLOAD)
        (out,) = cluster.pull_all([first], cluster.blob_url(*url_path), "before")
        assert sha256_file(out) == layer.digest
        from_origin = cluster.relay.downstream_bytes()

        cluster.scheduler.kill()
        restart(cluster, cluster.scheduler, ("--min-piece-bytes", "2MiB"))  # the last flag wins
        (out,) = cluster.pull_all([second], cluster.blob_url(*url_path), "after")

        assert sha256_file(out) == layer.digest
        assert held_layout(tmp_path / f"{second.name}-data", layer.digest)[0] == 4 * MiB
        assert metric(second.url, "p2pdist_peer_back_to_source_total") == 0
        # Nothing of the blob crossed the origin again (a manifest-less blob pull: a few heads).
        assert cluster.relay.downstream_bytes() - from_origin < MiB
        # While a blob nobody holds yet is cut by the restarted scheduler's rule.
        fresh = push_to_origin((BLOB,), 51, "pieces/upgrade").layers[0]
        (out,) = cluster.pull_all([second], cluster.blob_url("pieces/upgrade", fresh.digest), "fresh")
        assert sha256_file(out) == fresh.digest
        assert held_layout(tmp_path / f"{second.name}-data", fresh.digest)[0] == 2 * MiB
    finally:
        cluster.stop()


def test_a_blob_first_asked_for_by_a_peer_with_no_upload_cap_gets_the_old_floor(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    """On a fast network a small piece saves no time and costs CPU at both ends: a blob first
    asked for by an uncapped peer is cut into 4 MiB pieces, one first asked for by a capped
    peer into the scheduler's 1 MiB; a later peer of either kind takes the blob as it is cut."""
    first = push_to_origin((BLOB,), 60, "pieces/fast").layers[0]
    second = push_to_origin((BLOB,), 61, "pieces/fast").layers[0]
    cluster = Cluster(tmp_path, origin.host, scheduler_args=("--min-piece-bytes", "1MiB"))
    try:
        (fast,) = cluster.add_peers(1)
        (slow,) = cluster.add_peers(1, SLOW_UPLOAD)
        cluster.wait_announced()  # the floor follows an announced cap
        for peer, layer, by in ((fast, first, "fast"), (slow, second, "slow")):
            (out,) = cluster.pull_all([peer], cluster.blob_url("pieces/fast", layer.digest), by)
            assert sha256_file(out) == layer.digest
        for peer, layer, by in ((slow, first, "slow-late"), (fast, second, "fast-late")):
            (out,) = cluster.pull_all([peer], cluster.blob_url("pieces/fast", layer.digest), by)
            assert sha256_file(out) == layer.digest
        for node in (*cluster.seeds, fast, slow):
            data = tmp_path / f"{node.name}-data"
            assert held_layout(data, first.digest)[0] == 4 * MiB, node.name
            assert held_layout(data, second.digest)[0] == 1 * MiB, node.name
        assert metric(fast.url, "p2pdist_peer_back_to_source_total") == 0
        assert metric(slow.url, "p2pdist_peer_back_to_source_total") == 0
    finally:
        cluster.stop()

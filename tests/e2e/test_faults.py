"""Faults with real processes and the real Distribution registry as origin: origin 503s,
resets and stalls (through the fault-injecting relay), seeds killed mid-blob, a parent
stalled with SIGSTOP, and untrusted parents that lie about their pieces or their bytes.
Every pulled blob's sha256 is checked."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.faultrelay import FaultPlan, FaultRelayProcess
from lab.registry import Origin
from p2pdist.content.digest import digest_hex
from p2pdist.content.pieces import DEFAULT_MIN_PIECE_SIZE, piece_size_for
from tests.support.cluster import Cluster, ClusterFactory, MiB, sha256_file, wait_until
from tests.support.fakepeer import FakePeer
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

# The piece size of every blob below: the rule's floor, which blobs this small get (2 MiB since
# the scheduler's min_piece_bytes default; a resume checked against 4 MiB failed whenever it
# landed on an odd 2 MiB boundary).
PIECE = piece_size_for(32 * MiB)
assert PIECE == piece_size_for(8 * MiB) == DEFAULT_MIN_PIECE_SIZE


def resumed_at(range_header: str, *, at_most: int) -> int:
    """The offset a retry resumed from: a piece boundary past the start, not past `at_most`."""
    m = re.fullmatch(r"bytes=(\d+)-", range_header)
    assert m, f"retry did not ask for a range: {range_header!r}"
    start = int(m.group(1))
    assert start % PIECE == 0 and 0 < start <= at_most, f"resumed at {start}, cut at {at_most}"
    return start


@pytest.fixture
def fault_relay(origin: Origin, tmp_path: Path) -> Iterator[FaultRelayProcess]:
    with FaultRelayProcess(tmp_path, origin.host) as relay:
        yield relay


def blob_url(relay: FaultRelayProcess, repo: str, digest: str) -> str:
    return f"{relay.url}/v2/{repo}/blobs/{digest}"


def seed_origin_bytes(seed_url: str) -> float:
    return metric(seed_url, "p2pdist_seed_download_bytes_total", 'source="origin"')


# -- the origin failing -----------------------------------------------------------------------


def test_origin_503_reset_and_stall_are_retried_and_resumed_from_the_last_verified_piece(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, fault_relay: FaultRelayProcess
) -> None:
    image = push_to_origin((24 * MiB,), 42, "faults/origin")
    layer = image.layers[0]
    # One 503, then a body cut mid-piece 2, then a resumed body that goes silent in piece 4.
    fault_relay.set_plan(
        FaultPlan(
            fail_blob_gets=1,
            resets=1,
            reset_after_bytes=2 * PIECE + 12345,
            stalls=1,
            stall_after_bytes=2 * PIECE + 777,
            stall_s=60,
        )
    )
    cluster = cluster_factory(seed_args=("--origin-timeout-s", "2"))
    peers = cluster.add_peers(2)

    outs = cluster.pull_all(peers, blob_url(fault_relay, "faults/origin", layer.digest), "origin")

    assert [sha256_file(out) for out in outs] == [layer.digest] * 2
    stats = fault_relay.stats()
    assert (stats["failed"], stats["resets"], stats["stalls"]) == (1, 1, 1)
    # Each retry asked for the rest of the blob from the first piece not yet verified. A reset
    # can drop bytes the seed had not read yet, so the resume may be a piece earlier than the
    # cut; it is never past it and never from scratch.
    assert stats["ranges"][:2] == ["", ""]
    cut = 2 * PIECE + 12345
    first = resumed_at(stats["ranges"][2], at_most=cut)
    second = resumed_at(stats["ranges"][3], at_most=first + 2 * PIECE + 777)
    assert second > first
    # The seed fetched the blob about once: only what came after the last verified piece twice.
    assert stats["blob_body_bytes"] <= layer.size + (cut - first) + (first + 2 * PIECE + 777 - second)
    assert sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers) == 0


def test_back_to_source_peer_resumes_after_the_origin_cuts_the_body(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, fault_relay: FaultRelayProcess
) -> None:
    image = push_to_origin((20 * MiB,), 43, "faults/b2s")
    layer = image.layers[0]
    fault_relay.set_plan(FaultPlan(fail_blob_gets=1, resets=1, reset_after_bytes=3 * PIECE + 99))
    cluster = cluster_factory(seeds=0)  # no seed: the peer goes to the origin itself
    (peer,) = cluster.add_peers(1)

    (out,) = cluster.pull_all([peer], blob_url(fault_relay, "faults/b2s", layer.digest), "b2s")

    assert sha256_file(out) == layer.digest
    assert metric(peer.url, "p2pdist_peer_back_to_source_total") == 1
    stats = fault_relay.stats()
    assert stats["ranges"][:2] == ["", ""]
    cut = 3 * PIECE + 99
    resumed = resumed_at(stats["ranges"][2], at_most=cut)
    assert stats["blob_body_bytes"] <= layer.size + (cut - resumed)


def test_origin_that_cannot_serve_gives_the_client_a_clear_error_and_stores_nothing(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, fault_relay: FaultRelayProcess
) -> None:
    image = push_to_origin((8 * MiB,), 44, "faults/down")
    layer = image.layers[0]
    fault_relay.set_plan(FaultPlan(fail_blob_gets=1_000_000))
    cluster = cluster_factory()
    (peer,) = cluster.add_peers(1)
    out = cluster.workdir / "down.blob"

    job = cluster.start_get(peer, blob_url(fault_relay, "faults/down", layer.digest), out)
    _, err = job.communicate(timeout=180)

    assert job.returncode != 0
    assert "503" in err, err
    assert not out.exists()
    # Seed and peer both retried with backoff before giving up.
    assert fault_relay.stats()["failed"] >= 4
    for service in (peer, *cluster.seeds):
        task_dir = cluster.workdir / f"{service.name}-data" / "tasks" / digest_hex(layer.digest)
        assert not task_dir.exists() or not [p for p in task_dir.iterdir() if p.name[0].isdigit()]


# -- seeds dying --------------------------------------------------------------------------


def _wait_for_busy_seed(cluster: Cluster, at_least: int) -> int:
    """Index of the seed that has fetched at least `at_least` bytes from the origin."""
    found: list[int] = []

    def busy() -> bool:
        for i, seed in enumerate(cluster.seeds):
            if seed.poll() is None and seed_origin_bytes(seed.url) >= at_least:
                found.append(i)
                return True
        return False

    wait_until(busy, 60, "a seed to be part-way through the blob")
    return found[0]


def test_seed_killed_mid_blob_a_second_seed_takes_over(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((32 * MiB,), 45, "faults/seed2")
    layer = image.layers[0]
    cluster = cluster_factory(seeds=2, seed_args=("--origin-rate", "6MiB"))
    peers = cluster.add_peers(2, ("--peer-news", "true"))
    url = cluster.blob_url("faults/seed2", layer.digest)
    jobs = [
        (cluster.workdir / f"s2-{p.name}", cluster.start_get(p, url, cluster.workdir / f"s2-{p.name}")) for p in peers
    ]
    doomed = _wait_for_busy_seed(cluster, 8 * MiB)
    cluster.seeds[doomed].kill()

    for out, job in jobs:
        _, err = job.communicate(timeout=180)
        assert job.returncode == 0, err
        assert sha256_file(out) == layer.digest
    survivor = cluster.seeds[1 - doomed]
    assert seed_origin_bytes(survivor.url) >= layer.size * 0.5  # the rest, past what peers held (test_ha.py)
    # With piece news the children heard of it themselves: their news connection to the seed failed.
    assert any(
        "parent seed-" in line and " lost: " in line for p in peers for line in p.log_path.read_text().splitlines()
    )
    assert sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers) == 0
    assert metric(cluster.scheduler.url, "p2pdist_scheduler_seeds_woken_total") >= 2


def test_seed_killed_mid_blob_with_no_other_seed_pull_goes_back_to_source(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((24 * MiB,), 46, "faults/seed1")
    layer = image.layers[0]
    cluster = cluster_factory(seed_args=("--origin-rate", "4MiB"))
    (peer,) = cluster.add_peers(1)
    out = cluster.workdir / "s1.blob"
    job = cluster.start_get(peer, cluster.blob_url("faults/seed1", layer.digest), out)
    _wait_for_busy_seed(cluster, 6 * MiB)
    cluster.seeds[0].kill()

    _, err = job.communicate(timeout=180)

    assert job.returncode == 0, err
    assert sha256_file(out) == layer.digest
    assert metric(peer.url, "p2pdist_peer_back_to_source_total") == 1
    assert metric(peer.url, "p2pdist_peer_download_bytes_total", 'source="seed"') > 0  # kept what the seed gave


# -- parents misbehaving --------------------------------------------------------------------


def test_stalled_parent_hits_the_piece_timeout_and_is_avoided(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((32 * MiB,), 47, "faults/stall")
    layer = image.layers[0]
    cluster = cluster_factory()
    frozen, honest = cluster.add_peers(2)
    url = cluster.blob_url("faults/stall", layer.digest)
    cluster.pull_all([frozen, honest], url, "warm")
    for seed in cluster.seeds:
        seed.stop()  # the frozen peer and the honest one are the only parents left
    (victim,) = cluster.add_peers(1, ("--piece-timeout-s", "1", "--piece-timeout-per-mib-s", "0.25"))
    os.killpg(frozen.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        (out,) = cluster.pull_all([victim], url, "victim")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)

    assert sha256_file(out) == layer.digest
    assert metric(victim.url, "p2pdist_peer_pieces_total", 'result="failed"') >= 1
    assert metric(victim.url, "p2pdist_peer_back_to_source_total") == 0
    assert "timed out" in victim.log_path.read_text()


def test_parents_lying_about_pieces_or_bytes_are_avoided_and_cannot_poison_digests(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((32 * MiB,), 48, "faults/liars")
    layer = image.layers[0]
    cluster = cluster_factory(seed_args=("--upload-rate", "16MiB"))
    # Before anyone asks for the blob, two untrusted peers claim all of it, with made-up
    # piece digests; one answers 404 for every piece, the other random bytes.
    liars = [
        FakePeer(cluster.scheduler.url, layer.digest, layer.size, mode=mode, host_id=f"liar-{mode}")
        for mode in ("absent", "garbage")
    ]
    try:
        (victim,) = cluster.add_peers(1)
        (out,) = cluster.pull_all([victim], cluster.blob_url("faults/liars", layer.digest), "victim")
    finally:
        for liar in liars:
            liar.stop()

    assert sha256_file(out) == layer.digest
    assert all(liar.requests > 0 for liar in liars), "the liars were never tried"
    assert metric(victim.url, "p2pdist_peer_pieces_total", 'result="corrupt"') >= 1
    assert metric(victim.url, "p2pdist_peer_pieces_total", 'result="absent"') >= 1
    assert "liar-absent answered 404" in victim.log_path.read_text()  # and then avoided
    assert metric(cluster.scheduler.url, "p2pdist_scheduler_bad_parent_reports_total") >= 1
    # The seed was still woken (the liars' claims did not stand in for it) and its digests,
    # not the liars', decided what was kept.
    assert metric(victim.url, "p2pdist_peer_back_to_source_total") == 0
    assert seed_origin_bytes(cluster.seeds[0].url) >= layer.size

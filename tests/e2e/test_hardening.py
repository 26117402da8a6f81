"""Issue 12's findings replayed with real processes and the real Distribution registry: a
registry that serves corrupt bytes for a blob, then is repaired; what the client is told when
a pull fails; a cached blob requested while the registry is down."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from lab.registry import Origin
from p2pdist.content.digest import digest_hex
from tests.support.cluster import ClusterFactory, MiB, restart, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin


def stored_blob(origin: Origin, digest: str) -> Path:
    """The file the registry's filesystem driver serves for `digest`."""
    hexd = digest_hex(digest)
    return origin.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_origin_fails_pulls_with_the_reason_and_the_repaired_blob_then_pulls_at_once(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, origin: Origin
) -> None:
    image = push_to_origin((24 * MiB + 3611,), 1201, "hardening/corrupt")
    layer = image.layers[0]
    data = stored_blob(origin, layer.digest)
    flip_byte(data, 13 * MiB + 5)  # bit rot inside piece 3: same size, wrong bytes
    try:
        cluster = cluster_factory()
        first = cluster.add_peers(3)
        # A slow peer that will hold a few pieces checked against the corrupt digests when it
        # dies: the scheduler must not keep offering it, nor keep the digests, to later pulls.
        (slow,) = cluster.add_peers(1, ["--download-rate", "4MiB"])
        url = cluster.blob_url("hardening/corrupt", layer.digest)
        slow_job = cluster.start_get(slow, url, cluster.workdir / "slow.blob")
        jobs = [(peer, cluster.start_get(peer, url, cluster.workdir / f"bad-{peer.name}.blob")) for peer in first]
        for peer, job in jobs:
            _, err = job.communicate(timeout=120)
            assert job.returncode == 1, err
            # Finding 2: the client is told why, not a byte count.
            assert "digest mismatch" in err and "corrupt" in err, err
            assert err.count("\n") == 1, err
            assert not (cluster.workdir / f"bad-{peer.name}.blob").exists()
            status = json.loads(
                urllib.request.urlopen(f"{peer.proxy_url}/v1/downloads/{layer.digest}", timeout=10).read()
            )
            assert status["state"] == "failed" and "digest mismatch" in status["reason"]
        wait_until(
            lambda: metric(slow.url, "p2pdist_peer_pieces_total", 'result="verified"') >= 1,
            30,
            "a piece at the slow peer",
        )
        slow.kill()  # no leave: the scheduler still lists it with its pieces until its TTL
        slow_job.communicate(timeout=60)
    finally:
        flip_byte(data, 13 * MiB + 5)  # the registry's data repaired
    # Finding 1: with the registry repaired and nothing restarted, a new peer's pull is sent to
    # the seed again (not to the origin, nor to holders of bytes checked against stale
    # digests) and is quick.
    fresh = cluster.add_peers(1)[0]
    started = time.monotonic()
    (out,) = cluster.pull_all([fresh], url, "repaired", timeout=60)
    took = time.monotonic() - started
    assert sha256_file(out) == layer.digest
    assert took < 15, f"the repaired blob took {took:.1f}s (the peers' 30 s stall means stale digests)"
    assert "going back to source" not in fresh.log_path.read_text()
    # The first peers, asked again, pull it right too.
    outs = cluster.pull_all(first, url, "again", timeout=60)
    assert [sha256_file(o) for o in outs] == [layer.digest] * 3


def test_a_cached_blob_with_the_registry_unreachable_is_served_on_the_earlier_yes_or_refused_at_once(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((6 * MiB,), 1202, "hardening/outage")
    layer = image.layers[0]
    cluster = cluster_factory()
    (peer,) = cluster.add_peers(1)
    url = cluster.blob_url("hardening/outage", layer.digest)
    (out,) = cluster.pull_all([peer], url, "cached")
    assert sha256_file(out) == layer.digest
    # As reported: the daemon restarted with its cache intact, and the registry, as the peer
    # reaches it, gone. The registry's yes to these credentials was kept on disk (issue 13's
    # offline_grace_s, 24 h by default), so the cached blob is still handed out, at once.
    peer.stop()
    cluster.relay.stop()
    peer = restart(cluster, peer)
    started = time.monotonic()
    job = cluster.start_get(peer, url, cluster.workdir / "outage-yes.blob")
    _, err = job.communicate(timeout=60)
    took = time.monotonic() - started
    assert job.returncode == 0, err
    assert took < 10, f"serving on the earlier yes took {took:.1f}s"
    assert sha256_file(cluster.workdir / "outage-yes.blob") == layer.digest
    # An operator who wants no earlier yes to stand in (offline_grace_s 0) gets the old
    # fail-closed answer: one line, at once, and no file.
    peer.stop()
    strict = restart(cluster, peer, extra_args=["--offline-grace-s", "0"])
    started = time.monotonic()
    job = cluster.start_get(strict, url, cluster.workdir / "outage.blob")
    _, err = job.communicate(timeout=60)
    took = time.monotonic() - started
    assert job.returncode == 1
    assert took < 10, f"the refusal took {took:.1f}s"
    assert "unreachable" in err and "offline_grace_s is 0" in err, err
    assert err.count("\n") == 1, err
    assert "access check failed" in strict.log_path.read_text()
    assert not (cluster.workdir / "outage.blob").exists()


def test_a_lost_wake_up_of_the_only_seed_is_retried_and_the_pull_does_not_wait_out_the_peer(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((12 * MiB,), 1203, "hardening/wake")
    layer = image.layers[0]
    cluster = cluster_factory()
    (peer,) = cluster.add_peers(1)
    (seed,) = cluster.seeds
    url = cluster.blob_url("hardening/wake", layer.digest)
    os.killpg(seed.pid, signal.SIGSTOP)  # its port accepts (the kernel does); the wake-up goes unanswered
    try:
        started = time.monotonic()
        job = cluster.start_get(peer, url, cluster.workdir / "wake.blob")
        wait_until(lambda: "could not wake seed" in cluster.scheduler.log_path.read_text(), 30, "a lost wake-up")
    finally:
        os.killpg(seed.pid, signal.SIGCONT)
    _, err = job.communicate(timeout=90)
    took = time.monotonic() - started
    assert job.returncode == 0, err
    assert sha256_file(cluster.workdir / "wake.blob") == layer.digest
    # Before the fix the seed was never asked again and the peer gave up after 60 s.
    assert took < 30, f"the pull took {took:.1f}s"
    log = cluster.scheduler.log_path.read_text()
    assert "could not wake seed" in log and "no answer in" in log  # the reason, never empty
    assert "going back to source" not in peer.log_path.read_text()

"""Rolling upgrades cut no client: a peer that gets SIGTERM while a client streams a blob
through it refuses new requests (healthz 503, so the runtime falls back to the registry),
tells the scheduler it is leaving, finishes the stream, and only then exits. SIGHUP is
logged and ignored."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.support.cluster import ClusterFactory, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

MiB = 1 << 20


def status_of(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_sigterm_mid_stream_lets_the_client_finish_the_whole_blob(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    cluster = cluster_factory()
    image = push_to_origin((80 * MiB,), 163, "drain/app")
    layer = image.layers[0]
    # 8 MiB/s: the 80 MiB download takes about 10 s, so the stream is in flight when SIGTERM
    # comes. The stream goes out in order while pieces may arrive out of order, so its first
    # bytes can come several pieces at once (24 of 40 MiB were seen at once with a 40 MiB blob).
    (peer,) = cluster.add_peers(1, ("--download-rate", "8MiB", "--insecure-registry", cluster.relay.host))
    assert peer.proxy_url is not None

    os.kill(peer.pid, signal.SIGHUP)
    wait_until(lambda: "SIGHUP ignored" in peer.log_path.read_text(), 10, "the SIGHUP log line")
    assert peer.poll() is None and status_of(f"{peer.proxy_url}/healthz") == 200

    out = tmp_path / "layer.blob"
    get = cluster.start_get(peer, cluster.blob_url("drain/app", layer.digest), out)
    try:
        sent = lambda: metric(peer.proxy_url or "", "p2pdist_peer_mirror_blob_bytes_total")  # noqa: E731
        wait_until(lambda: sent() > 0, 60, "the first bytes of the stream")
        assert sent() < layer.size, "the stream must still be in flight"
        signalled = time.monotonic()
        os.kill(peer.pid, signal.SIGTERM)

        # Draining: new requests are refused, on the proxy and the piece port alike.
        wait_until(lambda: status_of(f"{peer.proxy_url}/healthz") == 503, 10, "healthz to turn 503")
        assert status_of(f"{peer.proxy_url}/v2/") == 503
        assert status_of(f"{peer.url}/healthz") == 503
        assert peer.poll() is None, "the peer exited with a stream in flight"
        # The scheduler was told: it offers this host to nobody.
        wait_until(
            lambda: metric(cluster.scheduler.url, "p2pdist_scheduler_hosts", 'kind="peer"') == 0,
            10,
            "the scheduler to forget the draining peer",
        )

        _, err = get.communicate(timeout=90)
        assert get.returncode == 0, err
        assert sha256_file(out) == layer.digest
        assert peer.process.wait(timeout=40) == 0
        took = time.monotonic() - signalled
    finally:
        if get.poll() is None:
            get.kill()
    log = peer.log_path.read_text()
    assert "peer draining: 1 request(s) in flight, up to 30 s" in log, log[-2000:]
    assert "peer drained in" in log
    assert took < 30, f"the drain took {took:.1f} s"

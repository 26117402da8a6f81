"""The first pull from the README, replayed with real containerd against a plain-HTTP
registry: a peer started without --insecure-registry used to answer every request 502 with
no log line while containerd quietly fell back to the registry. Now the peer logs the
failure with its fix, `mirror-config --check` says what failed and why, and with the flag
the same pull goes through P2P."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab.runtimes import Containerd
from tests.support.cluster import Cluster, ClusterFactory, p2pdist_bin
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

MiB = 1 << 20


def mirror_config(peer_proxy: str, registry: str, hosts_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [p2pdist_bin(), "mirror-config", "containerd", "--proxy", peer_proxy, "--registry", registry,
         "--hosts-dir", str(hosts_dir), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_plain_http_registry_without_the_flag_is_logged_with_the_fix_and_the_check_says_why(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    cluster: Cluster = cluster_factory()
    image = push_to_origin((6 * MiB, 2 * MiB), 161, "firstpull/app")
    registry = cluster.relay.host  # plain HTTP, as a registry on a private network often is
    ref = f"{registry}/firstpull/app:latest"
    (careless,) = cluster.add_peers(1)  # as the walk-through: no --insecure-registry
    assert careless.proxy_url is not None
    hosts_dir = tmp_path / "certs.d"
    written = mirror_config(careless.proxy_url, f"http://{registry}", hosts_dir, "--write")
    assert written.returncode == 0, written.stderr
    assert f"start the peer with --insecure-registry {registry}" in written.stderr

    with Containerd(tmp_path, "containerd-a") as containerd:
        containerd.pull(ref, hosts_dir, timeout=180)  # containerd falls back to the registry
        assert {layer.digest for layer in image.layers} <= containerd.content_digests()

    log = careless.log_path.read_text()
    fix = f"TLS to a plain-HTTP registry? start the peer with --insecure-registry {registry}"
    warnings = [line for line in log.splitlines() if " WARNING " in line and fix in line]
    assert warnings, log[-3000:]
    assert f"https://{registry} unreachable: the TLS handshake failed" in warnings[0]
    # Rate-limited: containerd's retries of every blob and manifest are not one line each.
    assert len(warnings) <= 2, warnings
    # Counted by what was asked: the 502s are manifests and blobs, not "other".
    assert metric(careless.proxy_url, "p2pdist_peer_mirror_requests_total", 'status="502"') >= 1
    assert metric(careless.proxy_url, "p2pdist_peer_mirror_requests_total", 'kind="other"') == 0

    checked = mirror_config(careless.proxy_url, f"http://{registry}", hosts_dir, "--check", "--image", "firstpull/app")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert (
        f"FAILED: {registry}: the peer did not reach the registry: 502 registry https://{registry} unreachable: "
        "the TLS handshake failed" in checked.stdout
    ), checked.stdout
    assert fix in checked.stdout

    # The fix the warning gave: the same peer flags plus --insecure-registry.
    (fixed,) = cluster.add_peers(1, ("--insecure-registry", registry))
    assert fixed.proxy_url is not None
    fixed_hosts = tmp_path / "certs-fixed.d"
    checked = mirror_config(
        fixed.proxy_url, f"http://{registry}", fixed_hosts, "--write", "--check", "--image", "firstpull/app"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        f"ok: {registry}: the peer reached the registry: /v2/ → 200, /v2/firstpull/app/manifests/latest → 200"
        in checked.stdout
    ), checked.stdout
    with Containerd(tmp_path, "containerd-b") as containerd:
        containerd.pull(ref, fixed_hosts, timeout=180)
        assert {layer.digest for layer in image.layers} <= containerd.content_digests()
    assert metric(fixed.proxy_url, "p2pdist_peer_mirror_blob_bytes_total") >= image.total_layer_bytes
    assert "unreachable" not in fixed.log_path.read_text()

"""Edge sites for real: sites in network namespaces, each behind a tbf-shaped veth uplink to
a core namespace holding the real Distribution registry, the scheduler and a seed. Every
site's hosts pull a two-layer image at once through the central, site-aware scheduler; the
bytes into each site are read from the uplink's kernel counters, and every blob's sha256 is
checked."""

from __future__ import annotations

import time
from pathlib import Path

from lab.image import make_oci_layout, push_image
from lab.netns import SiteLab
from lab.registry import Origin
from tests.support.cluster import MiB, sha256_file

SITES = 3
HOSTS_PER_SITE = 3
UPLINK_BPS = 16 * MiB
LAYERS = [16 * MiB, 12 * MiB]  # each over 4 MiB: blobs that small skip P2P
PULL_TIMEOUT_S = 120.0


def test_each_layer_crosses_each_sites_uplink_about_once(tmp_path: Path) -> None:
    image = make_oci_layout(tmp_path / "image", LAYERS, seed=13)
    # Pushed to a registry on loopback; the core's registry then serves the same storage.
    with Origin(workdir=tmp_path / "origin") as staging:
        push_image(image, staging.host, "edge/app")
    blob_bytes = image.total_layer_bytes
    with SiteLab(tmp_path / "lab", SITES, HOSTS_PER_SITE, uplink_bps=UPLINK_BPS) as lab:
        lab.start_registry(tmp_path / "origin" / "storage")
        lab.start_core()
        lab.start_peers()
        before = {site: lab.uplink_bytes(site)[0] for site in lab.site_names}
        started = time.monotonic()
        jobs = []
        for site, hosts in lab.hosts.items():
            for i, host in enumerate(hosts):
                for layer in image.layers:
                    out = tmp_path / f"{site}-h{i}-{layer.hex[:12]}"
                    url = f"{lab.registry_url}/v2/edge/app/blobs/{layer.digest}"
                    jobs.append((layer.digest, out, lab.get(host, url, out)))
        for digest, out, job in jobs:
            _, err = job.communicate(timeout=PULL_TIMEOUT_S)
            assert job.returncode == 0, f"p2pdist get {digest[:19]} failed: {err.strip()}"
            assert sha256_file(out) == digest
        elapsed = time.monotonic() - started
        into = {site: lab.uplink_bytes(site)[0] - before[site] for site in lab.site_names}
        print(
            f"pulled in {elapsed:.1f} s; into each site: " + ", ".join(f"{v / blob_bytes:.3f}·F" for v in into.values())
        )
        for site, received in into.items():
            # Ethernet, IP and TCP headers and the scheduler's calls cross too: about 1.05·F.
            assert received <= 1.1 * blob_bytes, f"{site}: {received / blob_bytes:.2f}·F crossed its uplink"
            assert received >= blob_bytes, f"{site}: {received} bytes in, less than the blob's {blob_bytes}"
        # Each site's link alone needs F/u_wan; nothing here is timed beyond the pull's own limit.
        assert elapsed >= blob_bytes / UPLINK_BPS


def test_a_site_whose_wan_link_is_down_fails_a_new_pull_fast_and_pulls_again_once_it_returns(tmp_path: Path) -> None:
    image = make_oci_layout(tmp_path / "image", [6 * MiB], seed=14)
    with Origin(workdir=tmp_path / "origin") as staging:
        push_image(image, staging.host, "edge/app")
    (layer,) = image.layers
    with SiteLab(tmp_path / "lab", 1, 2, uplink_bps=UPLINK_BPS) as lab:
        lab.start_registry(tmp_path / "origin" / "storage")
        lab.start_core()
        lab.start_peers()
        (site,) = lab.site_names
        host = lab.hosts[site][0]
        url = f"{lab.registry_url}/v2/edge/app/blobs/{layer.digest}"
        lab.set_uplink(site, up=False)
        started = time.monotonic()
        job = lab.get(host, url, tmp_path / "cut")
        _, err = job.communicate(timeout=60)
        took = time.monotonic() - started
        print(f"with the WAN link down: exit {job.returncode} after {took:.1f} s: {err.strip()}")
        assert job.returncode != 0
        assert took <= 10.0, f"took {took:.1f} s to fail"
        reason = err.strip()
        assert reason and "\n" not in reason and len(reason) < 500
        assert not (tmp_path / "cut").exists()
        lab.set_uplink(site, up=True)
        job = lab.get(host, url, tmp_path / "back")
        _, err = job.communicate(timeout=PULL_TIMEOUT_S)
        assert job.returncode == 0, f"after the link came back: {err.strip()}"
        assert sha256_file(tmp_path / "back") == layer.digest

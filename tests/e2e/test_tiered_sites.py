"""Edge sites in the tiered shape, for real: each site runs its own scheduler and seed, and
that seed pulls through the core cluster's mirror (a core peer's proxy port) instead of the
origin. Sites in network namespaces behind tbf-shaped veth uplinks, the real Distribution
registry in the core; bytes into each site from the uplink's kernel counters, every blob's
sha256 checked. A site whose WAN link is down keeps its scheduler and seed answering; a host
that joins it then pulls what the site holds within seconds, and a blob nobody in the site
holds fails within seconds, with one line."""

from __future__ import annotations

import time
from pathlib import Path

from lab.image import make_oci_layout, push_image
from lab.netns import SiteLab
from lab.registry import Origin
from tests.support.cluster import MiB, sha256_file

SITES = 2
HOSTS_PER_SITE = 4
UPLINK_BPS = 16 * MiB
LAYERS = [16 * MiB, 12 * MiB]  # each over 4 MiB: blobs that small skip P2P
PULL_TIMEOUT_S = 120.0
WAN_DOWN_LIMIT_S = 10.0


def test_tiered_sites_take_each_layer_over_their_uplink_once_and_answer_with_the_link_down(tmp_path: Path) -> None:
    image = make_oci_layout(tmp_path / "image", LAYERS, seed=23)
    # Pushed beside the image and never pulled: nobody in any site holds it.
    unheld = make_oci_layout(tmp_path / "unheld", [6 * MiB], seed=24)
    with Origin(workdir=tmp_path / "origin") as staging:
        push_image(image, staging.host, "edge/app")
        push_image(unheld, staging.host, "edge/other")
    blob_bytes = image.total_layer_bytes
    with SiteLab(tmp_path / "lab", SITES, HOSTS_PER_SITE, uplink_bps=UPLINK_BPS) as lab:
        lab.start_registry(tmp_path / "origin" / "storage")
        lab.start_core()
        lab.start_core_peer()
        for site in lab.site_names:
            lab.start_site_cluster(site)
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
            f"tiered: pulled in {elapsed:.1f} s; into each site: "
            + ", ".join(f"{v / blob_bytes:.3f}·F" for v in into.values())
        )
        for site, received in into.items():
            # Only the site's seed crosses the link (plus headers and the core peer's replies).
            assert received <= 1.1 * blob_bytes, f"{site}: {received / blob_bytes:.2f}·F crossed its uplink"
            assert received >= blob_bytes, f"{site}: {received} bytes in, less than the blob's {blob_bytes}"

        # The WAN link of the first site goes down; a fifth host joins that site afterwards.
        site = lab.site_names[0]
        lab.set_uplink(site, up=False)
        fifth = lab.add_host(site)
        # Its config lists the site's hosts (site_peers), as a site's config management would.
        site_peers = [arg for h in lab.hosts[site] if h != fifth for arg in ("--site-peer", h.url)]
        lab.start_peers(site_peers, hosts=[fifth])
        ns = lab.site_netns[site]
        # The site's own control plane still answers: it needs nothing across the link.
        for name, url in (("scheduler", lab.site_scheduler_url(site)), ("seed", lab.site_seed_url(site))):
            service = next(s for s in lab.services if s.name == f"{site}-{name}")
            lab.wait_ready(service, ns, [f"{url}/healthz"], timeout=5.0)
        # The fifth host, new to the image and never in touch with the origin, pulls every
        # layer from its site: the site's scheduler knows the holders; the access check rests
        # on the site's hosts that saw anonymous reads of the repository allowed.
        started = time.monotonic()
        pulls = []
        for layer in image.layers:
            out = tmp_path / f"fifth-{layer.hex[:12]}"
            pulls.append(
                (layer.digest, out, lab.get(fifth, f"{lab.registry_url}/v2/edge/app/blobs/{layer.digest}", out))
            )
        for digest, out, job in pulls:
            _, err = job.communicate(timeout=60)
            assert job.returncode == 0, f"WAN down, {digest[:19]} held in the site: {err.strip()}"
            assert sha256_file(out) == digest
        took = time.monotonic() - started
        print(f"WAN down, the image held in the site: the fifth host pulled it in {took:.1f} s")
        assert took <= WAN_DOWN_LIMIT_S, f"took {took:.1f} s"
        (missing,) = unheld.layers
        started = time.monotonic()
        job = lab.get(fifth, f"{lab.registry_url}/v2/edge/other/blobs/{missing.digest}", tmp_path / "missing")
        _, err = job.communicate(timeout=60)
        took = time.monotonic() - started
        print(f"WAN down, a blob nobody in the site holds: exit {job.returncode} after {took:.1f} s: {err.strip()}")
        assert job.returncode != 0
        assert took <= WAN_DOWN_LIMIT_S, f"took {took:.1f} s to fail"
        reason = err.strip()
        assert reason and "\n" not in reason and len(reason) < 500
        assert not (tmp_path / "missing").exists()

"""Edge sites for real: sites in network namespaces, each behind a tbf-shaped veth uplink to
a core namespace holding the real Distribution registry, the scheduler and a seed. Every
site's hosts pull a two-layer image at once through the central, site-aware scheduler; the
bytes into each site are read from the uplink's kernel counters, and every blob's sha256 is
checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lab.image import MEDIA_TYPE_MANIFEST, make_oci_layout, push_image
from lab.netns import CORE_ADDRESS, PEER_PORT, REGISTRY_PORT, SiteHost, SiteLab, in_netns
from lab.registry import Origin
from lab.runtimes import Containerd, write_hosts_toml
from p2pdist.content.digest import sha256_digest
from peer.sitepeers import MEMBERS_FILE
from tests.support.cluster import MiB, sha256_file, wait_until

SITES = 3
HOSTS_PER_SITE = 3
UPLINK_BPS = 16 * MiB
LAYERS = [16 * MiB, 12 * MiB]  # each over 4 MiB: blobs that small skip P2P
PULL_TIMEOUT_S = 120.0
LINK_BACK_LIMIT_S = 20.0  # two of the peer's 10 s windows of short dials after a failure


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


WAN_DOWN_LIMIT_S = 10.0


def fetch_in_netns(host: SiteHost, path: str) -> bytes:
    """GET `path` through `host`'s mirror from inside its namespace, as containerd asks a mirror
    (`?ns=<registry>`); the body, which must come with a 200."""
    code = (
        "import sys, httpx\n"
        "r = httpx.get(sys.argv[1], params={'ns': sys.argv[2]}, headers={'accept': sys.argv[3]}, timeout=30)\n"
        "r.raise_for_status()\n"
        "sys.stdout.buffer.write(r.content)\n"
    )
    argv = [sys.executable, "-c", code, host.proxy_url + path, f"{CORE_ADDRESS}:{REGISTRY_PORT}", MEDIA_TYPE_MANIFEST]
    result = subprocess.run(in_netns(host.netns, argv), capture_output=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-500:]
    return result.stdout


def test_with_its_wan_link_down_a_site_serves_what_its_hosts_hold_and_fails_the_rest_fast(tmp_path: Path) -> None:
    """The central shape with a site's uplink set down: a host new to the image, restarted after
    the link went down, finds the holders among the site members the scheduler named to it
    before, and pulls every blob of the image with `p2pdist get`; a fifth host that joins
    afterwards, never having reached the scheduler, finds them from its site_peers and pulls
    the image by digest with containerd (`ctr image pull --hosts-dir`), its manifest from a site
    host that kept it. Both anonymously: the site's hosts saw the registry allow anonymous
    reads. A blob nobody in the site holds fails fast with one line; once the link is up a new
    pull works with no restart."""
    image = make_oci_layout(tmp_path / "image", [8 * MiB, 6 * MiB], seed=14)
    unheld = make_oci_layout(tmp_path / "unheld", [6 * MiB], seed=15)  # pushed, never pulled
    with Origin(workdir=tmp_path / "origin") as staging:
        push_image(image, staging.host, "edge/app")
        push_image(unheld, staging.host, "edge/other")
    blobs = [image.config, *image.layers]
    with SiteLab(tmp_path / "lab", 1, 4, uplink_bps=UPLINK_BPS) as lab:
        lab.start_registry(tmp_path / "origin" / "storage")
        lab.start_core()
        registry_host = lab.registry_url.removeprefix("http://")
        lab.start_peers(["--insecure-registry", registry_host])  # a registry on plain HTTP, as runtimes are told
        (site,) = lab.site_names
        # h0 stays new to the image; it learns its site's members from the scheduler.
        rejoining, *holders = lab.hosts[site]
        members_file = tmp_path / "lab" / "site-1-h0-data" / MEMBERS_FILE
        jobs = []
        for i, host in enumerate(holders, 1):  # the site pulls the image while its link is up
            for blob in blobs:
                out = tmp_path / f"warm-h{i}-{blob.hex[:12]}"
                jobs.append(
                    (blob.digest, out, lab.get(host, f"{lab.registry_url}/v2/edge/app/blobs/{blob.digest}", out))
                )
        for digest, out, job in jobs:
            _, err = job.communicate(timeout=PULL_TIMEOUT_S)
            assert job.returncode == 0, f"p2pdist get {digest[:19]} failed: {err.strip()}"
            assert sha256_file(out) == digest
        # One host's mirror also serves the manifest (as a runtime's pull would), and keeps it.
        manifest = fetch_in_netns(holders[0], f"/v2/edge/app/manifests/{image.manifest_digest}")
        assert sha256_digest(manifest) == image.manifest_digest

        wait_until(
            lambda: members_file.exists() and len(json.loads(members_file.read_text())["members"]) == 3,
            30,
            "h0 to learn its site's 3 other hosts from the scheduler",
        )
        lab.set_uplink(site, up=False)
        into_before = lab.uplink_bytes(site)[0]

        # h0 restarts while the link is down, with no site_peers: it asks the members it kept.
        old = next(s for s in lab.services if s.name == "site-1-h0")
        old.stop()
        again = lab.start(
            "site-1-h0-again", rejoining.netns, old.argv[4:], rejoining.url, proxy_url=rejoining.proxy_url
        )
        lab.wait_healthy(again, rejoining.netns)
        healthy = time.monotonic()
        jobs = []
        for blob in blobs:
            out = tmp_path / f"rejoined-{blob.hex[:12]}"
            url = f"{lab.registry_url}/v2/edge/app/blobs/{blob.digest}"
            jobs.append((blob.digest, out, lab.get(rejoining, url, out)))
        for digest, out, job in jobs:
            _, err = job.communicate(timeout=60)
            assert job.returncode == 0, f"WAN down, restarted h0: p2pdist get {digest[:19]} failed: {err.strip()}"
            assert sha256_file(out) == digest
        took = time.monotonic() - healthy
        print(f"WAN down: h0, restarted, pulled {len(blobs)} blobs from remembered site members in {took:.1f} s")
        assert took <= WAN_DOWN_LIMIT_S
        # A fifth host joins: its containerd (in the site's namespace, pointed at its peer by
        # hosts.toml) and its peer, which knows its site only from site_peers.
        fifth = lab.add_host(site)
        hosts_dir = tmp_path / "fifth-certs.d"
        write_hosts_toml(hosts_dir, registry_host, lab.registry_url, fifth.proxy_url)
        with Containerd(tmp_path, "containerd-fifth", netns=fifth.netns) as containerd:
            started = time.monotonic()
            site_peers = [arg for h in holders for arg in ("--site-peer", f"{h.address}:{PEER_PORT}")]
            lab.start_peers([*site_peers, "--insecure-registry", registry_host], hosts=[fifth])
            healthy = time.monotonic()
            containerd.pull(f"{registry_host}/edge/app@{image.manifest_digest}", hosts_dir, timeout=60)
            done = time.monotonic()
            wanted = {blob.digest for blob in blobs} | {image.manifest_digest}
            assert wanted <= containerd.content_digests()  # containerd checks each digest as it writes
            snapshots = containerd.ctr("snapshots", "ls")
            assert snapshots.returncode == 0 and len(snapshots.stdout.splitlines()) - 1 >= len(image.layers)
        print(
            f"WAN down: a fifth host pulled the image by digest with containerd from its site {done - started:.1f} s "
            f"after its peer was started ({done - healthy:.1f} s after it was healthy)"
        )
        # From the moment the new host serves (its /healthz answers): what follows is the pull.
        # The time before it is this test's own process start-ups on a shared machine.
        assert done - healthy <= WAN_DOWN_LIMIT_S, f"took {done - healthy:.1f} s from the host's start"
        assert lab.uplink_bytes(site)[0] == into_before  # nothing crossed the cut link

        (missing,) = unheld.layers
        url = f"{lab.registry_url}/v2/edge/other/blobs/{missing.digest}"
        started = time.monotonic()
        job = lab.get(fifth, url, tmp_path / "missing")
        _, err = job.communicate(timeout=60)
        took = time.monotonic() - started
        print(f"WAN down, a blob nobody in the site holds: exit {job.returncode} after {took:.1f} s: {err.strip()}")
        assert job.returncode != 0
        assert took <= WAN_DOWN_LIMIT_S, f"took {took:.1f} s to fail"
        reason = err.strip()
        assert reason and "\n" not in reason and len(reason) < 500
        assert not (tmp_path / "missing").exists()

        lab.set_uplink(site, up=True)
        # For DOWN_S (10 s) after a failed dial a peer dials the registry with a 0.5 s connect
        # timeout (peer/upstream.py), and on this shared 2-core machine the first dial after the
        # link returns has at times overrun it: that pull fails with one line, as a cut
        # link's would, and the runtime's retry gets through. So this pulls again until one
        # works, within a bound, and restarts nothing.
        deadline = time.monotonic() + LINK_BACK_LIMIT_S
        errors = []
        while True:
            job = lab.get(fifth, url, tmp_path / "back")
            _, err = job.communicate(timeout=PULL_TIMEOUT_S)
            if job.returncode == 0 or time.monotonic() > deadline:
                break
            errors.append(err.strip())
        print(f"link back: a pull worked after {len(errors)} failed ({errors})")
        assert job.returncode == 0, f"after the link came back, {len(errors) + 1} pulls failed: {err.strip()}"
        assert sha256_file(tmp_path / "back") == missing.digest

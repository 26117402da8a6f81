"""Rollout to edge sites in network namespaces: every site host pulls a multi-layer image at once
through its own peer (the central, site-aware scheduler), then every host pulls it straight
from the origin, both with curl; bytes over each site's uplink come from the kernel's counters.

    .venv/bin/python -m benchmarks.sites --sites 3 --hosts 4 --blob-size 64MiB --layers 2 \\
        --uplink-rate 8MiB --out benchmarks/results/sites

The bound per host: the image must cross its site's uplink, F/u_wan; the core and the links
inside a site are not shaped, so F/u_core, F/d and the site's own swarm add nothing measurable
to it. Times are per host, from the common start to its last layer verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import percentile
from benchmarks.simulate import machine
from lab.image import ImageInfo, make_oci_layout, push_image
from lab.netns import CORE_ADDRESS, REGISTRY_PORT, SiteHost, SiteLab, in_netns
from lab.registry import Origin
from p2pdist.config import parse_size
from p2pdist.registry.oci import SCHEME_HEADER


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def pull_round(lab: SiteLab, image: ImageInfo, workdir: Path, *, direct: bool) -> dict[str, Any]:
    """Every host pulls every layer at once; returns per-host times and bytes into each site."""
    before = {site: lab.uplink_bytes(site)[0] for site in lab.site_names}
    jobs: list[tuple[SiteHost, str, Path, subprocess.Popen[str]]] = []
    started = time.monotonic()
    for site, hosts in lab.hosts.items():
        for i, host in enumerate(hosts):
            for layer in image.layers:
                out = workdir / f"{'direct' if direct else 'p2p'}-{site}-h{i}-{layer.hex[:12]}"
                url = f"{lab.registry_url}/v2/bench/app/blobs/{layer.digest}"
                if not direct:
                    # The same client both ways (curl: `p2pdist get`'s Python start-up, 24 at once
                    # on 2 cores, cost seconds): through the host's peer, as containerd asks a mirror.
                    name = f"/v2/bench/app/blobs/{layer.digest}?ns={CORE_ADDRESS}:{REGISTRY_PORT}"
                    url = host.proxy_url + name
                argv = in_netns(host.netns, ["curl", "-sSf", "-H", f"{SCHEME_HEADER}: http", "-o", str(out), url])
                job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                jobs.append((host, layer.digest, out, job))
    done_at: dict[str, float] = {}
    pending = list(jobs)
    while pending:
        for entry in list(pending):
            host, digest, out, job = entry
            if job.poll() is None:
                continue
            pending.remove(entry)
            _, err = job.communicate()
            if job.returncode != 0 or sha256_file(out) != digest:
                raise SystemExit(f"{host.address}: {digest[:19]} failed: {err.strip()[-300:]}")
            done_at[host.address] = max(done_at.get(host.address, 0.0), time.monotonic() - started)
            out.unlink()
        time.sleep(0.05)
    into = {site: lab.uplink_bytes(site)[0] - before[site] for site in lab.site_names}
    per_site = {site: sorted(done_at[h.address] for h in hosts) for site, hosts in lab.hosts.items()}
    times = sorted(done_at.values())
    return {
        "completion_s": [round(t, 3) for t in times],
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "per_site_completion_s": per_site,
        "bytes_into_site": into,
    }


def plot(path: Path, result: dict[str, Any]) -> None:
    """Per-site completion CDFs of both rounds, the bound marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    for scheme, style in (("p2p", "-"), ("direct", "--")):
        for site, times in result[scheme]["per_site_completion_s"].items():
            n = len(times)
            ax.step(times, [(i + 1) / n for i in range(n)], style, where="post", label=f"{scheme} {site}")
    ax.axvline(result["bound_s"], color="grey", linestyle=":", label=f"F/u_wan = {result['bound_s']:.1f} s")
    ax.set_xlabel("completion time per host (s)")
    ax.set_ylabel("fraction of the site's hosts done")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=4, help="hosts per site")
    parser.add_argument("--blob-size", default="64MiB", help="the image's layer bytes, split evenly")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--uplink-rate", default="8MiB", help="each site's WAN link, each way, bytes/s")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    total = parse_size(args.blob_size)
    uplink = parse_size(args.uplink_rate)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2pdist-sites-") as tmp:
        work = Path(tmp)
        image = make_oci_layout(work / "image", [total // args.layers] * args.layers, seed=31)
        with Origin(workdir=work / "origin") as staging:
            push_image(image, staging.host, "bench/app")
        blob_bytes = image.total_layer_bytes
        with SiteLab(work / "lab", args.sites, args.hosts, uplink_bps=uplink) as lab:
            lab.start_registry(work / "origin" / "storage")
            lab.start_core()
            lab.start_peers()
            p2p = pull_round(lab, image, work, direct=False)
            direct = pull_round(lab, image, work, direct=True)
    bound = blob_bytes / uplink
    result = {
        "title": "Rollout to edge sites in network namespaces",
        "sites": args.sites,
        "hosts_per_site": args.hosts,
        "layers": args.layers,
        "blob_bytes": blob_bytes,
        "uplink_bps": uplink,
        "bound_s": bound,
        "p2p": p2p,
        "direct": direct,
        "p2p_bytes_into_site_max_F": max(p2p["bytes_into_site"].values()) / blob_bytes,
        "p2p_p99_over_bound": p2p["p99_s"] / bound,
        "direct_p99_over_p2p_p99": direct["p99_s"] / p2p["p99_s"],
        "command": shlex.join([".venv/bin/python", "-m", "benchmarks.sites", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "runtime_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(args.out / "cdf.png", result)
    for scheme in ("p2p", "direct"):
        r = result[scheme]
        into = ", ".join(f"{v / blob_bytes:.3f}" for v in r["bytes_into_site"].values())
        print(
            f"{scheme:6s} p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s ({r['p99_s'] / bound:.2f}·F/u_wan)  "
            f"into each site (·F): {into}"
        )
    print(f"F/u_wan {bound:.2f} s; direct p99 / p2p p99 {result['direct_p99_over_p2p_p99']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

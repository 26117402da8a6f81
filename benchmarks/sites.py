"""Rollout to edge sites in network namespaces, in either shape: every site host pulls a
multi-layer image at once through its own peer, then every host pulls it straight from the
origin, both with curl; bytes over each site's uplink come from the kernel's counters.

    .venv/bin/python -m benchmarks.sites --shape central --sites 3 --hosts 4 --blob-size 64MiB \
        --layers 2 --uplink-rate 8MiB --out benchmarks/results/sites
    .venv/bin/python -m benchmarks.sites --shape tiered ... --out benchmarks/results/sites-tiered

`central`: every peer uses the core's site-aware scheduler and seed. `tiered`: each site runs
its own scheduler and seed, whose upstream is a core peer's mirror.

The bound per host is issue 13's staged one (benchmarks.report.site_staged_bound_s): the image
enters the site in max(F/u_wan, F/u_core), then the site's own swarm spreads it in
max(F/d, N_s·F/(u_wan + N_s·u)). The core and the links inside a site are not shaped; they are
counted at `--lan-rate` (a loose figure for an unshaped veth and a Python peer), which makes
everything but F/u_wan small. Times are per host, from the common start to its last layer
verified; each layer's first byte and end are kept per host (the timelines).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import percentile, site_staged_bound_s
from benchmarks.simulate import machine
from lab.image import ImageInfo, make_oci_layout, push_image
from lab.netns import CORE_ADDRESS, REGISTRY_PORT, SiteHost, SiteLab, in_netns
from lab.registry import Origin
from p2pdist.config import parse_size
from p2pdist.registry.oci import SCHEME_HEADER

CURL_TIMES = "%{time_starttransfer} %{time_total}\n"
# curl, then the wall-clock time it ended: exact, however late this process looks.
TIMED = 'curl "$@"; status=$?; date +%s.%N; exit $status'


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def pull_round(lab: SiteLab, image: ImageInfo, workdir: Path, *, direct: bool) -> dict[str, Any]:
    """Every host pulls every layer at once; returns per-host times, each layer's timeline
    (spawned, first byte, done: seconds from the common start), bytes into each site and the
    machine's CPU use during the round."""
    before = {site: lab.uplink_bytes(site)[0] for site in lab.site_names}
    jobs: list[tuple[SiteHost, str, Path, subprocess.Popen[str], float]] = []
    cpu_before = cpu_times()
    crossed: dict[str, float | None] = dict.fromkeys(lab.site_names)
    sampling = threading.Event()
    started = time.monotonic()
    started_wall = time.time()

    def sample() -> None:
        # Bytes into each site over time, in a thread of its own so the polling below cannot
        # delay it: when the image had crossed each uplink.
        while not sampling.is_set():
            into_now = lab.bytes_into_sites()
            for site, at in crossed.items():
                if at is None and into_now[site] - before[site] >= image.total_layer_bytes:
                    crossed[site] = round(time.monotonic() - started, 3)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
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
                curl = ["curl", "-sSf", "-H", f"{SCHEME_HEADER}: http", "-o", str(out), "-w", CURL_TIMES, url]
                spawned = time.monotonic() - started
                job = subprocess.Popen(
                    in_netns(host.netns, ["sh", "-c", TIMED, "sh", *curl[1:]]),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                jobs.append((host, layer.digest, out, job, spawned))
    done_at: dict[str, float] = {}
    timeline: dict[str, dict[str, list[float]]] = {}
    finished: list[tuple[SiteHost, str, Path, subprocess.Popen[str], str]] = []
    pending = list(jobs)
    while pending:
        # The files are hashed after the round: hashing one must not delay taking the next.
        for entry in list(pending):
            host, digest, out, job, spawned = entry
            if job.poll() is None:
                continue
            pending.remove(entry)
            got, err = job.communicate()
            finished.append((host, digest, out, job, err))
            if job.returncode != 0:
                continue
            curl_times, ended = got.split("\n")[:2]
            first_byte, total = (float(x) for x in curl_times.split())
            done = float(ended) - started_wall
            done_at[host.address] = max(done_at.get(host.address, 0.0), done)
            # curl's own clock runs from its start: the first byte came total - first_byte before the end.
            timeline.setdefault(host.address, {})[digest[7:19]] = [
                round(spawned, 3),
                round(done - total + first_byte, 3),
                round(done, 3),
            ]
        time.sleep(0.05)
    sampling.set()
    sampler.join()
    for host, digest, out, job, err in finished:
        if job.returncode != 0 or sha256_file(out) != digest:
            raise SystemExit(f"{host.address}: {digest[:19]} failed: {err.strip()[-300:]}")
        out.unlink()
    busy_after, total_after = cpu_times()
    into = {site: lab.uplink_bytes(site)[0] - before[site] for site in lab.site_names}
    per_site = {site: sorted(done_at[h.address] for h in hosts) for site, hosts in lab.hosts.items()}
    times = sorted(done_at.values())
    return {
        "completion_s": [round(t, 3) for t in times],
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "per_site_completion_s": per_site,
        "bytes_into_site": into,
        "timeline_spawned_first_byte_done_s": timeline,
        "image_crossed_uplink_at_s": crossed,
        "cpu_busy_fraction": round((busy_after - cpu_before[0]) / max(1.0, total_after - cpu_before[1]), 3),
    }


def service_lines(workdir: Path, words: tuple[str, ...]) -> list[str]:
    """The services' log lines holding any of `words`, each prefixed by its service: where the
    seeds fetched from and how long it took, and which peer the scheduler made a WAN fetcher."""
    lines = []
    for path in sorted(workdir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(word in line for word in words):
                lines.append(f"{path.stem}: {line[:300]}")
    return lines


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
    ax.axvline(result["bound_s"], color="grey", linestyle=":", label=f"staged bound {result['bound_s']:.1f} s")
    ax.set_title(f"{result['shape']} shape: per-site completion CDFs", fontsize=9)
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
    parser.add_argument("--shape", choices=("central", "tiered"), default="central")
    parser.add_argument("--lan-rate", default="1GiB", help="the bound's rate of the unshaped links (core, in-site)")
    parser.add_argument("--peer-args", default="", help="extra flags for every site peer, one string")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    total = parse_size(args.blob_size)
    uplink = parse_size(args.uplink_rate)
    lan = parse_size(args.lan_rate)
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
            if args.shape == "tiered":
                lab.start_core_peer()
                for site in lab.site_names:
                    lab.start_site_cluster(site)
            lab.start_peers(shlex.split(args.peer_args))
            p2p = pull_round(lab, image, work, direct=False)
            p2p["service_log"] = service_lines(lab.workdir, ("seeded ", "seeding ", "into site", "back to source"))
            direct = pull_round(lab, image, work, direct=True)
    bound = site_staged_bound_s(
        site_hosts=args.hosts,
        blob_bytes=blob_bytes,
        origin_bps=lan,
        uplink_bps=uplink,
        upload_bps=lan,
        download_bps=lan,
    )
    result = {
        "title": f"Rollout to edge sites in network namespaces, {args.shape} shape",
        "shape": args.shape,
        "lan_bps": lan,
        "f_over_u_wan_s": blob_bytes / uplink,
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
        "bound": "site_staged_bound_s: max(F/u_wan, F/u_core) + max(F/d, N_s·F/(u_wan + N_s·u)), u_core = u = d = lan",
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
            f"{scheme:6s} p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s ({r['p99_s'] / bound:.2f}× bound)  "
            f"into each site (·F): {into}  CPU busy {r['cpu_busy_fraction']:.0%}"
        )
    print(
        f"{args.shape}: staged bound {bound:.2f} s (F/u_wan {blob_bytes / uplink:.2f} s); "
        f"direct p99 / p2p p99 {result['direct_p99_over_p2p_p99']:.2f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

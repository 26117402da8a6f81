"""`ctr image pull` timings of one image: straight from the origin, through a cold peer, and
through a peer whose neighbours already hold it.

Real parts only: the Distribution registry as origin (optionally behind a rate-capped relay),
separate scheduler/seed/peer processes, and a fresh private containerd per pull (nothing
cached), so each time includes resolving, fetching every blob and unpacking it. Each line gives the
pull's ratio to the direct pull of the same run and the CPU-seconds each part used meanwhile
(the seed, the peer pulled through, the other peers, containerd with ctr), so a slow pull can
be told from a busy one on a shared machine.

    .venv/bin/python -m benchmarks.mirror_pull --layers-mib 200,150,100,50
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from lab.attest import attest_args
from lab.image import make_oci_layout, push_image
from lab.procs import RelayProcess, Service, start_peer, start_scheduler, start_seed
from lab.registry import Origin
from lab.runtimes import Containerd, write_hosts_toml

MiB = 1 << 20
REPO = "bench/mirror"


def cpu_s(pid: int) -> float:
    """CPU-seconds (user + system, all threads) process `pid` has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU-seconds of this process's waited-for children (ctr)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers-mib", default="200,150,100,50", help="layer sizes in MiB (default: 500 MiB in 4)")
    parser.add_argument("--origin-rate", type=int, default=None, help="cap the origin at this many bytes/s")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary dir, removed)")
    parser.add_argument(
        "--verify-once",
        action="store_true",
        help="give the seed a signing key and the peers its public key (peers skip the blob's second hash)",
    )
    parser.add_argument(
        "--scheduler-args",
        default="",
        help="extra flags for the scheduler (--scheduler-args='--min-piece-bytes 4MiB': the old piece layout)",
    )
    parser.add_argument(
        "--peer-args", default="", help="extra flags for every peer (--peer-args='--per-parent-pieces 2')"
    )
    args = parser.parse_args()
    sizes = [int(s) * MiB for s in args.layers_mib.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="p2pdist-mirror-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    try:
        print(f"generating a {sum(sizes) // MiB} MiB image ({len(sizes)} layers)...", flush=True)
        image = make_oci_layout(workdir / "image", sizes, seed=500)
        with Origin(workdir=workdir / "origin") as origin:
            push_image(image, origin.host, REPO)
            with RelayProcess(workdir, origin.host, rate_bps=args.origin_rate) as relay:
                seed_args, peer_args = attest_args(workdir) if args.verify_once else ([], [])
                scheduler = start_scheduler(workdir, extra_args=shlex.split(args.scheduler_args))
                services.append(scheduler)
                services.append(start_seed(workdir, scheduler.url, "seed0", extra_args=seed_args))
                peers = [
                    start_peer(
                        workdir,
                        scheduler.url,
                        f"peer{i}",
                        ("--insecure-registry", relay.host, *peer_args, *shlex.split(args.peer_args)),
                    )
                    for i in range(3)
                ]
                services.extend(peers)
                ref = f"{relay.host}/{REPO}:latest"

                seed = services[1]
                direct: list[float] = []

                def pull(label: str, mirror: str | None, through: Service | None = None) -> float:
                    slug = "-".join(label.split()[:4]).replace(",", "")
                    hosts_dir = workdir / f"certs-{slug}"
                    write_hosts_toml(hosts_dir, relay.host, relay.url, mirror)
                    before = relay.downstream_bytes()
                    with Containerd(workdir, f"containerd-{slug}") as containerd:
                        cpu = {s.name: cpu_s(s.pid) for s in (seed, *peers)}
                        client = cpu_s(containerd.service.pid) + children_cpu_s()
                        took = containerd.pull(ref, hosts_dir, timeout=1200)
                        client = cpu_s(containerd.service.pid) + children_cpu_s() - client
                        used = {s.name: cpu_s(s.pid) - cpu[s.name] for s in (seed, *peers)}
                    sent = relay.downstream_bytes() - before
                    if mirror is None:
                        direct.append(took)
                    ratio = took / direct[0]
                    mine = used[through.name] if through else 0.0
                    others = sum(used[p.name] for p in peers if p is not through)
                    print(
                        f"{label:<34} {took:7.2f} s {ratio:5.2f}x direct   origin sent {sent / MiB:6.1f} MiB   "
                        f"CPU-s: seed {used[seed.name]:.2f}, this peer {mine:.2f}, other peers {others:.2f}, "
                        f"containerd+ctr {client:.2f}   load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    return took

                pull("direct from the origin", None)
                pull("through a cold peer", peers[0].proxy_url, peers[0])
                pull("through a peer, neighbours warm", peers[1].proxy_url, peers[1])
                pull("again, third host", peers[2].proxy_url, peers[2])
                pull("through the first peer again", peers[0].proxy_url, peers[0])
    finally:
        for service in reversed(services):
            service.stop()
        if not args.workdir:
            time.sleep(0.1)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`ctr image pull` timings of one image: straight from the origin, through a cold peer, and
through a peer whose neighbours already hold it.

Real parts only: the Distribution registry as origin (optionally behind a rate-capped relay),
separate scheduler/seed/peer processes, and a fresh private containerd per pull (nothing
cached), so each time includes resolving, fetching every blob and unpacking it. Each line gives the
pull's ratio to the direct pulls beside it and the CPU-seconds each part used meanwhile
(the seed, the peer pulled through, the other peers, containerd with ctr), so a slow pull can
be told from a busy one on a shared machine.

A run has `--rounds` rounds, each with its own image (so every round has a cold peer) and its
own scheduler, seed and peers, removed with their stores at the round's end: a direct pull,
the four pulls through peers, and a direct pull again. A pull's ratio is to the mean of its
round's two direct pulls. containerd's own time varies by about 0.15x from one pull to the
next on this 2-core machine (it spends 6-7 CPU-seconds per pull), so one direct pull is a
noisy yardstick: the summary pools each kind of pull over the rounds (the sum of its times
over the sum of its yardsticks) and gives the range of the rounds' ratios beside it.

    .venv/bin/python -m benchmarks.mirror_pull --layers-mib 200,150,100,50 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
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
# The pulls of a round through peers, in order, and the peer each goes through.
THROUGH = (
    ("through a cold peer", 0),
    ("through a peer, neighbours warm", 1),
    ("again, third host", 2),
    ("through the first peer again", 0),
)


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of pulls, each with its own image (default: 3)")
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
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="p2pdist-mirror-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with (
            Origin(workdir=workdir / "origin") as origin,
            RelayProcess(workdir, origin.host, rate_bps=args.origin_rate) as relay,
        ):
            pulls = 0

            def pull(ref: str, through: Service | None, watched: list[Service]) -> tuple[float, str]:
                """One pull into a fresh containerd: its seconds, and the rest of its line."""
                nonlocal pulls
                pulls += 1
                hosts_dir = workdir / f"certs-{pulls}"
                write_hosts_toml(hosts_dir, relay.host, relay.url, through.proxy_url if through else None)
                before = relay.downstream_bytes()
                with Containerd(workdir, f"containerd-{pulls}") as containerd:
                    cpu = {s.name: cpu_s(s.pid) for s in watched}
                    client = cpu_s(containerd.service.pid) + children_cpu_s()
                    took = containerd.pull(ref, hosts_dir, timeout=1200)
                    client = cpu_s(containerd.service.pid) + children_cpu_s() - client
                    used = {s.name: cpu_s(s.pid) - cpu[s.name] for s in watched}
                sent = relay.downstream_bytes() - before
                seed = used.get("seed0", 0.0)
                mine = used[through.name] if through else 0.0
                others = sum(v for name, v in used.items() if name.startswith("peer")) - mine
                rest = (
                    f"origin sent {sent / MiB:6.1f} MiB   CPU-s: seed {seed:.2f}, this peer {mine:.2f}, "
                    f"other peers {others:.2f}, containerd+ctr {client:.2f}   load {os.getloadavg()[0]:.1f}"
                )
                return took, rest

            directs: list[tuple[float, float]] = []
            times: dict[str, list[float]] = {label: [] for label, _ in THROUGH}
            for r in range(args.rounds):
                print(f"round {r + 1}: generating a {sum(sizes) // MiB} MiB image ({len(sizes)} layers)...", flush=True)
                image = make_oci_layout(workdir / "image", sizes, seed=500 + r, tag=f"r{r}")
                push_image(image, origin.host, REPO)
                shutil.rmtree(workdir / "image")
                ref = f"{relay.host}/{REPO}:r{r}"
                # Each round on a new cluster, whose stores are removed after it: what the
                # stores hold is page cache, and on this machine pulls slow down by up to 2x
                # once three rounds' blobs fill the free memory.
                here = workdir / f"round{r}"
                here.mkdir()
                services: list[Service] = []
                try:
                    seed_args, peer_args = attest_args(here) if args.verify_once else ([], [])
                    scheduler = start_scheduler(here, extra_args=shlex.split(args.scheduler_args))
                    services.append(scheduler)
                    services.append(start_seed(here, scheduler.url, "seed0", extra_args=seed_args))
                    peers = [
                        start_peer(
                            here,
                            scheduler.url,
                            f"peer{i}",
                            ("--insecure-registry", relay.host, *peer_args, *shlex.split(args.peer_args)),
                        )
                        for i in range(3)
                    ]
                    services.extend(peers)
                    lines = []
                    first, rest = pull(ref, None, services)
                    lines.append(("direct from the origin", first, rest))
                    for label, peer in THROUGH:
                        took, rest = pull(ref, peers[peer], services)
                        times[label].append(took)
                        lines.append((label, took, rest))
                    last, rest = pull(ref, None, services)
                    lines.append(("direct from the origin, again", last, rest))
                finally:
                    for service in reversed(services):
                        service.stop()
                    shutil.rmtree(here, ignore_errors=True)
                directs.append((first, last))
                yardstick = (first + last) / 2
                for label, took, rest in lines:
                    ratio = "" if label.startswith("direct") else f"{took / yardstick:5.2f}x direct"
                    print(f"{label:<34} {took:7.2f} s {ratio:<13}   {rest}", flush=True)
            yardsticks = [(a + b) / 2 for a, b in directs]
            every = [t for pair in directs for t in pair]
            print(
                f"\nover {args.rounds} round(s): direct pulls {min(every):.2f}-{max(every):.2f} s "
                f"(median {statistics.median(every):.2f})",
                flush=True,
            )
            for label, _ in THROUGH:
                ratios = [t / y for t, y in zip(times[label], yardsticks, strict=True)]
                print(
                    f"{label:<34} {sum(times[label]) / sum(yardsticks):5.2f}x direct, pooled   "
                    f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)",
                    flush=True,
                )
    finally:
        if not args.workdir:
            time.sleep(0.1)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

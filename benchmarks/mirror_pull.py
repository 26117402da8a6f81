"""`ctr image pull` timings of one image: straight from the origin, through a cold peer, and
through a peer whose neighbours already hold it.

Real parts only: the Distribution registry as origin (optionally behind a rate-capped relay),
separate scheduler/seed/peer processes, and a fresh private containerd per pull (nothing
cached), so each time includes resolving, fetching every blob and unpacking it.

    .venv/bin/python -m benchmarks.mirror_pull --layers-mib 200,150,100,50
"""

from __future__ import annotations

import argparse
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
                scheduler = start_scheduler(workdir)
                services.append(scheduler)
                services.append(start_seed(workdir, scheduler.url, "seed0", extra_args=seed_args))
                peers = [
                    start_peer(workdir, scheduler.url, f"peer{i}", ("--insecure-registry", relay.host, *peer_args))
                    for i in range(3)
                ]
                services.extend(peers)
                ref = f"{relay.host}/{REPO}:latest"

                def pull(label: str, mirror: str | None) -> float:
                    slug = "-".join(label.split()[:4]).replace(",", "")
                    hosts_dir = workdir / f"certs-{slug}"
                    write_hosts_toml(hosts_dir, relay.host, relay.url, mirror)
                    before = relay.downstream_bytes()
                    with Containerd(workdir, f"containerd-{slug}") as containerd:
                        took = containerd.pull(ref, hosts_dir, timeout=1200)
                    sent = relay.downstream_bytes() - before
                    print(f"{label:<34} {took:7.2f} s   origin sent {sent / MiB:7.1f} MiB", flush=True)
                    return took

                pull("direct from the origin", None)
                pull("through a cold peer", peers[0].proxy_url)
                pull("through a peer, neighbours warm", peers[1].proxy_url)
                pull("again, third host", peers[2].proxy_url)
                pull("through the first peer again", peers[0].proxy_url)
    finally:
        for service in reversed(services):
            service.stop()
        if not args.workdir:
            time.sleep(0.1)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

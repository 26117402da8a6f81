"""One peer pulling one large blob from one parent on loopback, beside curl from the origin.

    .venv/bin/python -m benchmarks.throughput --blob-size 1GiB

Starts the real Distribution origin, a scheduler, a seed and three peers (separate
processes). Peer A pulls the blob first (warming itself); the seed then leaves, so
peer B's only parent is A. Reports B's download (pieces verified into its store, the blob's
sha256 checked; started by a one-byte range request, so no client reads the blob meanwhile),
beside curl fetching the same blob from the origin to /dev/null and to a file; then peer C
(B gone, A its only parent) pulls it with `p2pdist get` to a file, end to end (a cold peer),
and `p2pdist get` through A itself, which holds the blob whole (a warm peer). Then
(`--children 8`) A serves the blob to 8 new peers at once, and its peak resident memory is
read from /proc.

Curl's file is a new file each time, and it, B's store and what each `get` writes (C's
store and the client's file for the cold one) all go into memory freed just before: on a VM
whose memory the host backs lazily, the first write to a page costs several times a write to
a page used before (1 GiB into the page cache measured 1.5 CPU-s against 0.4), so they would
otherwise be compared under different conditions. The best of four curl runs is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from lab.attest import attest_args
from lab.image import make_oci_layout, push_image
from lab.procs import Service, p2pdist_executable, start_peer, start_scheduler, start_seed
from lab.registry import Origin
from p2pdist.config import parse_size
from p2pdist.registry.oci import SCHEME_HEADER

REPO = "bench/throughput"


def curl(url: str, out: str) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sf", "-o", out, url], check=True)
    return time.monotonic() - started


def curl_to_new_file(url: str, path: Path) -> float:
    """curl into a file that did not exist, then delete it. Rewriting the same file would be
    unfair to curl: ext4 flushes a truncated file's old blocks first (auto_da_alloc), which
    measured 3.9-5.1 s for 1 GiB against 1.6 s into a new file."""
    seconds = curl(url, str(path))
    path.unlink()
    return seconds


def free_memory(url: str, workdir: Path, copies: int) -> None:
    """Write `copies` new files of the blob with curl, then delete them all: the page-cache
    writes that follow get memory freed just before, as curl's own timed runs do. A cold `get`
    writes the blob twice (peer C's store and the client's file), so it gets two copies'
    worth; one copy rewritten twice would free the same pages twice."""
    paths = [workdir / f"free-{i}.out" for i in range(copies)]
    for path in paths:
        curl(url, str(path))
    for path in paths:
        path.unlink()


def metric_sum(url: str, name: str) -> float:
    """The sum of a metric's samples; a name without labels sums over every label set."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    prefixes = (name + " ",) if "{" in name else (name + " ", name + "{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))


def download_only(peer: Service, blob_url: str, registry: str, timeout_s: float = 300.0) -> float:
    """Start `peer`'s download of a blob with a one-byte range request and wait for it to
    finish; return the download's own duration (registration to sha256 verified)."""
    response = httpx.get(
        blob_url, params={"ns": registry}, headers={"range": "bytes=0-0", SCHEME_HEADER: "http"}, timeout=timeout_s
    )
    assert response.status_code == 206, f"range request answered {response.status_code}"
    deadline = time.monotonic() + timeout_s
    while metric_sum(peer.url, 'p2pdist_peer_tasks_total{result="done"}') < 1:
        assert time.monotonic() < deadline, "download did not finish"
        time.sleep(0.05)
    return metric_sum(peer.url, "p2pdist_peer_task_duration_seconds_sum")


def cpu_s(pid: int) -> float:
    """CPU-seconds (user + system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU-seconds used by this process's waited-for children (the `get` clients, curl)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_get(argv: list[str], out: Path, digest: str) -> tuple[float, float]:
    """Run one `p2pdist get` to a new file; (seconds, the client's CPU-seconds). The file's
    sha256 is checked here too, then it is deleted."""
    cpu_before = children_cpu_s()
    started = time.monotonic()
    subprocess.run([*argv, "-o", str(out)], check=True)
    seconds = time.monotonic() - started
    cpu = children_cpu_s() - cpu_before
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
    out.unlink()
    return seconds, cpu


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def run(blob_size: int, workdir: Path, children: int = 0, verify_once: bool = False) -> dict[str, float]:
    image = make_oci_layout(workdir / "layout", [blob_size], seed=7)
    layer = image.layers[0]
    size = layer.size
    results: dict[str, float] = {"blob_bytes": size}
    with Origin(workdir=workdir / "origin") as origin:
        push_image(image, origin.host, REPO)
        url = f"{origin.url}/v2/{REPO}/blobs/{layer.digest}"
        curl(url, "/dev/null")  # warm the origin's page cache
        results["curl_devnull_s"] = min(curl(url, "/dev/null") for _ in range(3))
        scratch = workdir / "curl.out"
        cpu_before = children_cpu_s()
        results["curl_file_s"] = min(curl_to_new_file(url, scratch) for _ in range(4))
        results["curl_file_cpu_s"] = (children_cpu_s() - cpu_before) / 4  # curl's own, per run
        insecure = ["--insecure-registry", origin.host]
        seed_args: list[str] = []
        if verify_once:
            seed_args, peer_args = attest_args(workdir)
            insecure += peer_args
        scheduler = start_scheduler(workdir)
        seed = start_seed(workdir, scheduler.url, extra_args=[*seed_args, "--insecure-registry", origin.host])
        peer_a = start_peer(workdir, scheduler.url, "peer-a", insecure)
        peer_b = start_peer(workdir, scheduler.url, "peer-b", insecure)
        peer_c = start_peer(workdir, scheduler.url, "peer-c", insecure)
        try:
            get = [str(p2pdist_executable()), "get", url, "-q", "--peer"]
            subprocess.run([*get, str(peer_a.proxy_url), "-o", "/dev/null"], check=True)
            seed.stop()  # B's only parent is now A
            curl_to_new_file(url, scratch)  # B's store gets the memory curl's file just had
            b_cpu = cpu_s(peer_b.pid)
            results["p2p_download_s"] = download_only(
                peer_b, f"{peer_b.proxy_url}/v2/{REPO}/blobs/{layer.digest}", origin.host
            )
            results["p2p_download_cpu_s"] = cpu_s(peer_b.pid) - b_cpu
            # 1 when B skipped the blob's sha256 on a seed's attestation (verify once), else 0.
            results["b_attested"] = metric_sum(peer_b.url, 'p2pdist_peer_blob_checks_total{how="attested"}')
            from_peers = metric_sum(peer_b.url, 'p2pdist_peer_download_bytes_total{source="peer"}')
            assert from_peers == size, f"B fetched {from_peers} of {size} bytes from its parent"
            peer_b.stop()  # C's only parent is A
            free_memory(url, workdir, 2)
            c_cpu = cpu_s(peer_c.pid)
            results["p2p_get_s"], results["p2p_get_client_cpu_s"] = timed_get(
                [*get, str(peer_c.proxy_url)], workdir / "c.out", layer.digest
            )
            results["p2p_get_peer_cpu_s"] = cpu_s(peer_c.pid) - c_cpu
            results["c_attested"] = metric_sum(peer_c.url, 'p2pdist_peer_blob_checks_total{how="attested"}')
            # A warm peer: A holds the whole blob, so this is the client's path alone.
            free_memory(url, workdir, 1)
            a_cpu = cpu_s(peer_a.pid)
            results["p2p_get_warm_s"], results["p2p_get_warm_client_cpu_s"] = timed_get(
                [*get, str(peer_a.proxy_url)], workdir / "a.out", layer.digest
            )
            results["p2p_get_warm_peer_cpu_s"] = cpu_s(peer_a.pid) - a_cpu
            if children:
                # A serves the blob to `children` new peers at once (B and C leave first, so A
                # is everyone's only parent); its peak memory must not grow with the blob.
                peer_c.stop()
                kids = [start_peer(workdir, scheduler.url, f"child-{i}", insecure) for i in range(children)]
                started = time.monotonic()
                jobs = [subprocess.Popen([*get, str(k.proxy_url), "-o", "/dev/null"]) for k in kids]
                codes = [job.wait() for job in jobs]
                results["children"] = children
                results["children_s"] = time.monotonic() - started
                results["parent_peak_rss_mib"] = peak_rss_mib(peer_a.pid)
                results["parent_upload_mib"] = metric_sum(peer_a.url, "p2pdist_peer_upload_bytes_total") / (1 << 20)
                for kid in kids:
                    kid.stop()
                assert codes == [0] * children, f"child pulls exited with {codes}"
        finally:
            for service in (peer_c, peer_b, peer_a, seed, scheduler):
                if service.poll() is None:
                    service.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob-size", default="1GiB")
    parser.add_argument(
        "--children",
        type=int,
        default=8,
        help="then serve the blob from peer A to this many peers at once, measuring A's memory",
    )
    parser.add_argument(
        "--verify-once",
        action="store_true",
        help="give the seed a signing key and the peers its public key (peers skip the blob's second hash)",
    )
    parser.add_argument("--out", type=Path, help="write result.json here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2pdist-throughput-") as tmp:
        r = run(parse_size(args.blob_size), Path(tmp), args.children, args.verify_once)
    r["verify_once"] = args.verify_once
    mib = r["blob_bytes"] / (1 << 20)
    print(f"blob: {mib:.0f} MiB")
    for key, label in (
        ("curl_devnull_s", "curl from origin to /dev/null"),
        ("curl_file_s", "curl from origin to a file"),
        ("p2p_download_s", "peer B from parent A, into its store (verified)"),
        ("p2p_get_s", "p2pdist get through cold peer C to a file (sha256 checked)"),
        ("p2p_get_warm_s", "p2pdist get through warm peer A to a file (sha256 checked)"),
    ):
        print(f"  {label:56s} {r[key]:6.2f} s  {mib / r[key]:7.0f} MiB/s  {r['curl_file_s'] / r[key]:.2f}x curl")
    gib = r["blob_bytes"] / (1 << 30)
    attested = f" (sha256 attested: B {r['b_attested']:.0f}, C {r['c_attested']:.0f})" if args.verify_once else ""
    print(f"  peer B: {r['p2p_download_cpu_s'] / gib:.2f} CPU-s per GiB{attested}")
    print(f"  curl to a file: {r['curl_file_cpu_s'] / gib:.2f} CPU-s per GiB")
    print(
        f"  get cold: client {r['p2p_get_client_cpu_s'] / gib:.2f}, peer C {r['p2p_get_peer_cpu_s'] / gib:.2f} CPU-s per GiB;"
        f" get warm: client {r['p2p_get_warm_client_cpu_s'] / gib:.2f}, peer A {r['p2p_get_warm_peer_cpu_s'] / gib:.2f}"
    )
    if args.children:
        print(
            f"  A served {r['children']} children at once ({r['parent_upload_mib']:.0f} MiB uploaded in all, "
            f"{r['children_s']:.1f} s); A's peak RSS {r['parent_peak_rss_mib']:.1f} MiB"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A cluster rollout on one machine: N peer daemons pull one image at once through their
mirror ports, then N clients pull it directly from the origin, both under the same origin cap.

    .venv/bin/python -m benchmarks.rollout --peers 16 --blob-size 128MiB --layers 1 \\
        --peer-upload-rate 8MiB --origin-rate 32MiB --out out/rollout

Everything is real and on loopback: the Distribution registry as origin behind a counting
relay capped at the origin rate, one scheduler, one seed (its upload also capped at the
origin rate, so seed and origin together are the server side u_s of the lower bound), and N
peers with `--upload-rate`. `--schedulers N --seeds M` run several of each; `--kill
scheduler|seed --kill-at SECONDS` SIGKILLs, that long into the P2P rollout, the scheduler
owning the largest layer or the seed that fetched the most from the origin, and leaves it dead. Each host's completion time is when its last layer's last byte
arrived through its mirror port; every blob is checked against its digest. Results are
scored against Kumar & Ross's lower bound T_min (see benchmarks/report.py).

With `--preheat`, `p2pdist preheat` first puts the image on the seed through the scheduler's
job API; the rollout then starts with the seed holding every blob, and is scored against
T_min with the seed as the only server, max(F/d, N·F/(u_seed + N·u)).

Verify once is on, as a fleet should be deployed: every seed gets one Ed25519 signing key
(`--attest-key`) and every peer its public half (`--attest-public-key`), so a peer whose
pieces all matched the digests a seed signed after its own sha256 check does not hash the
blob again. `--no-verify-once` runs without keys (every peer hashes every blob).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import trio

from benchmarks.report import (
    cpu_by_thread,
    cpu_seconds,
    lower_bound_s,
    preheated_lower_bound_s,
    summarize,
    write_results,
)
from lab.attest import attest_args
from lab.image import ImageInfo, make_oci_layout, push_image
from lab.procs import RelayProcess, Service, start_peer, start_scheduler, start_seed
from lab.registry import Origin
from p2pdist.cli.preheat import preheat
from p2pdist.cluster.rendezvous import owner
from p2pdist.config import parse_size
from p2pdist.transport.piececlient import PieceClient

REPO = "bench/rollout"
MiB = 1 << 20


class RolloutError(Exception):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def pull_image(
    client: httpx.AsyncClient,
    blobs: PieceClient,
    base: str,
    image: ImageInfo,
    params: dict[str, str],
    started: float,
    verified: list[str],
    manifest_at: list[float],
) -> float:
    """Fetch the manifest and every layer (layers at once, as runtimes do); return seconds since
    `started`, and add when the manifest had arrived to `manifest_at`.

    Layers come through the lean keep-alive client: on this one machine the 16 "runtimes" share
    the 2 cores with the daemons, and httpx would spend ~3 s of CPU per GiB the real runtimes,
    each on its own host, would not take from them.
    """
    manifest = await client.get(
        f"{base}/v2/{REPO}/manifests/{image.tag}",
        params=params,
        headers={"accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    if manifest.status_code != 200:
        raise RolloutError(f"manifest from {base}: HTTP {manifest.status_code}")
    manifest_at.append(time.monotonic() - started)
    query = f"?{urlencode(params)}" if params else ""

    async def layer(digest: str) -> None:
        sha = hashlib.sha256()
        async with blobs.get(f"{base}/v2/{REPO}/blobs/{digest}{query}") as response:
            if response.status != 200:
                raise RolloutError(f"{digest[:19]} from {base}: HTTP {response.status}")
            # Received and hashed in a thread of its own, as each runtime would on its own
            # host: in one event loop the 16 "runtimes" hashed one after another, and the
            # blob's last bytes queued behind the other hosts' hashing.
            await response.drain_in_thread(sha.update)
        if "sha256:" + sha.hexdigest() != digest:
            raise RolloutError(f"{digest[:19]} from {base} does not match its digest")
        verified.append(digest)

    async with trio.open_nursery() as nursery:
        for blob in image.layers:
            nursery.start_soon(layer, blob.digest)
    return time.monotonic() - started


async def pull_everywhere(
    bases: Sequence[str], image: ImageInfo, params: dict[str, str], timeout_s: float
) -> tuple[list[float], int, list[float]]:
    """Every host's completion time, how many blobs came out matching their digests, and when
    each host's manifest had arrived (the part of a pull before any blob)."""
    times: list[float] = [0.0] * len(bases)
    verified: list[str] = []
    manifest_at: list[float] = []
    limits = httpx.Limits(max_connections=len(bases) * (len(image.layers) + 1) + 8)
    blobs = PieceClient()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        started = time.monotonic()

        async def one(i: int, base: str) -> None:
            times[i] = await pull_image(client, blobs, base, image, params, started, verified, manifest_at)

        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for i, base in enumerate(bases):
                    nursery.start_soon(one, i, base)
    await blobs.aclose()
    return times, len(verified), sorted(manifest_at)


_SCRAPED = (
    "upload_bytes_total",
    'download_bytes_total{source="peer"}',
    'download_bytes_total{source="seed"}',
    'download_bytes_total{source="origin"}',
    'pieces_total{result="busy",source="peer"}',
    'pieces_total{result="busy",source="seed"}',
    'pieces_total{result="failed",source="peer"}',
    'pieces_total{result="verified",source="peer"}',
    "back_to_source_total",
    'blob_checks_total{how="attested"}',
    'blob_checks_total{how="hashed"}',
)


def scrape(services: Sequence[Service]) -> dict[str, dict[str, float]]:
    """Per host, the counters that explain a result: who uploaded, busy answers, failures."""
    out: dict[str, dict[str, float]] = {}
    for service in services:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            name = key.split("_", 2)[-1] if key.startswith("p2pdist_") else key
            if name in _SCRAPED or any(name.startswith(s.split("{")[0]) and s in name for s in _SCRAPED):
                values[name] = values.get(name, 0.0) + float(value)
        out[service.name] = values
    return out


class UploadSampler:
    """With --timeline: every 0.5 s, the upload counters of the seed and every peer, summed, so
    the report can show how much of the swarm's upload capacity was in use over time."""

    def __init__(self, services: Sequence[Service], capacity_bps: float, interval_s: float = 0.5) -> None:
        self.urls = [urlsplit(s.url) for s in services]
        self.capacity_bps = capacity_bps
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UploadSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _total(self) -> float:
        total = 0.0
        for url in self.urls:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                for line in conn.getresponse().read().decode().splitlines():
                    if line.startswith("p2pdist_") and "_upload_bytes_total " in line:
                        total += float(line.rsplit(" ", 1)[1])
            except OSError:
                pass
            finally:
                conn.close()
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s if self.samples else 0):
            self.samples.append((time.monotonic() - self._started, self._total()))

    def utilization(self) -> list[tuple[float, float]]:
        """(seconds since the start, share of u_s + N·u in use over the interval ending there)."""
        out = []
        for (t0, b0), (t1, b1) in zip(self.samples, self.samples[1:], strict=False):
            out.append((round(t1, 2), round((b1 - b0) / (t1 - t0) / self.capacity_bps, 3)))
        return out


class Killer:
    """SIGKILLs one service `at_s` seconds after `start()`, from a thread, and says whom and when."""

    def __init__(self, at_s: float, choose: Any) -> None:
        self.at_s = at_s
        self.choose = choose  # () -> Service
        self.killed: dict[str, Any] = {}
        self._timer = threading.Timer(at_s, self._kill)

    def start(self) -> None:
        self._started = time.monotonic()
        self._timer.start()

    def _kill(self) -> None:
        victim = self.choose()
        victim.kill()
        self.killed = {"name": victim.name, "url": victim.url, "at_s": round(time.monotonic() - self._started, 2)}
        log(f"killed {victim.name} ({victim.url}) {self.killed['at_s']:.1f}s into the rollout")

    def cancel(self) -> None:
        self._timer.cancel()


def _peers_by_thread(before: dict[int, dict[str, float]], gone: set[int]) -> dict[str, float]:
    """The peers' CPU seconds since `before`, summed over the peers still running and split by
    thread (benchmarks.report.cpu_by_thread): the event loops' per-request Python against the
    worker threads' receiving, hashing and page-cache writes."""
    total = dict.fromkeys(next(iter(before.values()), {}), 0.0)
    for pid, then in before.items():
        if pid in gone:
            continue
        for key, value in cpu_by_thread(pid).items():
            total[key] += value - then[key]
    return {key: round(value, 1) for key, value in total.items()}


def _origin_bytes(seed: Service) -> float:
    if seed.poll() is not None:
        return -1.0
    text = httpx.get(f"{seed.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('p2pdist_seed_download_bytes_total{source="origin"}')
    )


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    blob_bytes = parse_size(args.blob_size)
    origin_bps = parse_size(args.origin_rate)
    upload_bps = parse_size(args.peer_upload_rate)
    per_layer = blob_bytes // args.layers
    log(f"generating an image of {args.layers} layer(s), {blob_bytes / MiB:.0f} MiB in all")
    image = make_oci_layout(workdir / "layout", [per_layer] * args.layers, seed=args.seed)
    total = image.total_layer_bytes
    with ExitStack() as stack:
        origin = stack.enter_context(Origin(workdir=workdir / "origin"))
        push_image(image, origin.host, REPO)
        relay = stack.enter_context(RelayProcess(workdir, origin.host, rate_bps=origin_bps))
        insecure = ["--insecure-registry", relay.host]
        services: list[Service] = []
        stack.callback(lambda: [s.stop() for s in reversed(services) if s.poll() is None])
        schedulers = [
            start_scheduler(
                workdir,
                extra_args=shlex.split(args.scheduler_args),
                name="scheduler" if i == 0 else f"scheduler{i}",
            )
            for i in range(args.schedulers)
        ]
        services.extend(schedulers)
        scheduler = schedulers[0]
        more = [arg for s in schedulers[1:] for arg in ("--scheduler", s.url)]
        # One key for every seed: a peer may take any seed's word (the README's guarantees).
        seed_keys, peer_keys = attest_args(workdir) if args.verify_once else ([], [])
        seeds = [
            start_seed(
                workdir,
                scheduler.url,
                "seed" if i == 0 else f"seed{i}",
                extra_args=[
                    *more,
                    *insecure,
                    *seed_keys,
                    "--upload-rate",
                    args.origin_rate,
                    "--log-level",
                    "warning",
                    *shlex.split(args.seed_args),
                ],
            )
            for i in range(args.seeds)
        ]
        services.extend(seeds)
        peer_args = [
            *more,
            *insecure,
            *peer_keys,
            "--upload-rate",
            args.peer_upload_rate,
            "--log-level",
            "warning",
            *shlex.split(args.peer_args),
        ]
        if args.peer_download_rate:
            peer_args += ["--download-rate", args.peer_download_rate]
        peers = [start_peer(workdir, scheduler.url, f"peer-{i:03d}", peer_args, wait=False) for i in range(args.peers)]
        services.extend(peers)
        for peer in peers:
            peer.wait_healthy()
        preheated: dict[str, float] = {}
        if args.preheat:
            before = relay.downstream_bytes()
            started = time.monotonic()
            preheat(
                f"{relay.host}/{REPO}:{image.tag}",
                scheduler.url,
                platforms=[],
                plain_http=True,
                wait=True,
                quiet=True,
                timeout_s=args.timeout,
                out=io.StringIO(),
            )
            preheated = {
                "seconds": round(time.monotonic() - started, 2),
                "origin_bytes": relay.downstream_bytes() - before,
            }
            log(
                f"preheated the seed in {preheated['seconds']:.2f}s, origin sent {preheated['origin_bytes'] / MiB:.1f} MiB"
            )
        log(f"{args.peers} peers up; p2p rollout starts")
        before = relay.downstream_bytes()
        roles = {
            "origin": [origin.pid],
            "relay": [relay.service.pid],
            "scheduler": [s.pid for s in schedulers],
            "seed": [s.pid for s in seeds],
            "peers": [p.pid for p in peers],
        }
        killer = None
        if args.kill == "scheduler":
            largest = max(image.layers, key=lambda layer: layer.size).digest
            doomed = owner(largest, [s.url for s in schedulers])
            killer = Killer(args.kill_at, lambda: next(s for s in schedulers if s.url == doomed))
        elif args.kill == "seed":
            killer = Killer(args.kill_at, lambda: max(seeds, key=_origin_bytes))
        cpu_before = {pid: cpu_seconds(pid) for pids in roles.values() for pid in pids}
        peers_before = {p.pid: cpu_by_thread(p.pid) for p in peers}
        harness_before = time.process_time()
        with ExitStack() as sampling:
            sampler = None
            if args.timeline:
                sampler = sampling.enter_context(UploadSampler([*seeds, *peers], origin_bps + args.peers * upload_bps))
            if killer is not None:
                killer.start()
                sampling.callback(killer.cancel)
            p2p, p2p_verified, p2p_manifests = trio.run(
                pull_everywhere, [str(p.proxy_url) for p in peers], image, {"ns": relay.host}, args.timeout
            )
        # A killed process's CPU is no longer readable: it counts for nothing.
        gone = {s.pid for s in services if s.poll() is not None}
        cpu = {
            role: round(sum(cpu_seconds(pid) - cpu_before[pid] for pid in pids if pid not in gone), 1)
            for role, pids in roles.items()
        }
        cpu["clients"] = round(time.process_time() - harness_before, 1)
        peer_threads = _peers_by_thread(peers_before, gone)
        p2p_origin = relay.downstream_bytes() - before
        log("p2p CPU seconds by role: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
        log(
            f"peers' CPU seconds by thread: event loops {peer_threads['event_loop_user']} user + "
            f"{peer_threads['event_loop_system']} system, worker threads {peer_threads['workers_user']} user + "
            f"{peer_threads['workers_system']} system"
        )
        detail = scrape([*(s for s in seeds if s.poll() is None), *peers])
        attested = sum(detail[p.name].get('blob_checks_total{how="attested"}', 0.0) for p in peers)
        hashed = sum(detail[p.name].get('blob_checks_total{how="hashed"}', 0.0) for p in peers)
        log(f"blob sha256: {attested:.0f} skipped on a seed's attestation, {hashed:.0f} hashed by the peer")
        log(
            f"p2p: p50 {sorted(p2p)[len(p2p) // 2]:.2f}s, slowest {max(p2p):.2f}s, origin sent {p2p_origin / MiB:.1f} MiB; "
            f"manifests in {p2p_manifests[0]:.2f}-{p2p_manifests[-1]:.2f}s"
        )
        direct: list[float] = []
        direct_origin = direct_verified = 0
        if not args.skip_direct:
            before = relay.downstream_bytes()
            direct, direct_verified, _ = trio.run(pull_everywhere, [relay.url] * args.peers, image, {}, args.timeout)
            direct_origin = relay.downstream_bytes() - before
            log(
                f"direct: p50 {sorted(direct)[len(direct) // 2]:.2f}s, slowest {max(direct):.2f}s, "
                f"origin sent {direct_origin / MiB:.1f} MiB"
            )
    download_bps = parse_size(args.peer_download_rate) if args.peer_download_rate else float("inf")
    if args.preheat:
        # The seed's upload is capped at the origin rate: it is u_seed.
        bound = preheated_lower_bound_s(args.peers, total, origin_bps, upload_bps, download_bps)
    else:
        bound = lower_bound_s(args.peers, total, origin_bps, upload_bps, download_bps)
    result: dict[str, Any] = {
        "title": f"Rollout: {args.peers} hosts, {total / MiB:.0f} MiB image in {args.layers} layer(s)"
        + (", seed preheated" if args.preheat else ""),
        "command": "python -m benchmarks.rollout " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "peers": args.peers,
        "layers": args.layers,
        "blob_bytes": total,
        "origin_rate_bps": origin_bps,
        "peer_upload_rate_bps": upload_bps,
        "lower_bound_s": bound,
        "direct_lower_bound_s": max(args.peers * total / origin_bps, total / download_bps),
        "p2p": summarize(p2p, p2p_origin)
        | {"blobs_verified": p2p_verified, "manifest_at_s": [round(t, 3) for t in p2p_manifests]},
        "p2p_detail": detail,
        "schedulers": args.schedulers,
        "seeds": args.seeds,
        "verify_once": args.verify_once,
        **({"killed": killer.killed | {"kind": args.kill}} if killer is not None and killer.killed else {}),
        "p2p_cpu_s": cpu,
        "p2p_peer_cpu_by_thread_s": peer_threads,
        **({"preheat": preheated} if preheated else {}),
        **(
            {"p2p_upload_utilization": sampler.utilization(), "p2p_upload_samples": sampler.samples}
            if sampler is not None
            else {}
        ),
    }
    if direct:
        result["direct"] = summarize(direct, direct_origin) | {"blobs_verified": direct_verified}
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--blob-size", default="128MiB", help="total bytes of the image's layers")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--peer-upload-rate", default="8MiB")
    parser.add_argument("--peer-download-rate", default="", help="cap on each peer's download (default none)")
    parser.add_argument("--origin-rate", default="32MiB")
    parser.add_argument("--peer-args", default="", help="extra flags for every peer daemon")
    parser.add_argument("--seed-args", default="", help="extra flags for every seed")
    parser.add_argument(
        "--scheduler-args",
        default="",
        help="extra flags for every scheduler (--scheduler-args='--min-piece-bytes 4MiB': the old piece layout)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated image's bytes")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--skip-direct", action="store_true")
    parser.add_argument(
        "--no-verify-once",
        dest="verify_once",
        action="store_false",
        help="give the seed no signing key: every peer hashes every blob (by default peers skip the "
        "blob's sha256 when a seed signed the piece digests after its own check)",
    )
    parser.add_argument(
        "--preheat", action="store_true", help="preheat the seed with `p2pdist preheat` before the rollout"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="sample the swarm's upload every 0.5 s into result.json (costs a little CPU)",
    )
    parser.add_argument("--schedulers", type=int, default=1, help="schedulers to run (every host is given all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run")
    parser.add_argument(
        "--kill",
        choices=("scheduler", "seed"),
        help="SIGKILL the scheduler owning the largest layer, or the seed that fetched the most, --kill-at into the run",
    )
    parser.add_argument("--kill-at", type=float, default=0.0, help="seconds into the P2P rollout for --kill")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.peers < 1 or args.layers < 1 or args.schedulers < 1 or args.seeds < 1:
        parser.error("--peers, --layers, --schedulers and --seeds must be at least 1")
    if args.kill == "seed" and args.seeds < 2:
        parser.error("--kill seed needs --seeds 2 or more (with one seed the rest goes to the origin)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.keep:
        tmp = tempfile.mkdtemp(prefix="p2pdist-rollout-")
        log(f"keeping logs and data in {tmp}")
        result = run(args, Path(tmp))
    else:
        with tempfile.TemporaryDirectory(prefix="p2pdist-rollout-") as tmp:
            result = run(args, Path(tmp))
    result["runtime_s"] = round(time.monotonic() - started, 1)
    write_results(args.out, result)
    bound = result["lower_bound_s"]
    p2p = result["p2p"]
    print(
        f"T_min {bound:.2f}s | p2p p50 {p2p['p50_s']:.2f}s ({p2p['p50_s'] / bound:.2f}x) "
        f"p99 {p2p['p99_s']:.2f}s ({p2p['p99_s'] / bound:.2f}x) origin {p2p['origin_bytes'] / result['blob_bytes']:.2f}F"
    )
    if "direct" in result:
        d = result["direct"]
        print(
            f"direct p50 {d['p50_s']:.2f}s p99 {d['p99_s']:.2f}s origin {d['origin_bytes'] / result['blob_bytes']:.2f}F; "
            f"p2p p50 is {d['p50_s'] / p2p['p50_s']:.1f}x faster"
        )
    print(f"wrote {args.out}/result.json, report.md, cdf.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: one image pulled by 8 p2pdist peers at once, then by 8 direct clients.

Everything is real and local: a Distribution registry as origin behind a counting relay,
skopeo to push, separate scheduler/seed/peer processes. Reports time per host and origin bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lab import LabError
from lab.image import Blob, ImageInfo, make_oci_layout, push_image
from lab.procs import (
    RelayProcess,
    Service,
    p2pdist_executable,
    start_peer,
    start_scheduler,
    start_seed,
)
from lab.registry import Origin

MiB = 1 << 20
REPO = "demo/app"
DEFAULT_LAYERS_MIB = "160,96,48"
DEFAULT_PEERS = 8
# An origin shared by a cluster is the scarce thing P2P exists to spare. On loopback it is
# nearly free, so the demo caps it (both runs alike); --origin-rate-bps 0 shows the uncapped case.
DEFAULT_ORIGIN_RATE_BPS = 50 * MiB
PULL_TIMEOUT_S = 600.0
_T0 = time.monotonic()


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def step(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


@dataclass(frozen=True)
class PullResult:
    """One host's pull of every layer: wall time and where the files landed."""

    host: str
    seconds: float
    files: tuple[tuple[Blob, Path], ...]


def blob_url(registry_url: str, blob: Blob) -> str:
    return f"{registry_url}/v2/{REPO}/blobs/{blob.digest}"


async def _run_checked(argv: Sequence[str], what: str) -> None:
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip().splitlines()
        detail = stderr[-1] if stderr else "no output"
        raise DemoError(f"{what} exited with {result.returncode}: {detail}")


async def _pull_layers(host: str, commands: Sequence[tuple[Blob, Path, list[str]]]) -> PullResult:
    """Run one host's download commands, all layers at once as docker and containerd do,
    and time the whole."""
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for blob, _, argv in commands:
            nursery.start_soon(_run_checked, argv, f"{host} pulling {blob.digest[:19]}")
    files = tuple((blob, path) for blob, path, _ in commands)
    return PullResult(host, time.monotonic() - started, files)


async def pull_all(jobs: dict[str, list[tuple[Blob, Path, list[str]]]]) -> list[PullResult]:
    """All hosts at once; each host's layers at once."""
    results: list[PullResult] = []

    async def one(host: str) -> None:
        results.append(await _pull_layers(host, jobs[host]))

    with trio.fail_after(PULL_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for host in jobs:
                nursery.start_soon(one, host)
    return sorted(results, key=lambda result: list(jobs).index(result.host))


def verify_and_remove(results: Sequence[PullResult]) -> None:
    """Check every pulled file's sha256 against its digest, then delete it to save disk."""
    for result in results:
        for blob, path in result.files:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 * MiB):
                    sha.update(chunk)
            if f"sha256:{sha.hexdigest()}" != blob.digest:
                raise DemoError(f"{result.host}: {path.name} does not match {blob.digest}")
            path.unlink()


def p2p_jobs(
    peers: Sequence[Service], image: ImageInfo, registry_url: str, out_dir: Path
) -> dict[str, list[tuple[Blob, Path, list[str]]]]:
    exe = str(p2pdist_executable())
    jobs: dict[str, list[tuple[Blob, Path, list[str]]]] = {}
    for peer in peers:
        assert peer.proxy_url is not None
        (out_dir / peer.name).mkdir(parents=True)
        jobs[peer.name] = []
        for index, layer in enumerate(image.layers):
            path = out_dir / peer.name / f"layer-{index}"
            argv = [
                exe,
                "get",
                blob_url(registry_url, layer),
                "-o",
                str(path),
                "--peer",
                peer.proxy_url,
            ]
            jobs[peer.name].append((layer, path, argv))
    return jobs


def direct_jobs(
    clients: int, image: ImageInfo, registry_url: str, out_dir: Path
) -> dict[str, list[tuple[Blob, Path, list[str]]]]:
    jobs: dict[str, list[tuple[Blob, Path, list[str]]]] = {}
    for number in range(clients):
        host = f"client-{number}"
        (out_dir / host).mkdir(parents=True)
        jobs[host] = []
        for index, layer in enumerate(image.layers):
            path = out_dir / host / f"layer-{index}"
            argv = [
                "curl",
                "--fail",
                "--silent",
                "--show-error",
                "-o",
                str(path),
                blob_url(registry_url, layer),
            ]
            jobs[host].append((layer, path, argv))
    return jobs


def check_p2pdist_cli() -> None:
    exe = p2pdist_executable()
    if not exe.exists():
        raise DemoError(f"{exe} not found: run `make setup` (or pass --skip-p2p)")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"`p2pdist --help` failed: {last} (pass --skip-p2p to run without it)")


def start_p2p(
    stack: contextlib.ExitStack,
    workdir: Path,
    peers: int,
    origin_host: str,
    peer_args: Sequence[str],
) -> list[Service]:
    """Scheduler, seed and peers as processes; all stopped when `stack` closes.

    `origin_host` (the relay) is the registry they all pull from, over plain HTTP.
    """
    insecure = ["--insecure-registry", origin_host]
    scheduler = stack.enter_context(start_scheduler(workdir))
    step(f"scheduler up at {scheduler.url} (pid {scheduler.pid})")
    seed = stack.enter_context(start_seed(workdir, scheduler.url, extra_args=insecure))
    step(f"seed up at {seed.url} (pid {seed.pid})")
    services = [
        stack.enter_context(start_peer(workdir, scheduler.url, f"peer-{n}", [*insecure, *peer_args], wait=False))
        for n in range(peers)
    ]
    for peer in services:
        peer.wait_healthy()
    step(f"{peers} peers up (proxies on {services[0].proxy_url}, ...)")
    return services


def report(
    image: ImageInfo,
    p2p: list[PullResult] | None,
    p2p_origin_bytes: int | None,
    direct: list[PullResult],
    direct_origin_bytes: int,
    origin_rate_bps: int | None = None,
) -> None:
    size = image.total_layer_bytes
    print()
    cap = f"origin capped at {mib(origin_rate_bps)}/s" if origin_rate_bps else "origin uncapped"
    print(f"image {REPO}:{image.tag}  {len(image.layers)} layers, {mib(size)}; {cap}")
    rows = max(len(direct), len(p2p or []))
    print(f"{'#':>3}  {'p2p host':<10} {'p2p s':>8}   {'direct host':<11} {'direct s':>8}")
    for row in range(rows):
        left = f"{p2p[row].host:<10} {p2p[row].seconds:8.2f}" if p2p and row < len(p2p) else " " * 19
        right = f"{direct[row].host:<11} {direct[row].seconds:8.2f}" if row < len(direct) else ""
        print(f"{row:>3}  {left}   {right}")
    if p2p and p2p_origin_bytes is not None:
        worst = max(r.seconds for r in p2p)
        print(
            f"p2p:    slowest host {worst:6.2f} s, "
            f"origin sent {mib(p2p_origin_bytes)} ({p2p_origin_bytes / size:.2f}x image)"
        )
    worst_direct = max(r.seconds for r in direct)
    print(
        f"direct: slowest host {worst_direct:6.2f} s, "
        f"origin sent {mib(direct_origin_bytes)} ({direct_origin_bytes / size:.2f}x image)"
    )


def run(args: argparse.Namespace) -> None:
    layer_sizes = [int(float(part) * MiB) for part in args.layers_mib.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="p2pdist-demo-"))
    with contextlib.ExitStack() as stack:
        if args.keep:
            stack.callback(print, f"kept {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        if not args.skip_p2p:
            check_p2pdist_cli()

        origin = stack.enter_context(Origin(workdir=workdir / "origin"))
        step(f"origin registry up at {origin.url} (pid {origin.pid})")
        relay = stack.enter_context(RelayProcess(workdir, origin.host, rate_bps=args.origin_rate_bps or None))
        rate = f", capped at {mib(args.origin_rate_bps)}/s" if args.origin_rate_bps else ""
        step(f"counting relay {relay.url} -> origin{rate}")

        step(f"generating image: layers of {args.layers_mib} MiB")

        def progress(index: int, blob: Blob) -> None:
            step(f"  layer {index}: {mib(blob.size)} {blob.digest[:19]}")

        image = make_oci_layout(workdir / "layout", layer_sizes, seed=args.seed, progress=progress)
        push_image(image, origin.host, REPO)
        step(f"pushed {origin.host}/{REPO}:{image.tag} with skopeo ({mib(image.total_layer_bytes)})")

        p2p_results: list[PullResult] | None = None
        p2p_origin_bytes: int | None = None
        if not args.skip_p2p:
            peers = start_p2p(stack, workdir, args.peers, relay.host, shlex.split(args.peer_args))
            step(f"p2p: {args.peers} peers pulling {len(image.layers)} layers each, all at once")
            before = relay.downstream_bytes()
            jobs = p2p_jobs(peers, image, relay.url, workdir / "out-p2p")
            p2p_results = trio.run(pull_all, jobs)
            p2p_origin_bytes = relay.downstream_bytes() - before
            verify_and_remove(p2p_results)
            step(f"p2p: done, every file matches its digest; origin sent {mib(p2p_origin_bytes)}")

        step(f"direct: {args.peers} clients (curl) pulling from the origin, all at once")
        before = relay.downstream_bytes()
        jobs = direct_jobs(args.peers, image, relay.url, workdir / "out-direct")
        direct_results = trio.run(pull_all, jobs)
        direct_origin_bytes = relay.downstream_bytes() - before
        verify_and_remove(direct_results)
        step(f"direct: done, every file matches its digest; origin sent {mib(direct_origin_bytes)}")

        report(image, p2p_results, p2p_origin_bytes, direct_results, direct_origin_bytes, args.origin_rate_bps)
        step("stopping processes")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__)
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS, help="peers and direct clients")
    parser.add_argument("--layers-mib", default=DEFAULT_LAYERS_MIB, help="layer sizes, comma-separated")
    parser.add_argument("--seed", type=int, default=1, help="image content seed")
    parser.add_argument(
        "--origin-rate-bps",
        type=int,
        default=DEFAULT_ORIGIN_RATE_BPS,
        help="cap the origin's upload, as a registry a whole cluster pulls from is capped "
        "(default 50 MiB/s; 0: uncapped, where loopback makes the origin nearly free)",
    )
    parser.add_argument("--peer-args", default="", help="extra peer flags, e.g. '--upload-rate 8MiB'")
    parser.add_argument("--skip-p2p", action="store_true", help="only origin, push and direct pull")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. make being stopped) unwinds like Ctrl-C, so every child is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args)
    except (DemoError, LabError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

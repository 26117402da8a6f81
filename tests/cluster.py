"""A real p2pdist cluster for end-to-end tests: scheduler, seeds and peers as separate
processes, pulling from the real Distribution origin through a counting relay."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx

from lab import procs
from lab.procs import RelayProcess, Service


def p2pdist_bin() -> str:
    return str(Path(sys.executable).parent / "p2pdist")


class Cluster:
    def __init__(self, workdir: Path, origin_host: str, *, seeds: int = 1, seed_args: Sequence[str] = (),
                 relay_rate_bps: int | None = None) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self.relay = RelayProcess(workdir, origin_host, rate_bps=relay_rate_bps)
        self.scheduler = self._own(procs.start_scheduler(workdir))
        self.seeds = [self._own(procs.start_seed(workdir, self.scheduler.url, f"seed{i}", extra_args=seed_args))
                      for i in range(seeds)]
        self.peers: list[Service] = []

    def _own(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def add_peers(self, count: int, extra_args: Sequence[str] = ()) -> list[Service]:
        new = [self._own(procs.start_peer(self.workdir, self.scheduler.url, f"peer{len(self.peers) + i}", extra_args))
               for i in range(count)]
        self.peers.extend(new)
        return new

    def blob_url(self, repo: str, digest: str) -> str:
        return f"{self.relay.url}/v2/{repo}/blobs/{digest}"

    def start_get(self, peer: Service, url: str, out: Path, *extra: str) -> subprocess.Popen[str]:
        assert peer.proxy_url is not None
        return subprocess.Popen([p2pdist_bin(), "get", url, "-o", str(out), "--peer", peer.proxy_url, "-q", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pull_all(self, peers: Iterable[Service], url: str, tag: str, timeout: float = 120) -> list[Path]:
        """Pull `url` through every peer at once; assert each exits 0; return the files."""
        jobs = []
        for peer in peers:
            out = self.workdir / f"{tag}-{peer.name}.blob"
            jobs.append((out, self.start_get(peer, url, out)))
        outs = []
        for out, job in jobs:
            _, err = job.communicate(timeout=timeout)
            assert job.returncode == 0, f"p2pdist get failed: {err.strip()}"
            outs.append(out)
        return outs

    def stop(self) -> None:
        for service in reversed(self.services):
            if service.poll() is None:
                service.stop()
        self.relay.stop()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def metric(service_url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose name and label text match."""
    text = httpx.get(f"{service_url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if (key == name or key.startswith(name + "{")) and labels in key:
            total += float(value)
    return total

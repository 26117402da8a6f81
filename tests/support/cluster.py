"""A real p2pdist cluster for the integration and end-to-end tests: scheduler, seeds and peers
as separate processes, pulling from the real Distribution origin through a counting relay;
restarting one of its services in place, and polling for a condition."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from lab import Stoppable, procs
from lab.procs import RelayProcess, Service
from tests.support.metrics import metric

MiB = 1 << 20


def p2pdist_bin() -> str:
    return str(Path(sys.executable).parent / "p2pdist")


class Cluster(Stoppable):
    def __init__(
        self,
        workdir: Path,
        origin_host: str,
        *,
        seeds: int = 1,
        seed_args: Sequence[str] = (),
        relay_rate_bps: int | None = None,
        scheduler_args: Sequence[str] = (),
        schedulers: int = 1,
    ) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self.relay = RelayProcess(workdir, origin_host, rate_bps=relay_rate_bps)
        self.schedulers = [
            self._own(
                procs.start_scheduler(
                    workdir, extra_args=scheduler_args, name="scheduler" if i == 0 else f"scheduler{i}"
                )
            )
            for i in range(schedulers)
        ]
        self.scheduler = self.schedulers[0]
        self.seeds = [
            self._own(
                procs.start_seed(
                    workdir, self.scheduler.url, f"seed{i}", extra_args=[*self.more_schedulers(), *seed_args]
                )
            )
            for i in range(seeds)
        ]
        self.peers: list[Service] = []

    def more_schedulers(self) -> list[str]:
        """`--scheduler` flags for every scheduler past the first (start_* passes the first)."""
        return [arg for s in self.schedulers[1:] for arg in ("--scheduler", s.url)]

    def _own(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def add_peers(self, count: int, extra_args: Sequence[str] = ()) -> list[Service]:
        new = [
            self._own(
                procs.start_peer(
                    self.workdir,
                    self.scheduler.url,
                    f"peer{len(self.peers) + i}",
                    [*self.more_schedulers(), *extra_args],
                )
            )
            for i in range(count)
        ]
        self.peers.extend(new)
        return new

    def wait_announced(self, timeout: float = 20) -> None:
        """Until the first scheduler knows every peer: the piece size of a blob follows the
        upload cap of the host asking first, which the scheduler learns from its announce."""
        want = len(self.peers)
        wait_until(
            lambda: metric(self.scheduler.url, "p2pdist_scheduler_hosts", 'kind="peer"') >= want,
            timeout,
            f"the scheduler to know {want} peer(s)",
        )

    def blob_url(self, repo: str, digest: str) -> str:
        return f"{self.relay.url}/v2/{repo}/blobs/{digest}"

    def start_get(self, peer: Service, url: str, out: Path, *extra: str) -> subprocess.Popen[str]:
        assert peer.proxy_url is not None
        return subprocess.Popen(
            [p2pdist_bin(), "get", url, "-o", str(out), "--peer", peer.proxy_url, "-q", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

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


class ClusterFactory(Protocol):
    """The `cluster_factory` fixture: clusters on the session's origin, all stopped after the test."""

    def __call__(
        self,
        *,
        seeds: int = 1,
        seed_args: Sequence[str] = (),
        relay_rate_bps: int | None = None,
        schedulers: int = 1,
    ) -> Cluster: ...


def restart(cluster: Cluster, old: Service, extra_args: Sequence[str] = ()) -> Service:
    """Start `old` again with the same command line (same ports, same data dir), plus
    `extra_args`, and wait for it."""
    assert old.poll() is not None, f"{old.name} still runs"
    new = Service(old.name, [*old.argv, *extra_args], old.log_path, old.url, proxy_url=old.proxy_url)
    cluster.services[cluster.services.index(old)] = new
    for group in (cluster.peers, cluster.seeds, cluster.schedulers):
        if old in group:
            group[group.index(old)] = new
    if cluster.scheduler is old:
        cluster.scheduler = new
    try:
        new.wait_healthy(60)
    except BaseException:
        new.stop()
        raise
    return new


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()

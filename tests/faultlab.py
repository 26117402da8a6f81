"""Helpers shared by the fault, restart and eviction tests: a cluster fixture body, restarting
a service process in place, polling for a condition, and a fake untrusted peer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from p2pdist.lab.origin import Origin
from p2pdist.lab.procs import Service
from tests.cluster import Cluster

MiB = 1 << 20


def make_clusters(origin: Origin, workdir: Path) -> Iterator[type[Cluster]]:
    """The body of a `cluster_factory` fixture: clusters built on `origin`, all stopped after."""
    made: list[Cluster] = []

    class Made(Cluster):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(workdir, origin.host, *args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Made
    for cluster in made:
        cluster.stop()


def restart(cluster: Cluster, old: Service) -> Service:
    """Start `old` again with the same command line (same ports, same data dir) and wait for it."""
    assert old.poll() is not None, f"{old.name} still runs"
    new = Service(old.name, old.argv, old.log_path, old.url, proxy_url=old.proxy_url)
    cluster.services[cluster.services.index(old)] = new
    for group in (cluster.peers, cluster.seeds):
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

"""A scheduler, a seed and a peer started in the test's own trio run on port 0, for tests that
need to reach into services (bad input, cluster secret, TLS) without a process per role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pdist.config import PeerConfig, SchedulerConfig, SeedConfig
from peer.daemon import serve as serve_peer
from scheduler.service import serve as serve_scheduler
from seed.daemon import serve as serve_seed


@dataclass
class InProcessCluster:
    scheduler_url: str
    seed_url: str
    peer_url: str
    proxy_url: str
    seed_dir: Path
    peer_dir: Path


def _url(scheme: str, bound: tuple[str, int]) -> str:
    return f"{scheme}://{bound[0]}:{bound[1]}"


async def start_cluster(nursery: trio.Nursery, workdir: Path, *, tls: bool = False, **common: Any) -> InProcessCluster:
    """Start the three roles; `common` config fields (e.g. cluster_secret, tls_cert) go to all."""
    scheme = "https" if tls else "http"
    # The lab's registries are on loopback (as lab.procs allows them for process clusters).
    allowed = ("127.0.0.1",)
    scheduler_bound = await nursery.start(
        serve_scheduler, SchedulerConfig(listen="127.0.0.1:0", allowed_registries=allowed, **common)
    )
    scheduler_url = _url(scheme, scheduler_bound)
    seed_dir, peer_dir = workdir / "seed-data", workdir / "peer-data"
    seed_config = SeedConfig(
        listen="127.0.0.1:0", scheduler=(scheduler_url,), data_dir=str(seed_dir), allowed_registries=allowed, **common
    )
    seed_bound = await nursery.start(serve_seed, seed_config)
    peer_config = PeerConfig(
        listen="127.0.0.1:0", proxy_listen="127.0.0.1:0", scheduler=(scheduler_url,), data_dir=str(peer_dir), **common
    )
    peer_bound, proxy_bound = await nursery.start(serve_peer, peer_config)
    return InProcessCluster(
        scheduler_url, _url(scheme, seed_bound), _url(scheme, peer_bound), _url("http", proxy_bound), seed_dir, peer_dir
    )

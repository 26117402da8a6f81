"""`p2pdist status` against real services: the scheduler's cluster view and a peer's own
view after a known pull, as JSON and as a table, and the cluster secret required where set."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx

from lab import procs
from tests.support.cluster import ClusterFactory, p2pdist_bin, wait_until
from tests.support.origin import PushToOrigin

MiB = 1 << 20


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [p2pdist_bin(), "status", *args], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


def test_status_shows_the_cluster_and_a_peer_after_a_pull(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    cluster = cluster_factory()
    image = push_to_origin((9 * MiB,), 165, "status/app")
    layer = image.layers[0]
    (peer,) = cluster.add_peers(1, ("--insecure-registry", cluster.relay.host))
    cluster.wait_announced()
    cluster.pull_all([peer], cluster.blob_url("status/app", layer.digest), "status")

    def cluster_view() -> Any:
        result = status("--scheduler", cluster.scheduler.url, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    wait_until(
        lambda: any(t["task_id"] == layer.digest and t["done"] >= 2 for t in cluster_view()["tasks"]),
        15,
        "the scheduler to count the seed and the peer as done",
    )
    view = cluster_view()
    kinds = sorted(h["kind"] for h in view["hosts"])
    assert kinds == ["peer", "seed"]
    (task,) = [t for t in view["tasks"] if t["task_id"] == layer.digest]
    assert task["size"] == layer.size and task["holders"] == 2 and task["in_progress"] == 0

    result = status("--peer", peer.url, "--json")
    assert result.returncode == 0, result.stderr
    mine = json.loads(result.stdout)
    assert mine["role"] == "peer" and mine["cache"]["used_bytes"] == layer.size
    (held,) = mine["tasks"]
    assert held["task_id"] == layer.digest and held["complete"] and held["held_bytes"] == layer.size

    table = status("--scheduler", cluster.scheduler.url)
    assert table.returncode == 0
    assert f"{layer.digest[:19]}  9.0 MiB" in table.stdout and "LAST SEEN" in table.stdout
    table = status("--peer", peer.url)
    assert table.returncode == 0 and "9.0 MiB" in table.stdout and "3/3" in table.stdout  # 4 MiB pieces

    # Read-only.
    assert httpx.post(f"{cluster.scheduler.url}/v1/status", timeout=5).status_code == 405
    assert httpx.post(f"{peer.url}/v1/status", timeout=5).status_code == 405


def test_status_needs_the_cluster_secret_where_one_is_set(tmp_path: Path) -> None:
    secret = "status-secret-0123456789"
    env = {**os.environ, "P2PDIST_CLUSTER_SECRET": secret}
    scheduler = procs.Service(
        "scheduler",
        [p2pdist_bin(), "scheduler", "--listen", "127.0.0.1:0"],
        tmp_path / "s.log",
        "",
        env=env,
    )
    try:
        wait_until(lambda: "serving HTTP on" in scheduler.log_path.read_text(), 30, "the scheduler to listen")
        port = scheduler.log_path.read_text().split("serving HTTP on 127.0.0.1:")[1].split()[0]
        url = f"http://127.0.0.1:{port}"
        without = {k: v for k, v in os.environ.items() if k != "P2PDIST_CLUSTER_SECRET"}
        refused = status("--scheduler", url, env=without)
        assert refused.returncode == 1
        assert refused.stderr.strip().endswith("401: set P2PDIST_CLUSTER_SECRET to the cluster secret")
        allowed = status("--scheduler", url, "--json", env=env)
        assert allowed.returncode == 0 and json.loads(allowed.stdout)["hosts"] == []
        assert secret not in allowed.stdout + allowed.stderr
    finally:
        scheduler.stop()

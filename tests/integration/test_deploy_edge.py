"""deploy/edge rendered by the tools an operator runs: `kubectl kustomize` builds the site
overlay and the core-mirror overlay on top of deploy/kubernetes (offline, no cluster), every
rendered object passes the Kubernetes schemas, and Debian's docker-compose reads the edge
box's compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def kustomize(tmp_path: Path, overlay: str) -> list[dict[str, Any]]:
    """The overlay rendered from a copy of deploy/ holding a cluster-secret file (not in git)."""
    tool = shutil.which("kubectl")
    assert tool, "kubectl missing: scripts/setup.sh installs it"
    copy = tmp_path / "deploy"
    for part in ("kubernetes", "edge"):
        shutil.copytree(DEPLOY / part, copy / part)
    (copy / "kubernetes" / "cluster-secret").write_text("a-generated-secret-0123456789")
    result = subprocess.run(
        [tool, "kustomize", str(copy / "edge" / overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def named(rendered: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in rendered if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("overlay", ["site", "core-mirror"])
def test_kustomize_renders_the_overlay_and_every_object_is_valid(tmp_path: Path, overlay: str) -> None:
    rendered = kustomize(tmp_path, overlay)
    for doc in rendered:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    assert all(d["metadata"].get("namespace", "p2pdist") == "p2pdist" for d in rendered)
    named(rendered, "DaemonSet", "p2pdist-peer")
    if overlay == "site":
        seed = yaml.safe_load(named(rendered, "ConfigMap", "p2pdist-seed")["data"]["seed.yaml"])
        peer = yaml.safe_load(named(rendered, "ConfigMap", "p2pdist-peer")["data"]["peer.yaml"])
        assert seed["upstream"].endswith(":4001") and seed["site"] == peer["site"]
        assert named(rendered, "Deployment", "p2pdist-scheduler")["spec"]["replicas"] == 1
        assert named(rendered, "StatefulSet", "p2pdist-seed")["spec"]["replicas"] == 1
        assert named(rendered, "Service", "p2pdist-peer")["spec"]["clusterIP"] == "None"
    else:
        named(rendered, "Deployment", "p2pdist-mirror")
        assert named(rendered, "Service", "p2pdist-mirror")["spec"]["ports"][0]["port"] == 4001


def test_debians_docker_compose_accepts_the_edge_box_file() -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose missing: scripts/setup.sh installs it"
    compose = DEPLOY / "edge" / "compose" / "compose.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PDIST_")}

    def config(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        argv = [tool, "-p", "p2pdist-edge", "-f", str(compose), "config"]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, cwd=compose.parent, env={**env, **extra}
        )

    secret = {"P2PDIST_CLUSTER_SECRET": "a-generated-secret-0123456789"}
    result = config({**secret, "P2PDIST_CORE_MIRROR": "http://core-mirror.example:4001"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert sorted(services) == ["peer", "scheduler", "seed"]
    assert services["seed"]["command"][-2:] == ["--upstream", "http://core-mirror.example:4001"]
    # Without the core's mirror the file is refused, saying what to set.
    if not (compose.parent / ".env").exists():
        refused = config(secret)
        assert refused.returncode != 0 and "P2PDIST_CORE_MIRROR" in refused.stderr

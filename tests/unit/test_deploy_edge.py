"""deploy/edge (the tiered shape of edge sites) against the code: the site overlay's and the
core mirror's configs load into the real config classes and point at each other's ports, the
edge box's compose commands parse with the real CLI, and every manifest passes the Kubernetes
schemas (tests/integration/test_deploy_edge.py renders the overlays with kubectl kustomize)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from p2pdist import config as cfg
from tests.unit.test_deploy import load_service_config, port_of

EDGE = Path(__file__).resolve().parents[2] / "deploy" / "edge"
SAMPLE_MIRROR = "http://p2pdist-mirror.core.example:4001"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def config_map(path: Path, name: str) -> dict[str, str]:
    (found,) = [d for d in docs(path) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    data: dict[str, str] = found["data"]
    return data


def load(cls: Any, text: str) -> Any:
    """A config map's file as its workload loads it: the pod's --advertise comes from its args."""
    data = yaml.safe_load(text)
    return cfg.from_mapping(cls, {**data, "advertise": f"http://10.1.2.3:{port_of(data['listen'])}"})


@pytest.mark.parametrize(
    "path",
    [*sorted((EDGE / "site").glob("*.yaml")), *sorted((EDGE / "core-mirror").glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_edge_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    for doc in docs(path):
        if doc["kind"] != "Kustomization":
            kubernetes_validate.validate(doc, latest_version(), strict=True)


def test_the_site_seed_pulls_through_the_core_mirror_and_the_site_peers_find_each_other() -> None:
    seed = load(cfg.SeedConfig, config_map(EDGE / "site" / "seed-config.yaml", "p2pdist-seed")["seed.yaml"])
    peer = load(cfg.PeerConfig, config_map(EDGE / "site" / "peer-config.yaml", "p2pdist-peer")["peer.yaml"])
    mirror_docs = docs(EDGE / "core-mirror" / "mirror.yaml")
    mirror = load(cfg.PeerConfig, config_map(EDGE / "core-mirror" / "mirror.yaml", "p2pdist-mirror")["peer.yaml"])
    (service,) = [d for d in mirror_docs if d["kind"] == "Service"]
    # The seed's upstream is the mirror Service's port, which is where the mirror's proxy listens.
    assert seed.upstream is not None
    upstream = urlsplit(seed.upstream)
    assert upstream.hostname == service["metadata"]["name"] + ".core.example"
    assert upstream.port == service["spec"]["ports"][0]["port"] == port_of(mirror.proxy_listen)
    assert mirror.proxy_listen.startswith("0.0.0.0:"), "the sites reach the mirror from outside"
    assert seed.wan_rate_bps and seed.upstream_connect_timeout_s <= 5
    # One site on both; its peers ask each other through the headless peer Service.
    assert seed.site == peer.site != ""
    (peer_service,) = docs(EDGE / "site" / "peer-service.yaml")
    assert peer_service["spec"]["clusterIP"] == "None"
    host, port = cfg.parse_hostport(peer.site_peers[0])
    assert host.split(".")[0] == peer_service["metadata"]["name"]
    assert port == peer_service["spec"]["ports"][0]["port"] == port_of(peer.listen)
    # The site's seed fetches only what its peers mirror, as the base seed does.
    assert "docker.io" in seed.allowed_registries


def test_the_core_mirror_runs_a_peer_command_the_cli_accepts() -> None:
    files = {"/etc/p2pdist/peer.yaml": config_map(EDGE / "core-mirror" / "mirror.yaml", "p2pdist-mirror")["peer.yaml"]}
    (deployment,) = [d for d in docs(EDGE / "core-mirror" / "mirror.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config = load_service_config(container["args"], files)
    assert isinstance(config, cfg.PeerConfig) and config.site == "core"


def test_the_edge_box_compose_file_runs_a_scheduler_a_seed_with_upstream_and_a_peer() -> None:
    compose = yaml.safe_load((EDGE / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"scheduler", "seed", "peer"}
    configs = {}
    for name, service in services.items():
        files = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                files[target] = (EDGE / "compose" / source).read_text()
        command = [re.sub(r"\$\{P2PDIST_CORE_MIRROR:\?[^}]*\}", SAMPLE_MIRROR, a) for a in service["command"]]
        configs[name] = load_service_config(command, files)
        assert service["environment"][cfg.CLUSTER_SECRET_ENV].startswith("${P2PDIST_CLUSTER_SECRET:?"), name
    assert configs["seed"].upstream == SAMPLE_MIRROR
    assert configs["seed"].site == configs["peer"].site != ""
    scheduler_port = port_of(configs["scheduler"].listen)
    for name in ("seed", "peer"):
        assert urlsplit(configs[name].scheduler[0]).port == scheduler_port
    assert configs["scheduler"].allowed_registries == configs["seed"].allowed_registries
    assert "deploy/edge/compose/.env" in (EDGE.parents[1] / ".gitignore").read_text().split()

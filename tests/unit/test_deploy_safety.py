"""deploy/kubernetes against the Kubernetes schemas (kubernetes-validate, offline, strict:
an unknown field is an error) and against the defaults an operator needs: cache quotas,
securityContext, probes, requests and limits, disruption budgets, a priority class that
works outside kube-system, drain time before the kill, hosts.toml removed on the way out."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from p2pdist import config as cfg

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def resources() -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, d in documents() if d["kind"] != "Kustomization"]


def workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in resources() if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")}


@pytest.mark.parametrize(("name", "doc"), resources(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, latest_version(), strict=True)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(workloads()["p2pdist-scheduler"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_every_container_has_requests_a_memory_limit_and_a_locked_down_security_context() -> None:
    for name, workload in workloads().items():
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
            assert "memory" in container["resources"]["limits"], where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"], where
            assert security["readOnlyRootFilesystem"] is True, where
    # Only the peer (host paths owned by root) runs as root; the scheduler and seeds do not.
    for name in ("p2pdist-scheduler", "p2pdist-seed"):
        for container in containers(workloads()[name]):
            assert container["securityContext"]["runAsNonRoot"] is True, name
            assert container["securityContext"]["runAsUser"] != 0, name


def test_every_service_container_has_readiness_and_liveness_probes() -> None:
    for name, workload in workloads().items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, name


def test_seed_and_peer_caches_have_a_quota() -> None:
    maps = {d["metadata"]["name"]: d["data"] for _, d in resources() if d["kind"] == "ConfigMap"}
    seed = cfg.from_mapping(
        cfg.SeedConfig, yaml.safe_load(maps["p2pdist-seed"]["seed.yaml"]) | {"advertise": "http://s:1"}
    )
    peer = cfg.from_mapping(
        cfg.PeerConfig, yaml.safe_load(maps["p2pdist-peer"]["peer.yaml"]) | {"advertise": "http://p:1"}
    )
    (claim,) = workloads()["p2pdist-seed"]["spec"]["volumeClaimTemplates"]
    volume = cfg.parse_size(claim["spec"]["resources"]["requests"]["storage"] + "B")
    assert seed.cache_quota_bytes is not None and seed.cache_quota_bytes < volume
    assert peer.cache_quota_bytes is not None


def test_schedulers_and_seeds_have_disruption_budgets_and_time_to_drain() -> None:
    budgets = {d["metadata"]["name"]: d for _, d in resources() if d["kind"] == "PodDisruptionBudget"}
    for name in ("p2pdist-scheduler", "p2pdist-seed"):
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        labels = workloads()[name]["spec"]["template"]["metadata"]["labels"]
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    drain = cfg.SchedulerConfig().drain_timeout_s
    for name, workload in workloads().items():
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain, name


def test_the_peers_priority_class_is_ours_and_shipped() -> None:
    pod = workloads()["p2pdist-peer"]["spec"]["template"]["spec"]
    assert not pod["priorityClassName"].startswith("system-")
    classes = [d for _, d in resources() if d["kind"] == "PriorityClass"]
    assert [c["metadata"]["name"] for c in classes] == [pod["priorityClassName"]]


def test_the_peer_removes_its_hosts_toml_on_the_way_out_and_checks_containerds_config_path() -> None:
    pod = workloads()["p2pdist-peer"]["spec"]["template"]["spec"]
    (peer,) = pod["containers"]
    script = peer["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "rm -f" in script and "hosts.toml.p2pdist-backup" in script
    (init,) = pod["initContainers"]
    assert "config_path" in init["command"][-1] and "WARNING" in init["command"][-1]


def test_the_network_policies_limit_the_seed_and_scheduler_ports() -> None:
    policies = {d["metadata"]["name"]: d for _, d in resources() if d["kind"] == "NetworkPolicy"}
    ports = {
        name: [(p["protocol"], p["port"]) for rule in d["spec"]["ingress"] for p in rule["ports"]]
        for name, d in policies.items()
    }
    assert ports == {
        "p2pdist-seed-pieces": [("TCP", 4010)],
        "p2pdist-scheduler-api": [("TCP", 8002), ("UDP", 8002)],  # the API and its liveness probe
    }

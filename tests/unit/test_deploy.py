"""The deploy/ files against the code: every command line parses with the real CLI, every
config file loads into the real config classes (unknown keys are errors), and the ports
the manifests expose, probe and connect to are the ones the services listen on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from p2pdist import config as cfg
from p2pdist.cli import mirrorconfig
from p2pdist.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
# Applied by hand once its CIDR is edited (see the file): not in kustomization.yaml.
OPTIONAL_K8S = "networkpolicy.yaml"
COMPOSE = DEPLOY / "compose"
CLASSES: dict[str, Any] = {"scheduler": cfg.SchedulerConfig, "seed": cfg.SeedConfig, "peer": cfg.PeerConfig}
SAMPLE_ENV = {"POD_IP": "10.1.2.3", "NODE_IP": "192.168.0.7"}


def load_service_config(args: list[str], files: dict[str, str]) -> Any:
    """Parse `args` with the real CLI and load the config it names from `files` (path → text)."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: SAMPLE_ENV[m.group(1)], a) for a in args]
    try:
        parsed = build_parser().parse_args(expanded)
    except SystemExit:
        pytest.fail(f"the CLI rejects {args}")
    cls = CLASSES[parsed.command]
    data = yaml.safe_load(files[parsed.config]) if parsed.config else {}
    return cfg.from_mapping(cls, {**data, **cfg.flag_overrides(parsed, cls)}, source=str(parsed.config))


def port_of(address: str) -> int:
    return cfg.parse_hostport(address)[1]


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"want one {kind} {name}"
    return matches[0]


def mounted_files(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Files the container sees from ConfigMap volumes: path → content."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        assert volume is not None or mount["name"] == "data", f"mount {mount['name']} has no volume"
        if volume is None or "configMap" not in volume:
            continue
        data = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
        items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            files[f"{mount['mountPath']}/{item['path']}"] = data[item["key"]]
    return files


def workloads(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Role → (pod spec, its p2pdist container)."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
            assert (
                doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            )
            for container in pod["containers"]:
                found[container["args"][0]] = (pod, container)
    return found


def test_kubernetes_set_has_every_part_and_kustomize_lists_every_file(k8s: list[dict[str, Any]]) -> None:
    find(k8s, "DaemonSet", "p2pdist-peer")
    find(k8s, "Deployment", "p2pdist-scheduler")
    find(k8s, "StatefulSet", "p2pdist-seed")
    find(k8s, "Service", "p2pdist-scheduler")
    assert find(k8s, "Service", "p2pdist-seed")["spec"]["clusterIP"] == "None"
    for name in ("p2pdist-scheduler", "p2pdist-seed", "p2pdist-peer", "p2pdist-containerd-hosts"):
        find(k8s, "ConfigMap", name)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", OPTIONAL_K8S)
    )


def test_kubernetes_runs_three_schedulers_behind_a_headless_service_and_two_seeds(
    k8s: list[dict[str, Any]],
) -> None:
    schedulers = find(k8s, "Deployment", "p2pdist-scheduler")
    assert schedulers["spec"]["replicas"] >= 3
    # A Recreate rollout would take every scheduler down at once.
    assert schedulers["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    service = find(k8s, "Service", "p2pdist-scheduler")
    assert service["spec"]["clusterIP"] == "None"  # DNS answers every scheduler's address
    assert not service["spec"].get("publishNotReadyAddresses", False)  # only ready ones
    assert service["spec"]["selector"].items() <= schedulers["spec"]["template"]["metadata"]["labels"].items()
    budget = find(k8s, "PodDisruptionBudget", "p2pdist-scheduler")
    assert budget["spec"]["maxUnavailable"] == 1
    assert find(k8s, "StatefulSet", "p2pdist-seed")["spec"]["replicas"] >= 2


def test_kubernetes_commands_configs_and_ports_match_the_cli(k8s: list[dict[str, Any]]) -> None:
    roles = workloads(k8s)
    assert set(roles) == {"scheduler", "seed", "peer"}
    configs = {}
    for role, (pod, container) in roles.items():
        config = load_service_config(container["args"], mounted_files(k8s, pod, container))
        configs[role] = config
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port_of(config.listen) in ports.values(), role
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container and "httpGet" in container[probe]:
                assert container[probe]["httpGet"]["port"] in ports, (role, probe)
            elif probe in container:  # asks loopback ports from inside: each one a port of the pod
                asked = re.findall(r"\d{4,5}", " ".join(container[probe]["exec"]["command"]))
                assert asked and {int(p) for p in asked} <= set(ports.values()), (role, probe)
        env = {e["name"] for e in container.get("env", [])}
        secret = [e for e in container["env"] if e["name"] == cfg.CLUSTER_SECRET_ENV]
        assert secret and secret[0]["valueFrom"]["secretKeyRef"]["name"] == "p2pdist-cluster-secret", role
        # Required: a pod without the secret does not start, rather than run open.
        assert not secret[0]["valueFrom"]["secretKeyRef"].get("optional", False), role
        assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= env
        if role != "scheduler":
            # Other peers must be able to reach the piece server, and find it at the advertised URL.
            assert cfg.parse_hostport(config.listen)[0] == "0.0.0.0"
            assert config.advertise is not None and urlsplit(config.advertise).port == port_of(config.listen)
    peer_pod, peer = roles["peer"]
    assert peer_pod["hostNetwork"] is True and peer_pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert port_of(configs["peer"].proxy_listen) in {p["containerPort"] for p in peer["ports"]}
    # The proxy is for this node's runtime only.
    assert cfg.parse_hostport(configs["peer"].proxy_listen)[0] == "127.0.0.1"
    assert configs["peer"].registry_mirror == mirrorconfig.DOCKER_HUB_API

    scheduler_service = find(k8s, "Service", "p2pdist-scheduler")
    port, probe = scheduler_service["spec"]["ports"]
    sched_pod, sched = roles["scheduler"]
    container_ports = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert container_ports[port["targetPort"]] == port_of(configs["scheduler"].listen)
    # The liveness probe (p2pdist/cluster/liveness.py) is UDP at the API's port.
    assert probe["protocol"] == "UDP" and probe["port"] == port["port"]
    assert container_ports[probe["targetPort"]] == port_of(configs["scheduler"].listen)
    for role in ("seed", "peer"):
        url = urlsplit(configs[role].scheduler[0])
        assert url.hostname == "p2pdist-scheduler.p2pdist.svc.cluster.local" and url.port == port["port"], role
        # One name, resolved to every scheduler, and again as they come and go.
        assert len(configs[role].scheduler) == 1 and 0 < configs[role].scheduler_dns_interval_s <= 60, role
    seed_service = find(k8s, "Service", "p2pdist-seed")
    assert find(k8s, "StatefulSet", "p2pdist-seed")["spec"]["serviceName"] == "p2pdist-seed"
    (seed_port,) = seed_service["spec"]["ports"]
    assert seed_port["port"] == port_of(configs["seed"].listen)


def test_kubernetes_sets_a_cluster_secret_and_seeds_fetch_only_what_the_peers_mirror(
    k8s: list[dict[str, Any]],
) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == "p2pdist-cluster-secret"
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # the name the pods use
    ((key, source),) = (f.split("=", 1) for f in generator["files"])
    assert key == "secret"
    # The generated secret file stays out of git; the docs say how to make it.
    ignored = (DEPLOY.parent / ".gitignore").read_text().split()
    assert f"deploy/kubernetes/{source}" in ignored
    assert f"> deploy/kubernetes/{source}" in (DEPLOY.parent / "README.md").read_text()
    roles = workloads(k8s)
    mirrored = set(find(k8s, "ConfigMap", "p2pdist-containerd-hosts")["data"])
    for role in ("scheduler", "seed"):
        pod, container = roles[role]
        config = load_service_config(container["args"], mounted_files(k8s, pod, container))
        assert set(config.allowed_registries) == mirrored, role


def test_kubernetes_hosts_toml_is_what_mirror_config_writes_and_lands_in_certs_d(k8s: list[dict[str, Any]]) -> None:
    daemonset = find(k8s, "DaemonSet", "p2pdist-peer")
    pod = daemonset["spec"]["template"]["spec"]
    peer = pod["containers"][0]
    peer_config = load_service_config(peer["args"], mounted_files(k8s, pod, peer))
    proxy = f"http://127.0.0.1:{port_of(peer_config.proxy_listen)}"
    data = find(k8s, "ConfigMap", "p2pdist-containerd-hosts")["data"]
    expected = mirrorconfig.containerd_files(proxy, list(data))
    assert {f"{key}/hosts.toml": text for key, text in data.items()} == expected
    for key, text in data.items():
        parsed = tomllib.loads(text)
        assert parsed["server"] == mirrorconfig.parse_registry(key)[1]
        assert parsed["host"][proxy]["capabilities"] == ["pull", "resolve"]
    (init,) = pod["initContainers"]
    files = mounted_files(k8s, pod, init)
    assert {path.removeprefix("/p2pdist-hosts/") for path in files} == set(expected)
    volumes = {v["name"]: v for v in pod["volumes"]}
    certs = [m for m in init["volumeMounts"] if "hostPath" in volumes[m["name"]] and not m.get("readOnly")]
    assert [volumes[m["name"]]["hostPath"]["path"] for m in certs] == [mirrorconfig.CONTAINERD_HOSTS_DIR]
    assert certs[0]["mountPath"] in init["command"][-1] and "/p2pdist-hosts/" in init["command"][-1]


# -- docker compose --------------------------------------------------------------------------


def test_compose_commands_configs_and_ports_match_the_cli() -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"scheduler", "seed", "peer"}
    configs = {}
    for name, service in services.items():
        assert service["network_mode"] == "host"
        files = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                files[target] = (COMPOSE / source).read_text()
        configs[name] = load_service_config(service["command"], files)
        if "healthcheck" in service:
            url = re.search(r"http://[^'\"]+", " ".join(service["healthcheck"]["test"]))
            assert url is not None
            port = urlsplit(url.group()).port
            own = {port_of(configs[name].listen)}
            if name == "peer":
                own.add(port_of(configs[name].proxy_listen))
            assert port in own, name
    scheduler_port = port_of(configs["scheduler"].listen)
    for name in ("seed", "peer"):
        assert urlsplit(configs[name].scheduler[0]).port == scheduler_port
    # What `p2pdist mirror-config docker` writes by default is where this peer's proxy listens.
    assert f"http://{configs['peer'].proxy_listen}" == mirrorconfig.DEFAULT_PROXY
    assert configs["peer"].registry_mirror == mirrorconfig.DOCKER_HUB_API
    # Every service requires the cluster secret (compose refuses to start without it), and the
    # seed fetches only from the registry the peer mirrors.
    for name, service in services.items():
        assert service["environment"][cfg.CLUSTER_SECRET_ENV].startswith("${P2PDIST_CLUSTER_SECRET:?"), name
    assert "deploy/compose/.env" in (DEPLOY.parent / ".gitignore").read_text().split()
    for name in ("scheduler", "seed"):
        assert configs[name].allowed_registries == ("docker.io",), name


# -- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) per line of deploy/Dockerfile, comments and blanks left out."""
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    return [
        (words[0].upper(), words[1:])
        for words in (line.split() for line in lines)
        if words and not words[0].startswith("#")
    ]


def test_image_copies_only_the_product_the_wheel_is_built_from() -> None:
    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    instructions = dockerfile_instructions()
    copied = {
        source for name, args in instructions if name == "COPY" for source in args[:-1] if not source.startswith("--")
    }
    assert not [args for name, args in instructions if name == "ADD"]
    assert packages == {"p2pdist", "scheduler", "peer", "seed"}
    assert copied == {"pyproject.toml"} | packages  # no lab/, benchmarks/, tests/, deploy/
    entry_module = pyproject["project"]["scripts"]["p2pdist"].split(":")[0]
    assert entry_module.split(".")[0] in packages

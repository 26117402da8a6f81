"""What a seed may be made to fetch, with real processes and the real registry: registrations
and seed triggers for anything but this task's blob on an allowed registry are refused and the
origin sees no request; failed fetches are forgotten; a daemon without a cluster secret says so.
Origins sit behind counting relays, so "nothing was fetched" is counted, not assumed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab import procs
from lab.faultrelay import FaultRelayProcess
from lab.procs import Service
from lab.registry import Origin
from p2pdist import wire
from tests.support.cluster import MiB, p2pdist_bin, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

REPO = "admission/blob"
SECRET_LOG_LINE = "no cluster secret"


@pytest.fixture
def relays(origin: Origin, tmp_path: Path) -> Iterator[tuple[FaultRelayProcess, FaultRelayProcess]]:
    """Two counting relays in front of the origin: the allowed registry and one that is not."""
    with (
        FaultRelayProcess(tmp_path, origin.host, name="allowed-relay") as allowed,
        FaultRelayProcess(tmp_path, origin.host, name="other-relay") as other,
    ):
        yield allowed, other


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


def start_pair(
    tmp_path: Path, services: list[Service], allowed: str, *, scheduler_args: tuple[str, ...] = ()
) -> tuple[Service, Service]:
    """A scheduler and a seed allowing only `allowed`; returns once the seed has announced."""
    scheduler = procs.start_scheduler(tmp_path, extra_args=["--allowed-registry", allowed, *scheduler_args])
    services.append(scheduler)
    seed = procs.start_seed(
        tmp_path, scheduler.url, extra_args=["--allowed-registry", allowed, "--failed-fetch-ttl-s", "2"]
    )
    services.append(seed)
    wait_until(lambda: metric(scheduler.url, "p2pdist_scheduler_hosts", 'kind="seed"') == 1, 30, "the seed to announce")
    return scheduler, seed


def post(url: str, message: object) -> httpx.Response:
    return httpx.post(url, content=wire.encode(message), headers={"content-type": wire.CONTENT_TYPE}, timeout=10)


def register(scheduler: Service, task_id: str, url: str, host_id: str = "peer-test") -> httpx.Response:
    return post(f"{scheduler.url}/v1/tasks/register", wire.Register(host_id=host_id, task_id=task_id, url=url))


def one_line(response: httpx.Response) -> str:
    text = response.text
    assert text.endswith("\n") and "\n" not in text[:-1] and text.strip(), repr(text)
    return text.strip()


def test_registrations_a_seed_must_not_fetch_are_refused_and_the_origin_sees_nothing(
    tmp_path: Path,
    push_to_origin: PushToOrigin,
    relays: tuple[FaultRelayProcess, FaultRelayProcess],
    services: list[Service],
) -> None:
    allowed, other = relays
    image = push_to_origin((4 * MiB, 4 * MiB), 121, REPO)
    digest, another = (layer.digest for layer in image.layers)
    scheduler, seed = start_pair(tmp_path, services, allowed.host)

    refusals = [
        (f"{allowed.url}/v2/{REPO}/manifests/latest", 400, "not a blob URL"),
        (f"{allowed.url}/admin", 400, "not a blob URL"),
        (f"{allowed.url}/v2/{REPO}/blobs/{another}", 400, "not the task"),  # digest is not the task ID
        (f"{other.url}/v2/{REPO}/blobs/{digest}", 403, "not in allowed_registries"),
    ]
    for url, status, reason in refusals:
        response = register(scheduler, digest, url)
        assert response.status_code == status, (url, response.text)
        assert reason in one_line(response)
    assert metric(scheduler.url, "p2pdist_scheduler_registrations_refused_total") == len(refusals)

    # The pipeline works for what is allowed: the seed fetches that blob, and only that.
    assert register(scheduler, digest, f"{allowed.url}/v2/{REPO}/blobs/{digest}").status_code == 200
    wait_until(
        lambda: metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"') >= 4 * MiB,
        60,
        "the seed to fetch the allowed blob",
    )
    assert other.stats()["requests"] == 0
    assert allowed.stats()["ranges"] == [""]  # one blob GET, for the allowed registration
    assert metric(scheduler.url, "p2pdist_scheduler_seeds_woken_total") == 1
    assert scheduler.poll() is None and seed.poll() is None


def test_a_peer_refused_by_the_scheduler_pulls_from_the_origin_itself(
    tmp_path: Path,
    push_to_origin: PushToOrigin,
    relays: tuple[FaultRelayProcess, FaultRelayProcess],
    services: list[Service],
) -> None:
    allowed, other = relays
    image = push_to_origin((6 * MiB,), 123, REPO)
    digest = image.layers[0].digest
    scheduler, seed = start_pair(tmp_path, services, allowed.host)
    peer = procs.start_peer(tmp_path, scheduler.url, "peer")
    services.append(peer)
    assert peer.proxy_url is not None
    out = tmp_path / "refused.blob"

    # A registry the operator did not allow: no P2P for it, but the pull still works.
    get = subprocess.run(
        [p2pdist_bin(), "get", f"{other.url}/v2/{REPO}/blobs/{digest}", "-o", str(out), "--peer", peer.proxy_url, "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert get.returncode == 0, get.stderr
    assert sha256_file(out) == digest
    assert metric(peer.url, "p2pdist_peer_back_to_source_total", 'reason="scheduler_said"') == 1
    assert metric(scheduler.url, "p2pdist_scheduler_registrations_refused_total", 'reason="registry"') == 1
    assert metric(seed.url, "p2pdist_seed_download_bytes_total") == 0
    assert allowed.stats()["requests"] == 0
    assert "scheduler refused the task" in peer.log_path.read_text()


def test_seed_refuses_a_forged_trigger_before_any_fetch(
    tmp_path: Path,
    push_to_origin: PushToOrigin,
    relays: tuple[FaultRelayProcess, FaultRelayProcess],
    services: list[Service],
) -> None:
    allowed, other = relays
    image = push_to_origin((4 * MiB, 4 * MiB), 122, REPO)
    digest, another = (layer.digest for layer in image.layers)
    # A trigger straight to the seed, as anyone on its network could send without a secret.
    _, seed = start_pair(tmp_path, services, allowed.host)
    trigger_url = f"{seed.url}/v1/seed/tasks"

    forged = [
        (f"{other.url}/v2/{REPO}/blobs/{digest}", 403),
        (f"{allowed.url}/v2/{REPO}/blobs/{another}", 400),
        (f"{allowed.url}/v2/{REPO}/manifests/latest", 400),
    ]
    for url, status in forged:
        response = post(trigger_url, wire.SeedTrigger(task_id=digest, url=url))
        assert response.status_code == status, (url, response.text)
        one_line(response)
    assert metric(seed.url, "p2pdist_seed_triggers_refused_total", 'reason="registry"') == 1
    assert metric(seed.url, "p2pdist_seed_triggers_refused_total", 'reason="url"') == 2

    response = post(trigger_url, wire.SeedTrigger(task_id=digest, url=f"{allowed.url}/v2/{REPO}/blobs/{digest}"))
    assert response.status_code == 202
    wait_until(
        lambda: metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"') >= 4 * MiB,
        60,
        "the seed to fetch the allowed blob",
    )
    assert other.stats()["requests"] == 0
    assert allowed.stats()["ranges"] == [""]


def test_failed_fetch_records_expire(
    tmp_path: Path,
    relays: tuple[FaultRelayProcess, FaultRelayProcess],
    services: list[Service],
) -> None:
    allowed, _ = relays
    scheduler, seed = start_pair(tmp_path, services, allowed.host, scheduler_args=("--peer-ttl-s", "2"))
    missing = "sha256:" + "5a" * 32  # on the allowed registry, but the origin has no such blob
    response = register(scheduler, missing, f"{allowed.url}/v2/{REPO}/blobs/{missing}", host_id="never-announced")
    assert response.status_code == 200

    wait_until(lambda: metric(seed.url, "p2pdist_seed_failed_fetches") == 1, 30, "the seed's fetch to fail")
    assert allowed.stats()["ranges"] == [""]  # one GET, answered 404: not retried
    # failed_fetch_ttl_s is 2 s and peer_ttl_s 2 s: both daemons forget the task soon after.
    wait_until(lambda: metric(seed.url, "p2pdist_seed_failed_fetches") == 0, 30, "the seed to forget the failure")
    wait_until(lambda: metric(scheduler.url, "p2pdist_scheduler_tasks") == 0, 30, "the scheduler to forget the task")
    assert allowed.stats()["ranges"] == [""]  # forgetting fetched nothing again


def test_daemons_without_a_cluster_secret_warn_once_at_start(tmp_path: Path, services: list[Service]) -> None:
    scheduler = procs.start_scheduler(tmp_path)
    services.append(scheduler)
    services.append(procs.start_seed(tmp_path, scheduler.url))
    services.append(procs.start_peer(tmp_path, scheduler.url, "peer"))
    secret = "a-cluster-secret-of-some-length"
    with_secret = procs.start_scheduler(tmp_path / "with-secret", extra_args=["--cluster-secret", secret])
    services.append(with_secret)
    for service in services:
        service.stop()
    for service in services[:3]:
        lines = [line for line in service.log_path.read_text().splitlines() if SECRET_LOG_LINE in line]
        assert len(lines) == 1 and "WARNING" in lines[0], (service.name, lines)
    log = with_secret.log_path.read_text()
    assert SECRET_LOG_LINE not in log and secret not in log

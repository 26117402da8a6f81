"""Preheat on a token-auth origin: `p2pdist preheat` and Harbor's dragonfly driver's own requests
against a real scheduler, seed and eight peers, the real Distribution registry behind the lab's
token issuer, and the origin's bytes counted by a relay in front of it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from lab.image import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, ImageInfo, push_image
from lab.registry import Origin
from lab.tokenauth import RegistryAuth
from p2pdist.registry.oci import basic_auth
from tests.support.cluster import Cluster, p2pdist_bin, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import OUTSIDER, PUSHER, TEAM_READER, ImageFactory

MiB = 1 << 20
PEERS = 8
PREHEAT_TOKEN = "preheat-token-for-the-e2e-tests"
# What one access check (a HEAD answered 401, then 200 with a token) may cost at the origin:
# headers only. A pull that took any blob's bytes from the origin would pass this at once.
ACCESS_CHECK_BYTES = 2048


@pytest.fixture(scope="module")
def fleet(token_origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("preheat"), token_origin.host, scheduler_args=("--preheat-token", PREHEAT_TOKEN)
    )
    try:
        cluster.add_peers(PEERS, ("--insecure-registry", cluster.relay.host))
        wait_until(
            lambda: metric(cluster.scheduler.url, "p2pdist_scheduler_hosts", 'kind="peer"') == PEERS,
            30,
            "every peer to announce",
        )
        yield cluster
    finally:
        cluster.stop()


def pushed(
    token_origin: Origin, image_factory: ImageFactory, sizes: tuple[int, ...], seed: int, repo: str
) -> ImageInfo:
    image = image_factory(sizes, seed)
    push_image(image, token_origin.host, repo, creds=PUSHER)
    return image


def blobs_of(image: ImageInfo) -> list[str]:
    return [image.config.digest, *(layer.digest for layer in image.layers)]


def run_preheat(cluster: Cluster, image_ref: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [p2pdist_bin(), "preheat", image_ref, "--scheduler", cluster.scheduler.url, "--plain-http", *args]
    env = {**os.environ, "P2PDIST_PREHEAT_TOKEN": PREHEAT_TOKEN}
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, check=False)


def preheat_state(node_url: str, digest: str) -> str:
    """What a node says of a blob a preheat may have put on it: done, running, failed, unknown."""
    response = httpx.get(f"{node_url}/v1/preheat/{digest}", timeout=10)
    assert response.status_code == 200
    state: str = msgpack.unpackb(response.content)["state"]
    return state


def test_preheated_seed_serves_eight_simultaneous_pulls_with_no_blob_bytes_from_the_origin(
    fleet: Cluster, token_origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = pushed(token_origin, image_factory, (3 * MiB, 2 * MiB), 71, "team/rollout")
    done = run_preheat(
        fleet, f"{fleet.relay.host}/team/rollout:latest", "--user", ":".join(TEAM_READER), "--wait", "--timeout", "120"
    )
    assert done.returncode == 0, done.stderr
    seed = fleet.seeds[0]
    assert all(preheat_state(seed.url, digest) == "done" for digest in blobs_of(image))
    assert " 3 of 3 blob(s) held ok" in done.stdout and "SUCCESS" in done.stdout

    origin_before = fleet.relay.downstream_bytes()
    seed_before = metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"')
    jobs = []
    for peer in fleet.peers:
        for digest in blobs_of(image):
            out = tmp_path / f"{peer.name}-{digest[7:19]}"
            url = fleet.blob_url("team/rollout", digest)
            jobs.append((digest, out, fleet.start_get(peer, url, out, "--user", ":".join(TEAM_READER))))
    for digest, out, job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert sha256_file(out) == digest
    origin_sent = fleet.relay.downstream_bytes() - origin_before

    # No daemon fetched a blob byte from the origin; what the origin sent was access checks.
    assert metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"') == seed_before
    for peer in fleet.peers:
        assert metric(peer.url, "p2pdist_peer_download_bytes_total", 'source="origin"') == 0, peer.name
    assert origin_sent <= len(jobs) * ACCESS_CHECK_BYTES, f"origin sent {origin_sent} bytes during the pull"
    print(f"origin bytes during the 8-peer pull of {len(jobs)} blobs: {origin_sent}")


def test_harbor_dragonfly_driver_requests_preheat_and_poll_to_success(
    fleet: Cluster, token_origin: Origin, image_factory: ImageFactory
) -> None:
    image = pushed(token_origin, image_factory, (2 * MiB, 1 * MiB), 72, "team/harbor")
    assert token_origin.token_issuer is not None
    # What Harbor's credMaker signs: a pull-only token for the repository, subject "distributor".
    token = token_origin.token_issuer.sign(
        "distributor", [{"type": "repository", "name": "team/harbor", "actions": ["pull"]}]
    )
    manifest_url = f"http://{fleet.relay.host}/v2/team/harbor/manifests/latest"
    # The driver's client: JSON in and out, the instance's OAuth token as Bearer.
    harbor = httpx.Client(
        base_url=fleet.scheduler.url,
        headers={"accept": "application/json", "authorization": f"Bearer {PREHEAT_TOKEN}"},
        timeout=30,
    )

    def create(url: str) -> dict[str, Any]:
        # dragonflyCreateJobRequest as Go's encoding/json writes it: every field in declaration
        # order, the empty ones empty and the nil slice null.
        args = {
            "type": "image",
            "url": url,
            "tag": "",
            "filtered_query_params": "",
            "headers": {"Authorization": f"Bearer {token}"},
            "scope": "single_seed_peer",
            "concurrent_count": 0,
            "timeout": 0,
        }
        body = json.dumps({"type": "preheat", "args": args, "scheduler_cluster_ids": None}, separators=(",", ":"))
        response = harbor.post("/oapi/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code // 100 == 2 and response.status_code != 208, response.text
        created: dict[str, Any] = response.json()
        assert isinstance(created["id"], int) and created["state"] == "PENDING"
        for key in ("created_at", "updated_at"):
            assert created[key].endswith("Z") and "T" in created[key]
        return created

    def poll(job_id: int) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while True:
            response = harbor.get(f"/oapi/v1/jobs/{job_id}")
            assert response.status_code == 200
            job: dict[str, Any] = response.json()
            assert token not in response.text  # the job's credentials are never answered
            if job["state"] != "PENDING" or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    assert harbor.get("/healthy").status_code // 100 == 2
    job = poll(create(manifest_url)["id"])
    assert job["state"] == "SUCCESS", job
    results = job["result"]["job_states"][0]["results"][0]
    assert results["failure_tasks"] == []
    assert sorted(task["url"].rsplit("/", 1)[-1] for task in results["success_tasks"]) == sorted(blobs_of(image))
    for task in results["success_tasks"]:
        assert task["hostname"].startswith("seed-") and task["ip"] == "127.0.0.1"

    missing = poll(create(manifest_url.removesuffix("latest") + "no-such-tag")["id"])
    assert missing["state"] == "FAILURE"
    error = missing["result"]["job_states"][0]["error"]
    assert "404" in error and "MANIFEST_UNKNOWN" in error and "no-such-tag" in error, error

    bad = httpx.post(
        f"{fleet.scheduler.url}/oapi/v1/jobs",
        json={"type": "preheat", "args": {"url": manifest_url}},
        headers={"authorization": "Bearer not-the-preheat-token"},
    )
    assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{fleet.scheduler.url}/oapi/v1/jobs/{job['id']}").status_code == 401
    assert token not in fleet.scheduler.log_path.read_text()
    for seed in fleet.seeds:
        assert token not in seed.log_path.read_text()


def test_cli_fails_in_one_line_for_a_missing_image_or_a_refused_pull(fleet: Cluster) -> None:
    missing = run_preheat(fleet, f"{fleet.relay.host}/team/rollout:no-such-tag", "--user", ":".join(TEAM_READER))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "404" in missing.stderr and "MANIFEST_UNKNOWN" in missing.stderr
    refused = run_preheat(fleet, f"{fleet.relay.host}/team/rollout:latest", "--user", ":".join(OUTSIDER))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "401" in refused.stderr, refused.stderr


def test_platform_flag_preheats_only_that_platforms_layers_of_an_index(
    fleet: Cluster, token_origin: Origin, image_factory: ImageFactory
) -> None:
    amd64 = pushed(token_origin, image_factory, (2 * MiB, 1 * MiB), 73, "team/multi")
    arm64 = pushed(token_origin, image_factory, (2 * MiB, 1 * MiB), 74, "team/multi")
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": image.manifest.digest,
                "size": image.manifest.size,
                "platform": {"os": "linux", "architecture": arch},
            }
            for image, arch in ((amd64, "amd64"), (arm64, "arm64"))
        ],
    }
    put = httpx.put(
        f"{token_origin.url}/v2/team/multi/manifests/both",
        content=json.dumps(index).encode(),
        headers={"content-type": MEDIA_TYPE_INDEX},
        auth=RegistryAuth(*PUSHER),
        timeout=30,
    )
    assert put.status_code == 201, put.text

    done = run_preheat(
        fleet,
        f"{fleet.relay.host}/team/multi:both",
        "--platform",
        "linux/amd64",
        "--user",
        ":".join(TEAM_READER),
        "--wait",
    )
    assert done.returncode == 0, done.stderr
    seed = fleet.seeds[0]
    assert [preheat_state(seed.url, d) for d in blobs_of(amd64)] == ["done"] * 3
    assert [preheat_state(seed.url, d) for d in blobs_of(arm64)] == ["unknown"] * 3
    wrong = run_preheat(
        fleet, f"{fleet.relay.host}/team/multi:both", "--platform", "linux/s390x", "--user", ":".join(TEAM_READER)
    )
    assert wrong.returncode == 1 and "linux/amd64, linux/arm64" in wrong.stderr, wrong.stderr


def test_scope_peers_with_percentage_50_puts_the_image_on_half_the_peers(
    fleet: Cluster, token_origin: Origin, image_factory: ImageFactory
) -> None:
    image = pushed(token_origin, image_factory, (2 * MiB, 1 * MiB), 75, "team/half")
    done = run_preheat(
        fleet, f"{fleet.relay.host}/team/half:latest", "--scope", "peers", "--percentage", "50",
        "--user", ":".join(TEAM_READER), "--wait",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    holding = [p.name for p in fleet.peers if all(preheat_state(p.url, d) == "done" for d in blobs_of(image))]
    empty = [p.name for p in fleet.peers if all(preheat_state(p.url, d) == "unknown" for d in blobs_of(image))]
    assert len(holding) == PEERS // 2 and len(empty) == PEERS // 2, (holding, empty)
    assert done.stdout.count(" 3 of 3 blob(s) held ok") == PEERS // 2


def test_a_preheated_blob_goes_through_the_mirror_only_to_tokens_that_grant_pull(
    fleet: Cluster, token_origin: Origin, image_factory: ImageFactory
) -> None:
    image = pushed(token_origin, image_factory, (2 * MiB,), 76, "team/private")
    done = run_preheat(
        fleet, f"{fleet.relay.host}/team/private:latest", "--scope", "peers", "--count", "1",
        "--user", ":".join(TEAM_READER), "--wait",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    layer = image.layers[0].digest
    holder = next(p for p in fleet.peers if preheat_state(p.url, layer) == "done")
    url = f"{holder.proxy_url}/v2/team/private/blobs/{layer}"
    ns = {"ns": fleet.relay.host}
    for auth in (None, RegistryAuth(*OUTSIDER)):
        refused = httpx.get(url, params=ns, auth=auth, timeout=60)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer realm=")
        assert len(refused.content) < 1000
    allowed = httpx.get(url, params=ns, auth=RegistryAuth(*TEAM_READER), timeout=60)
    assert allowed.status_code == 200
    assert "sha256:" + hashlib.sha256(allowed.content).hexdigest() == layer


def test_malformed_jobs_and_preheat_requests_get_a_one_line_4xx_and_everything_keeps_serving(fleet: Cluster) -> None:
    auth = {"authorization": f"Bearer {PREHEAT_TOKEN}"}
    jobs = f"{fleet.scheduler.url}/oapi/v1/jobs"
    for body in (b"{", b"[1]", b'{"type":"preheat","args":{"url":"https://x/v2/a/manifests/../b"}}', b"x" * 100_000):
        response = httpx.post(jobs, content=body, headers=auth, timeout=10)
        assert 400 <= response.status_code < 500, response.text
        assert "\n" not in response.json()["message"]
    elsewhere = {"type": "preheat", "args": {"url": "https://registry.example/v2/team/app/manifests/v1"}}
    refused = httpx.post(jobs, json=elsewhere, headers=auth, timeout=10)
    assert refused.status_code == 403 and "allowed_registries" in refused.json()["message"]
    assert httpx.get(f"{jobs}/abc", headers=auth).status_code == 400
    assert httpx.get(f"{jobs}/999999", headers=auth).status_code == 404
    assert httpx.delete(f"{jobs}/1", headers=auth).status_code == 405
    node = fleet.peers[0].url
    for path, body in (("/v1/preheat", b"\xc1garbage"), ("/v1/preheat", msgpack.packb({"task_id": "sha256:zz"}))):
        response = httpx.post(node + path, content=body, timeout=10)
        assert 400 <= response.status_code < 500 and "\n" not in response.text.strip()
    assert httpx.get(f"{node}/v1/preheat/not-a-digest", timeout=10).status_code == 400
    assert httpx.get(f"{fleet.scheduler.url}/healthy").status_code == 200
    assert httpx.get(f"{node}/healthz").status_code == 200


def test_the_jobs_registry_credentials_reach_no_log_and_no_answer(fleet: Cluster) -> None:
    # Runs after the tests above, which sent TEAM_READER's password with every job.
    secrets = (TEAM_READER[1], basic_auth(*TEAM_READER).split()[1])
    for service in fleet.services:
        text = service.log_path.read_text()
        assert not [s for s in secrets if s in text], service.name
    listing = httpx.get(
        f"{fleet.scheduler.url}/oapi/v1/jobs", headers={"authorization": f"Bearer {PREHEAT_TOKEN}"}, timeout=10
    )
    assert listing.status_code == 200 and len(listing.json()) >= 5
    assert not [s for s in secrets if s in listing.text]


def test_jobs_run_one_at_a_time_when_so_configured_and_a_job_past_its_timeout_fails(
    token_origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = pushed(token_origin, image_factory, (6 * MiB,), 77, "team/slow")
    # The origin link is slow (1 MiB/s): the 6 MiB layer cannot reach the seed in 3 s.
    cluster = Cluster(
        tmp_path,
        token_origin.host,
        relay_rate_bps=1 * MiB,
        scheduler_args=("--preheat-jobs", "1", "--preheat-job-timeout-s", "3"),
    )
    try:
        jobs = f"{cluster.scheduler.url}/oapi/v1/jobs"
        body = {
            "type": "preheat",
            "args": {
                "url": f"http://{cluster.relay.host}/v2/team/slow/manifests/latest",
                "username": TEAM_READER[0],
                "password": TEAM_READER[1],
            },
        }
        wait_until(lambda: metric(cluster.scheduler.url, "p2pdist_scheduler_hosts", 'kind="seed"') == 1, 30, "the seed")
        first = httpx.post(jobs, json=body, timeout=10).json()
        second = httpx.post(jobs, json=body, timeout=10).json()
        wait_until(lambda: httpx.get(f"{jobs}/{first['id']}").json()["progress"]["blobs"] == 2, 20, "job 1 resolved")
        # One job at a time: the second has not even resolved the image while the first runs.
        assert httpx.get(f"{jobs}/{second['id']}").json()["progress"]["blobs"] == 0
        wait_until(lambda: httpx.get(f"{jobs}/{first['id']}").json()["state"] != "PENDING", 20, "job 1 to end")
        ended = httpx.get(f"{jobs}/{first['id']}").json()
        assert ended["state"] == "FAILURE"
        assert ended["result"]["job_states"][0]["error"].startswith("timed out after 3s"), ended
        # The layer had not arrived (6 s at the link's rate); its fetch goes on, for the next pull.
        assert preheat_state(cluster.seeds[0].url, image.layers[0].digest) == "running"
    finally:
        cluster.stop()

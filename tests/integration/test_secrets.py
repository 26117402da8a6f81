"""No credential leaks: pulls with registry credentials through a private origin, in a cluster
that shares a cluster secret (from the env var), with every service at debug log level; then
every log, every /metrics page, every error message and the client's own output are searched
for the password, the Basic value, the cluster secret and any Bearer token."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab import procs
from lab.image import push_image
from lab.procs import Service
from lab.registry import Origin
from p2pdist.config import CLUSTER_SECRET_ENV
from tests.support.cluster import p2pdist_bin, sha256_file
from tests.support.origin import ORIGIN_CREDS, ImageFactory

MiB = 1 << 20
SECRET = "cluster-secret-never-logged-4242"
WRONG_PASSWORD = "wrong-password-also-secret"
DEBUG = ("--log-level", "debug")


def secrets_to_find() -> dict[str, str]:
    user, password = ORIGIN_CREDS
    return {
        "password": password,
        "wrong password": WRONG_PASSWORD,
        "basic value": base64.b64encode(f"{user}:{password}".encode()).decode(),
        "wrong basic value": base64.b64encode(f"{user}:{WRONG_PASSWORD}".encode()).decode(),
        "cluster secret": SECRET,
    }


def find_leaks(where: str, text: str) -> list[str]:
    leaks = [f"{where}: {name}" for name, value in secrets_to_find().items() if value in text]
    # Any Bearer token at all (a registry token, the cluster secret) other than the challenge.
    for m in re.finditer(r"(?i)bearer\s+([A-Za-z0-9._~+/=-]{8,})", text):
        if not m.group(1).startswith("realm"):
            leaks.append(f"{where}: Bearer token {m.group(0)[:12]}…")
    return leaks


@pytest.fixture
def services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Service]]:
    monkeypatch.setenv(CLUSTER_SECRET_ENV, SECRET)  # children inherit it: the env var path
    started: list[Service] = []
    try:
        scheduler = procs.start_scheduler(tmp_path, extra_args=DEBUG)
        started.append(scheduler)
        started.append(procs.start_seed(tmp_path, scheduler.url, "seed0", extra_args=DEBUG))
        for i in range(2):
            started.append(procs.start_peer(tmp_path, scheduler.url, f"peer{i}", DEBUG))
        # A rogue peer without the secret: the scheduler turns it away, and its log says so.
        monkeypatch.delenv(CLUSTER_SECRET_ENV)
        started.append(procs.start_peer(tmp_path, scheduler.url, "rogue", DEBUG))
        yield started
    finally:
        for service in reversed(started):
            service.stop()


def test_no_credential_in_logs_metrics_or_errors(
    services: list[Service], tmp_path: Path, private_origin: Origin, image_factory: ImageFactory
) -> None:
    scheduler, seed, peer0, peer1, rogue = services
    image = image_factory((5 * MiB,), 71)
    push_image(image, private_origin.host, "secret/app", creds=ORIGIN_CREDS)
    digest = image.layers[0].digest
    url = f"{private_origin.url}/v2/secret/app/blobs/{digest}"
    user, password = ORIGIN_CREDS
    outputs: list[tuple[str, str]] = []

    def get(peer: Service, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        assert peer.proxy_url is not None
        result = subprocess.run(
            [p2pdist_bin(), "get", url, "-o", str(out), "--peer", peer.proxy_url, "-q", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        outputs.append((f"get via {peer.name} {extra[:1]}", result.stdout + result.stderr))
        return result

    for peer in (peer0, peer1):
        out = tmp_path / f"{peer.name}.blob"
        result = get(peer, out, "--user", f"{user}:{password}")
        assert result.returncode == 0, result.stderr
        assert sha256_file(out) == digest
    # Wrong and missing credentials fail, and say so without repeating them.
    wrong = get(peer0, tmp_path / "wrong.blob", "--user", f"{user}:{WRONG_PASSWORD}")
    assert wrong.returncode != 0 and "401" in wrong.stderr
    assert get(peer1, tmp_path / "none.blob").returncode != 0

    assert peer0.proxy_url is not None
    with httpx.Client(timeout=30) as client:
        basic = {"authorization": "Basic " + base64.b64encode(f"{user}:{WRONG_PASSWORD}".encode()).decode()}
        ns = {"ns": private_origin.host}
        scheme = {"x-p2pdist-origin-scheme": "http"}
        for path in (
            f"/v2/secret/app/blobs/{digest}",
            "/v2/secret/app/manifests/latest",
            "/v2/secret/app/tags/list",
            "/v2/secret/app/blobs/sha256:" + "0" * 64,
            "/v2/",
            "/v2/BAD/blobs/x",
        ):
            response = client.get(peer0.proxy_url + path, params=ns, headers={**basic, **scheme})
            assert response.status_code >= 400, path
            outputs.append((f"mirror {path} {response.status_code}", str(response.headers) + response.text))
        # Wrong cluster secrets at every cluster port.
        for service in (scheduler, seed, peer0):
            for headers in ({}, {"authorization": f"Bearer {SECRET}x"}, {"authorization": f"Bearer {WRONG_PASSWORD}"}):
                response = (
                    client.post(f"{service.url}/v1/tasks/register", headers=headers)
                    if service is scheduler
                    else client.get(f"{service.url}/v1/tasks/{digest}/pieces/0", headers=headers)
                )
                assert response.status_code == 401
                outputs.append((f"{service.name} 401", response.text))
                if service is not scheduler:  # piece news is the cluster's too
                    news = client.get(f"{service.url}/v1/tasks/{digest}/news?wait_ms=0", headers=headers)
                    assert news.status_code == 401
            if service is peer0:  # a site host asking who holds a blob needs the secret too
                response = client.get(f"{service.url}/v1/tasks/{digest}", headers=headers)
                assert response.status_code == 401
                response = client.get(f"{service.url}/v1/tasks/{digest}", headers={"authorization": f"Bearer {SECRET}"})
                assert response.status_code == 200 and response.json()["digest"] == digest
                outputs.append(("site holding answer", response.text))
            if service is scheduler:
                response = client.post(f"{service.url}/v1/sites/members", headers=headers)
                assert response.status_code == 401
        # The rogue peer's announcements were refused.
        assert "401" in rogue.log_path.read_text()
        for service in services:
            for base in filter(None, (service.url, service.proxy_url)):
                outputs.append((f"{service.name} metrics {base}", client.get(f"{base}/metrics").text))
    for service in services:
        service.stop()
        outputs.append((f"{service.name} log", service.log_path.read_text(errors="replace")))

    assert any("debug" in text.lower() or "DEBUG" in text for _, text in outputs), "services did not log at debug"
    leaks = [leak for where, text in outputs for leak in find_leaks(where, text)]
    assert not leaks, leaks

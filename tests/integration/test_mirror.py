"""The peer's proxy port as an OCI registry mirror: real scheduler, seed and peer processes, the
real Distribution registry upstream, httpx and skopeo as clients."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.image import MEDIA_TYPE_MANIFEST, ImageInfo, push_image
from lab.procs import Service
from lab.registry import Origin
from tests.support.cluster import Cluster
from tests.support.metrics import metric
from tests.support.origin import ORIGIN_CREDS, ImageFactory, PushToOrigin

MiB = 1 << 20
MISSING = "sha256:" + "ab" * 32
OCI_ACCEPT = {"accept": f"{MEDIA_TYPE_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"}


class Mirror:
    """A cluster whose one peer mirrors the origin (reached through the counting relay)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.peer: Service = cluster.peers[0]
        assert self.peer.proxy_url is not None
        self.url = self.peer.proxy_url
        self.ns = {"ns": cluster.relay.host}

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, params=self.ns, timeout=60, **kwargs)  # type: ignore[arg-type]

    def head(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.head(self.url + path, params=self.ns, timeout=60, **kwargs)  # type: ignore[arg-type]

    def tasks_started(self) -> float:
        return metric(self.peer.url, "p2pdist_peer_tasks_total") + metric(self.peer.url, "p2pdist_peer_tasks_active")


def start_mirror(workdir: Path, origin_host: str) -> Cluster:
    cluster = Cluster(workdir, origin_host)
    try:
        relay = cluster.relay.host
        cluster.add_peers(1, ("--insecure-registry", relay, "--registry-mirror", cluster.relay.url))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def mirror(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    cluster = start_mirror(tmp_path_factory.mktemp("mirror"), origin.host)
    try:
        yield Mirror(cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def image(push_to_origin: PushToOrigin) -> ImageInfo:
    return push_to_origin((9 * MiB, 2 * MiB), 31, "mirror/app")


def blob_bytes(image: ImageInfo, digest: str) -> bytes:
    return image.blob_path(digest).read_bytes()


def test_v2_base_answers_like_the_registry(mirror: Mirror) -> None:
    response = mirror.get("/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert response.headers["oci-namespace"] == mirror.cluster.relay.host


def test_manifest_by_tag_and_by_digest_comes_from_the_upstream(mirror: Mirror, image: ImageInfo) -> None:
    expected = blob_bytes(image, image.manifest_digest)
    for ref in ("latest", image.manifest_digest):
        response = mirror.get(f"/v2/mirror/app/manifests/{ref}", headers=OCI_ACCEPT)
        assert response.status_code == 200, response.text
        assert response.content == expected
        assert response.headers["content-type"] == MEDIA_TYPE_MANIFEST
        assert response.headers["docker-content-digest"] == image.manifest_digest
        head = mirror.head(f"/v2/mirror/app/manifests/{ref}", headers=OCI_ACCEPT)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(expected))
        assert head.headers["docker-content-digest"] == image.manifest_digest
        assert head.content == b""


def test_docker_style_request_without_ns_goes_to_the_default_upstream(mirror: Mirror, image: ImageInfo) -> None:
    response = httpx.get(f"{mirror.url}/v2/mirror/app/manifests/latest", headers=OCI_ACCEPT, timeout=30)
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == image.manifest_digest
    tags = httpx.get(f"{mirror.url}/v2/mirror/app/tags/list", timeout=30)
    assert tags.status_code == 200 and tags.json()["tags"] == ["latest"]


def test_missing_things_are_404_with_oci_errors(mirror: Mirror, image: ImageInfo) -> None:
    cases = [
        ("/v2/mirror/app/manifests/no-such-tag", "MANIFEST_UNKNOWN"),
        (f"/v2/mirror/app/manifests/{MISSING}", "MANIFEST_UNKNOWN"),
        (f"/v2/mirror/app/blobs/{MISSING}", "BLOB_UNKNOWN"),
        ("/v2/mirror/no-such-repo/manifests/latest", "MANIFEST_UNKNOWN"),
        (f"/v2/mirror/no-such-repo/blobs/{image.layers[0].digest}", "BLOB_UNKNOWN"),
    ]
    for path, code in cases:
        response = mirror.get(path, headers=OCI_ACCEPT)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert code in {e["code"] for e in response.json()["errors"]}, (path, response.text)
        assert mirror.head(path, headers=OCI_ACCEPT).status_code == 404
    assert mirror.get("/v2/mirror/app/nonsense").status_code == 404


def test_push_requests_are_refused_with_a_clear_error(mirror: Mirror, image: ImageInfo) -> None:
    for method, path in (
        ("POST", "/v2/mirror/app/blobs/uploads/"),
        ("PUT", "/v2/mirror/app/manifests/latest"),
        ("PATCH", "/v2/mirror/app/blobs/uploads/some-id"),
        ("DELETE", f"/v2/mirror/app/blobs/{image.layers[0].digest}"),
    ):
        response = httpx.request(method, mirror.url + path, params=mirror.ns, content=b"{}", timeout=30)
        assert response.status_code == 405, (method, path)
        error = response.json()["errors"][0]
        assert error["code"] == "UNSUPPORTED" and "pull-only" in error["message"]
    # Nothing reached the registry: the manifest is still there, unchanged.
    assert mirror.get("/v2/mirror/app/manifests/latest", headers=OCI_ACCEPT).status_code == 200


def test_blob_head_answers_from_the_registry_without_starting_a_download(mirror: Mirror, image: ImageInfo) -> None:
    layer = image.layers[1]
    before = mirror.tasks_started()
    response = mirror.head(f"/v2/mirror/app/blobs/{layer.digest}")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(layer.size)
    assert response.headers["docker-content-digest"] == layer.digest
    assert response.headers["content-type"] == "application/octet-stream"
    assert mirror.tasks_started() == before


def test_blob_get_and_ranges_return_the_right_bytes(mirror: Mirror, image: ImageInfo) -> None:
    layer = image.layers[0]
    data = blob_bytes(image, layer.digest)
    path = f"/v2/mirror/app/blobs/{layer.digest}"
    # A range across the first piece boundary (pieces are 4 MiB), before the whole blob.
    ranged = mirror.get(path, headers={"range": f"bytes={4 * MiB - 100}-{4 * MiB + 99}"})
    assert ranged.status_code == 206
    assert ranged.content == data[4 * MiB - 100 : 4 * MiB + 100]
    assert ranged.headers["content-range"] == f"bytes {4 * MiB - 100}-{4 * MiB + 99}/{layer.size}"
    whole = mirror.get(path)
    assert whole.status_code == 200
    assert whole.headers["docker-content-digest"] == layer.digest
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == layer.digest
    tail = mirror.get(path, headers={"range": "bytes=-1000"})
    assert tail.status_code == 206 and tail.content == data[-1000:]
    past = mirror.get(path, headers={"range": f"bytes={layer.size}-"})
    assert past.status_code == 416
    assert metric(mirror.peer.url, "p2pdist_peer_mirror_blob_bytes_total") >= layer.size


def test_request_from_a_daemon_is_relayed_not_sent_back_into_p2p(mirror: Mirror, image: ImageInfo) -> None:
    config = image.config
    before = mirror.tasks_started()
    response = mirror.get(f"/v2/mirror/app/blobs/{config.digest}", headers={"x-p2pdist": "1"})
    assert response.status_code == 200 and response.content == blob_bytes(image, config.digest)
    assert mirror.tasks_started() == before
    looped = mirror.get(f"/v2/mirror/app/blobs/{config.digest}", headers={"x-p2pdist": "3"})
    assert looped.status_code == 508


def registries_conf(path: Path, registry: str, mirror_host: str) -> Path:
    path.write_text(
        "[[registry]]\n"
        f'location = "{registry}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror_host}"\n'
        "insecure = true\n"
    )
    return path


def skopeo_copy(conf: Path, ref: str, dest: Path, creds: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [
        "skopeo",
        "--insecure-policy",
        "--registries-conf",
        str(conf),
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{dest}:latest",
    ]
    if creds:
        argv[5:5] = ["--src-creds", creds]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def oci_layout_blobs(layout: Path) -> set[str]:
    return {"sha256:" + p.name for p in (layout / "blobs" / "sha256").iterdir()}


def test_skopeo_copies_through_the_mirror(
    mirror: Mirror, image_factory: ImageFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((6 * MiB, 1 * MiB), 32, "mirror/skopeo")
    relay = mirror.cluster.relay
    conf = registries_conf(tmp_path / "registries.conf", relay.host, mirror.url.removeprefix("http://"))
    before = metric(mirror.peer.url, "p2pdist_peer_mirror_blob_bytes_total")
    result = skopeo_copy(conf, f"{relay.host}/mirror/skopeo:latest", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert {layer.digest for layer in image.layers} <= oci_layout_blobs(tmp_path / "out")
    assert metric(mirror.peer.url, "p2pdist_peer_mirror_blob_bytes_total") - before >= image.total_layer_bytes


# -- a private repository -------------------------------------------------------------------

USER, PASSWORD = ORIGIN_CREDS
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WRONG = "Basic " + base64.b64encode(f"{USER}:not-the-password".encode()).decode()


@pytest.fixture(scope="module")
def private(
    private_origin: Origin, image_factory: ImageFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mirror, ImageInfo]]:
    image = image_factory((8 * MiB, 1 * MiB), 33)
    push_image(image, private_origin.host, "secret/app", creds=ORIGIN_CREDS)
    cluster = start_mirror(tmp_path_factory.mktemp("private"), private_origin.host)
    try:
        yield Mirror(cluster), image
    finally:
        cluster.stop()


def test_private_blob_goes_only_to_clients_the_registry_accepts(private: tuple[Mirror, ImageInfo]) -> None:
    mirror, image = private
    layer = image.layers[0]
    path = f"/v2/secret/app/blobs/{layer.digest}"
    allowed = mirror.get(path, headers={"authorization": GOOD})
    assert allowed.status_code == 200
    assert "sha256:" + hashlib.sha256(allowed.content).hexdigest() == layer.digest
    # The peer now holds every piece; still, no credentials or wrong ones get the registry's no.
    for headers in ({}, {"authorization": WRONG}):
        for method in ("GET", "HEAD"):
            refused = httpx.request(method, mirror.url + path, params=mirror.ns, headers=headers, timeout=30)
            assert refused.status_code == 401, (method, headers.keys())
            assert refused.headers["www-authenticate"].startswith("Basic realm=")
            assert len(refused.content) < 1000
        ranged = mirror.get(path, headers={**headers, "range": "bytes=0-99"})
        assert ranged.status_code == 401
    manifest = mirror.get("/v2/secret/app/manifests/latest", headers=OCI_ACCEPT)
    assert manifest.status_code == 401 and "www-authenticate" in manifest.headers
    assert mirror.get("/v2/").status_code == 401


def test_skopeo_with_credentials_pulls_a_private_image(private: tuple[Mirror, ImageInfo], tmp_path: Path) -> None:
    mirror, image = private
    relay = mirror.cluster.relay
    conf = registries_conf(tmp_path / "registries.conf", relay.host, mirror.url.removeprefix("http://"))
    denied = skopeo_copy(conf, f"{relay.host}/secret/app:latest", tmp_path / "denied")
    assert denied.returncode != 0
    result = skopeo_copy(conf, f"{relay.host}/secret/app:latest", tmp_path / "out", creds=f"{USER}:{PASSWORD}")
    assert result.returncode == 0, result.stderr
    assert {layer.digest for layer in image.layers} <= oci_layout_blobs(tmp_path / "out")


def test_credentials_never_reach_logs_or_metrics(private: tuple[Mirror, ImageInfo]) -> None:
    mirror, image = private
    assert mirror.get(f"/v2/secret/app/blobs/{image.config.digest}", headers={"authorization": GOOD}).status_code == 200
    secrets = (PASSWORD, GOOD.split()[1], WRONG.split()[1])
    for service in mirror.cluster.services:
        text = service.log_path.read_text()
        assert not [s for s in secrets if s in text], service.name
        if service.proxy_url:
            exposed = httpx.get(f"{service.proxy_url}/metrics").text
            assert not [s for s in secrets if s in exposed]
    assert json.dumps(metric(mirror.peer.url, "p2pdist_peer_mirror_access_checks_total", 'result="denied"')) != "0.0"


def test_blob_streams_as_pieces_arrive_so_the_first_byte_does_not_wait_for_the_whole_blob(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((24 * MiB,), 34, "mirror/stream")
    layer = image.layers[0]
    # The origin link is slow (12 MiB/s): the whole blob takes about 2 s to reach the seed.
    cluster = Cluster(tmp_path, origin.host, relay_rate_bps=12 * MiB)
    try:
        cluster.add_peers(1, ("--insecure-registry", cluster.relay.host))
        mirror = Mirror(cluster)
        started = time.monotonic()
        first_byte = None
        sha = hashlib.sha256()
        with httpx.stream(
            "GET", f"{mirror.url}/v2/mirror/stream/blobs/{layer.digest}", params=mirror.ns, timeout=60
        ) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                if first_byte is None:
                    first_byte = time.monotonic() - started
                sha.update(chunk)
        total = time.monotonic() - started
    finally:
        cluster.stop()
    assert "sha256:" + sha.hexdigest() == layer.digest
    print(f"first byte after {first_byte:.2f}s of {total:.2f}s")
    assert first_byte is not None and first_byte < 0.5 * total, (first_byte, total)

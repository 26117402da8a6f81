"""Malformed input to every endpoint gets a 4xx with a one-line reason, writes nothing, and
leaves the service serving. Real processes, real origin."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import httpx
import msgpack
import pytest

from lab.registry import Origin
from p2pdist import wire
from tests.support.cluster import Cluster, sha256_file
from tests.support.origin import PushToOrigin

MiB = 1 << 20
GOOD_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def held(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    """A cluster whose one peer already holds a 9 MiB blob (3 pieces of 4 MiB: no upload cap)."""
    image = push_to_origin((9 * MiB,), 21, "bad/input")
    digest = image.layers[0].digest
    cluster = Cluster(tmp_path_factory.mktemp("bad"), origin.host)
    try:
        cluster.add_peers(1)
        cluster.wait_announced()
        (out,) = cluster.pull_all(cluster.peers, cluster.blob_url("bad/input", digest), "warm")
        assert sha256_file(out) == digest
        yield cluster, digest
    finally:
        cluster.stop()


def one_line_4xx(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    text = response.text.strip()
    assert text and "\n" not in text and "Traceback" not in text
    return text


# The registry's yeses to clients' access checks, saved in the background some time after the
# check (the fixture's pull, or the in-range request below, both rightly allowed): not blob
# data, and written on its own clock, so a snapshot of the data dir leaves it out.
VERDICTS_FILE = "access-verdicts.json"


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file() and p.name != VERDICTS_FILE}


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\xc1\x00garbage", "malformed msgpack"),
        (msgpack.packb([1, 2, 3]), "expected a map"),
        (
            msgpack.packb(
                {"host_id": "h", "task_id": GOOD_DIGEST, "url": "http://x/v2/a/blobs/" + GOOD_DIGEST, "evil": 1}
            ),
            "unknown field",
        ),
        (msgpack.packb({"host_id": "h", "task_id": "sha256:XYZ", "url": "http://x"}), "invalid digest"),
        (msgpack.packb({"host_id": "h", "task_id": "md5:" + "a" * 32, "url": "http://x"}), "invalid digest"),
        (msgpack.packb({"host_id": 5, "task_id": GOOD_DIGEST, "url": "http://x"}), "expected a string"),
        (msgpack.packb({"task_id": GOOD_DIGEST, "url": "http://x"}), "missing field"),
    ],
)
def test_scheduler_rejects_malformed_register(held: tuple[Cluster, str], body: bytes, reason: str) -> None:
    cluster, _ = held
    url = cluster.scheduler.url
    response = httpx.post(f"{url}/v1/tasks/register", content=body, headers={"content-type": wire.CONTENT_TYPE})
    assert reason in one_line_4xx(response)
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_scheduler_unknown_endpoint_and_wrong_method(held: tuple[Cluster, str]) -> None:
    cluster, _ = held
    url = cluster.scheduler.url
    assert httpx.post(f"{url}/v1/nope", content=b"").status_code == 404
    assert httpx.get(f"{url}/v1/tasks/register").status_code == 405
    huge = httpx.post(f"{url}/v1/tasks/sync", content=b"\x00" * (5 << 20))
    assert huge.status_code == 413
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize(
    "path, status",
    [
        ("/v1/tasks/sha256:zz/pieces/0", 400),
        ("/v1/tasks/{digest}/pieces/99", 400),
        ("/v1/tasks/{digest}/pieces/-1", 400),
        ("/v1/tasks/{digest}/pieces/abc", 400),
        ("/v1/tasks/{good}/pieces/0", 404),
        ("/v1/tasks/{digest}/pieces/0/../../../etc/passwd", 404),
    ],
)
def test_piece_server_rejects_bad_paths(held: tuple[Cluster, str], path: str, status: int) -> None:
    cluster, digest = held
    peer = cluster.peers[0]
    response = httpx.get(peer.url + path.format(digest=digest, good=GOOD_DIGEST))
    assert response.status_code == status
    one_line_4xx(response)
    assert httpx.get(f"{peer.url}/healthz").status_code == 200


def test_piece_server_ranges(held: tuple[Cluster, str]) -> None:
    cluster, digest = held
    peer = cluster.peers[0]
    url = f"{peer.url}/v1/tasks/{digest}/pieces/2"
    whole = httpx.get(url)
    assert whole.status_code == 200 and len(whole.content) == 1 * MiB + len(whole.content) - 1 * MiB
    part = httpx.get(url, headers={"range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole.content[10:20]
    past = httpx.get(url, headers={"range": f"bytes={len(whole.content)}-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{len(whole.content)}"
    assert httpx.get(url, headers={"range": "bytes=a-b"}).status_code == 400
    assert httpx.post(url).status_code == 405


def test_proxy_rejects_bad_names_digests_and_ranges_writing_nothing(held: tuple[Cluster, str]) -> None:
    cluster, digest = held
    peer = cluster.peers[0]
    assert peer.proxy_url is not None
    data_dir = cluster.workdir / f"{peer.name}-data"
    before = files_under(data_dir)
    ns = {"ns": cluster.relay.url.removeprefix("http://")}
    hdr = {"x-p2pdist-origin-scheme": "http"}
    for path in (
        "/v2/../etc/blobs/" + digest,
        "/v2/UPPER/blobs/" + digest,
        "/v2/a//b/blobs/" + digest,
        "/v2/bad/input/blobs/sha256:short",
        "/v2/bad/input/blobs/" + digest.upper(),
    ):
        response = httpx.get(peer.proxy_url + path, params=ns, headers=hdr)
        assert response.status_code in (400, 404), (path, response.status_code)
    past = httpx.get(
        f"{peer.proxy_url}/v2/bad/input/blobs/{digest}",
        params=ns,
        headers={**hdr, "range": f"bytes={9 * MiB + 10**6}-"},
    )
    assert past.status_code == 416
    bad_ns = httpx.get(f"{peer.proxy_url}/v2/bad/input/blobs/{digest}", params={"ns": "a/b@c"}, headers=hdr)
    assert bad_ns.status_code == 400
    assert files_under(data_dir) == before
    ranged = httpx.get(
        f"{peer.proxy_url}/v2/bad/input/blobs/{digest}", params=ns, headers={**hdr, "range": "bytes=4194300-4194309"}
    )
    assert ranged.status_code == 206 and len(ranged.content) == 10
    assert httpx.get(f"{peer.proxy_url}/healthz").status_code == 200


def test_missing_blob_is_404_not_500(held: tuple[Cluster, str]) -> None:
    cluster, _ = held
    peer = cluster.peers[0]
    response = httpx.get(
        f"{peer.proxy_url}/v2/bad/input/blobs/{GOOD_DIGEST}",
        params={"ns": cluster.relay.url.removeprefix("http://")},
        headers={"x-p2pdist-origin-scheme": "http"},
        timeout=60,
    )
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_seed_rejects_malformed_trigger(held: tuple[Cluster, str]) -> None:
    cluster, _ = held
    seed = cluster.seeds[0]
    data_dir = cluster.workdir / "seed0-data"
    before = files_under(data_dir)
    for body in (
        b"junk",
        msgpack.packb({"task_id": "sha256:1", "url": "http://x"}),
        msgpack.packb({"task_id": GOOD_DIGEST, "url": "file:///etc/passwd"}),
    ):
        one_line_4xx(httpx.post(f"{seed.url}/v1/seed/tasks", content=body))
    assert files_under(data_dir) == before
    assert httpx.get(f"{seed.url}/healthz").status_code == 200


def test_get_writes_into_a_pipe_and_leaves_it_a_pipe(held: tuple[Cluster, str], tmp_path: Path) -> None:
    """`-o /dev/null` or a FIFO is written in place: renaming a temp file over a device
    would replace it with a regular file."""
    cluster, digest = held
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sha = hashlib.sha256()

    def drain() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    job = cluster.start_get(cluster.peers[0], cluster.blob_url("bad/input", digest), fifo)
    _, err = job.communicate(timeout=60)
    reader.join(timeout=60)
    assert job.returncode == 0, err
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert "sha256:" + sha.hexdigest() == digest
    assert not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize(
    "path, method, status",
    [
        ("/v1/tasks/sha256:zz", "GET", 400),
        ("/v1/tasks/sha256:" + "AB" * 32, "GET", 400),
        ("/v1/tasks/md5:abc", "GET", 400),
        ("/v1/tasks/{good}", "GET", 404),
        ("/v1/tasks/{digest}", "POST", 405),
        ("/v1/tasks/{digest}", "DELETE", 405),
        ("/v1/manifests/sha256:zz", "GET", 400),
        ("/v1/manifests/latest", "GET", 400),
        ("/v1/manifests/{good}", "GET", 404),
        ("/v1/manifests/{good}", "PUT", 405),
    ],
)
def test_the_site_endpoints_reject_bad_input(held: tuple[Cluster, str], path: str, method: str, status: int) -> None:
    """GET /v1/tasks/<digest> and /v1/manifests/<digest> (a site host asking without the
    scheduler or registry) answer bad input with a 4xx and a one-line reason and keep serving."""
    cluster, digest = held
    peer = cluster.peers[0]
    response = httpx.request(method, peer.url + path.format(digest=digest, good=GOOD_DIGEST))
    assert response.status_code == status, response.text
    one_line_4xx(response)
    assert httpx.get(f"{peer.url}/healthz").status_code == 200


def test_the_site_holding_endpoint_names_size_and_piece_digests_of_a_checked_blob(held: tuple[Cluster, str]) -> None:
    cluster, digest = held
    peer = cluster.peers[0]
    response = httpx.get(f"{peer.url}/v1/tasks/{digest}")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["digest"] == digest and answer["size"] >= 9 * MiB  # the layer's files and their tar headers
    # Cut in 4 MiB pieces (the peer has no upload cap): the old rule's, so the answer leaves the
    # size out, as a host from before it wrote it (a reader counts the digests against it).
    assert "piece_size" not in answer
    assert len(answer["piece_digests"]) == 3 and all(len(d) == 64 for d in answer["piece_digests"])
    # Piece 0's bytes hash (BLAKE3) to the digest the answer gives for it.
    piece = httpx.get(f"{peer.url}/v1/tasks/{digest}/pieces/0").content
    assert blake3.blake3(piece).hexdigest() == answer["piece_digests"][0]
    # The blob was pulled anonymously from a registry without auth: a site host may rely on that.
    assert [p["repository"] for p in answer["public"]] == ["bad/input"]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\xc1\x00garbage", "malformed msgpack"),
        (msgpack.packb({"host_id": 5}), "expected a string"),
        (msgpack.packb({}), "missing field"),
        (msgpack.packb({"host_id": "h", "site": "x"}), "unknown field"),
    ],
)
def test_scheduler_site_members_rejects_bad_input(held: tuple[Cluster, str], body: bytes, reason: str) -> None:
    cluster, _ = held
    url = cluster.scheduler.url
    response = httpx.post(f"{url}/v1/sites/members", content=body, headers={"content-type": wire.CONTENT_TYPE})
    assert reason in one_line_4xx(response)
    assert httpx.get(f"{url}/v1/sites/members").status_code == 405
    # A host the scheduler does not know, or one outside a named site, is named nobody.
    known = httpx.post(
        f"{url}/v1/sites/members",
        content=wire.encode(wire.SiteMembersQuery(host_id="nobody")),
        headers={"content-type": wire.CONTENT_TYPE},
    )
    assert known.status_code == 200 and wire.decode(wire.SiteMembers, known.content).urls == []

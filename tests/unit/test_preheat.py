"""The pure parts of preheating: the job request as Harbor's dragonfly driver and the CLI send
it, the job record's JSON view (never the credentials), the job book's bounds, the choice of
targets, manifests and indexes, and the CLI's image references."""

from __future__ import annotations

import json
import random

import pytest

from p2pdist.cli.preheat import parse_image
from p2pdist.cluster.rendezvous import owner
from p2pdist.errors import BadRequest, JobsBusy, PreheatError
from p2pdist.registry.manifest import MEDIA_INDEX, MEDIA_MANIFEST, parse_manifest, parse_manifest_url
from scheduler.preheat import JobBook, JobRequest, Target, assign, choose_targets, parse_job_request

URL = "https://registry.example/v2/team/app/manifests/v1"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def harbor_body(**args: object) -> bytes:
    base: dict[str, object] = {
        "type": "image",
        "url": URL,
        "tag": "",
        "filtered_query_params": "",
        "headers": {"Authorization": "Bearer secret-registry-token"},
        "scope": "",
        "concurrent_count": 0,
        "timeout": 0,
    }
    return json.dumps({"type": "preheat", "args": {**base, **args}, "scheduler_cluster_ids": None}).encode()


def test_harbor_body_with_empty_and_null_fields_is_a_single_seed_preheat() -> None:
    request = parse_job_request(harbor_body())
    assert request.url == URL and request.scope == "single_seed_peer"
    assert request.headers == {"authorization": "Bearer secret-registry-token"}
    assert request.timeout_s == 0 and request.concurrent_count == 0 and request.platforms == ()
    assert "secret-registry-token" not in repr(request)


def test_dragonfly_fields_timeout_in_nanoseconds_platform_share_and_basic_credentials() -> None:
    request = parse_job_request(
        harbor_body(
            scope="all_peers",
            timeout=90 * 10**9,
            platform="linux/amd64",
            platforms=["linux/arm64", "linux/amd64"],
            percentage=50,
            headers=None,
            username="u",
            password="p",
        )
    )
    assert request.timeout_s == 90 and request.percentage == 50
    assert request.platforms == ("linux/amd64", "linux/arm64")
    assert request.headers == {"authorization": "Basic dTpw"}


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"type": "sync_peers", "args": {"url": URL}}).encode(), "only preheat"),
        (json.dumps({"type": "preheat"}).encode(), "args.url is required"),
        (harbor_body(url=None), "args.url is required"),
        (harbor_body(url="ftp://x/y"), "not a manifest URL"),
        (harbor_body(url="https://r.example/v2/Bad..Name/manifests/v1"), "invalid"),
        (harbor_body(type="file"), "only image"),
        (harbor_body(scope="everyone"), "args.scope"),
        (harbor_body(headers={"Authorization": 5}), "object of strings"),
        (harbor_body(timeout="30m"), "args.timeout: want int"),
        (harbor_body(timeout=-1), "must not be negative"),
        (harbor_body(percentage=50), "scope all_peers only"),
        (harbor_body(scope="all_peers", percentage=101), "1 to 100"),
        (harbor_body(scope="all_peers", count=0), "at least 1"),
        (harbor_body(platform="Linux AMD64"), "invalid platform"),
        (json.dumps({"args": {"url": URL}, "scheduler_cluster_ids": ["a"]}).encode(), "list of integers"),
    ],
)
def test_malformed_job_requests_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_job_request(body)


def test_the_job_view_has_dragonflys_fields_and_never_the_headers() -> None:
    book = JobBook(max_jobs=10, ttl_s=60)
    job = book.add(parse_job_request(harbor_body()), wall=1_700_000_000.5, now=0.0)
    view = json.dumps(job.view())
    assert "secret-registry-token" not in view and "authorization" not in view.lower()
    doc = json.loads(view)
    assert doc["id"] == 1 and doc["state"] == "PENDING"
    assert doc["created_at"] == "2023-11-14T22:13:20.500000Z"
    assert doc["result"]["job_states"][0]["results"][0] == {
        "success_tasks": [],
        "failure_tasks": [],
        "scheduler_cluster_id": 1,
    }


def test_the_book_drops_finished_jobs_after_their_ttl_and_refuses_when_full_of_running_ones() -> None:
    book = JobBook(max_jobs=2, ttl_s=60)
    first = book.add(JobRequest(URL), wall=0, now=0)
    second = book.add(JobRequest(URL), wall=0, now=0)
    with pytest.raises(JobsBusy):
        book.add(JobRequest(URL), wall=0, now=1)
    book.finish(first, "SUCCESS", "", wall=0, now=10)
    third = book.add(JobRequest(URL), wall=0, now=11)  # the finished one makes room
    assert book.get(first.id, 11) is None and third.id == 3
    book.finish(second, "FAILURE", "x", wall=0, now=20)
    assert book.get(second.id, 79) is second
    assert book.get(second.id, 81) is None


def test_scopes_pick_one_seed_per_blob_every_seed_or_a_share_of_the_peers() -> None:
    hosts = [Target(f"seed-{i}", f"http://s{i}", "seed") for i in range(3)]
    hosts += [Target(f"peer-{i}", f"http://p{i}", "peer") for i in range(8)]
    rng = random.Random(1)
    digests = [f"sha256:{i:064x}" for i in range(30)]
    seeds = choose_targets(hosts, JobRequest(URL), rng)
    single = assign(digests, seeds, "single_seed_peer")
    # One seed per blob, the one a pull would wake (rendezvous), and the blobs spread over all three.
    assert [d for d, _ in single] == digests
    assert all(t.host_id == owner(d, [s.host_id for s in seeds]) for d, t in single)
    assert {t.host_id for _, t in single} == {"seed-0", "seed-1", "seed-2"}
    every = assign(digests, choose_targets(hosts, JobRequest(URL, scope="all_seed_peers"), rng), "all_seed_peers")
    assert len(every) == 90
    assert len(choose_targets(hosts, JobRequest(URL, scope="all_peers"), rng)) == 8
    half = choose_targets(hosts, JobRequest(URL, scope="all_peers", percentage=50), rng)
    assert len(half) == 4 and all(h.kind == "peer" for h in half)
    assert len(choose_targets(hosts, JobRequest(URL, scope="all_peers", percentage=1), rng)) == 1
    assert len(choose_targets(hosts, JobRequest(URL, scope="all_peers", count=20), rng)) == 8
    assert assign(digests, choose_targets(hosts[3:], JobRequest(URL), rng), "single_seed_peer") == []


def test_manifests_and_indexes_parse_to_blobs_and_platform_children() -> None:
    manifest = {
        "mediaType": MEDIA_MANIFEST[0],
        "config": {"digest": D1, "size": 10},
        "layers": [{"digest": D2, "size": 20}],
    }
    assert parse_manifest("", json.dumps(manifest).encode()).blobs == ((D1, 10), (D2, 20))
    index = {
        "mediaType": MEDIA_INDEX[0],
        "manifests": [
            {"digest": D1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": D2, "platform": {"os": "unknown", "architecture": "unknown"}},
        ],
    }
    assert parse_manifest(MEDIA_INDEX[0], json.dumps(index).encode()).children == (
        (D1, "linux/arm64/v8"),
        (D2, "unknown/unknown"),
    )
    for bad in (b"nope", b"[]", json.dumps({"mediaType": MEDIA_MANIFEST[0], "layers": []}).encode()):
        with pytest.raises(PreheatError):
            parse_manifest("", bad)
    with pytest.raises(PreheatError, match="unsupported manifest type"):
        parse_manifest("text/plain", b"{}")


def test_manifest_urls_and_cli_image_references() -> None:
    where = parse_manifest_url(URL)
    assert where.blob(D1) == f"https://registry.example/v2/team/app/blobs/{D1}"
    assert parse_image("127.0.0.1:5000/team/app:v2", plain_http=True).manifest_url == (
        "http://127.0.0.1:5000/v2/team/app/manifests/v2"
    )
    assert parse_image(f"ghcr.io/org/app@{D1}").manifest_url == f"https://ghcr.io/v2/org/app/manifests/{D1}"
    assert parse_image("alpine").manifest_url == "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    for bad in ("127.0.0.1:5000/Team/App", "reg.example/app:bad tag", "a..b:1/x"):
        with pytest.raises(BadRequest):
            parse_image(bad)

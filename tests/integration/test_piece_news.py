"""Piece news on real nodes: a seed's and a peer's news endpoint tell what they hold the moment
a piece is stored (the long-poll answers mid-download, not at its wait), a seed adds its piece
digests, and malformed requests get a one-line 4xx while the node keeps serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import blake3
import httpx
import pytest

from lab.registry import Origin
from p2pdist import wire
from p2pdist.content.pieces import Bitmap, PieceLayout
from p2pdist.node.pieceserver import PIECES_HEADER, parse_pieces_header
from tests.support.cluster import Cluster, sha256_file
from tests.support.origin import PushToOrigin

MiB = 1 << 20
GOOD_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def cluster(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One seed behind an origin capped at 4 MiB/s (a 12 MiB blob takes ~3 s), one peer."""
    cluster = Cluster(tmp_path_factory.mktemp("news"), origin.host, relay_rate_bps=4 * MiB)
    try:
        cluster.add_peers(1)
        cluster.wait_announced()  # its blobs are cut in 4 MiB pieces: it has no upload cap
        yield cluster
    finally:
        cluster.stop()


def news(base: str, digest: str, **query: int) -> tuple[wire.PieceNews, float]:
    started = time.monotonic()
    response = httpx.get(f"{base}/v1/tasks/{digest}/news", params=query, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == wire.CONTENT_TYPE
    return wire.decode(wire.PieceNews, response.content), time.monotonic() - started


def test_news_answers_as_each_piece_is_stored_and_a_seed_sends_its_digests(
    cluster: Cluster, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((12 * MiB,), 31, "news/live")
    digest = image.layers[0].digest
    # 4 MiB pieces (the peer asking has no upload cap): 3 or 4, a layer is a little over its size.
    count = PieceLayout.for_blob(image.layers[0].size, 4 * MiB).count
    seed, peer = cluster.seeds[0], cluster.peers[0]
    # Before anyone asked for it: nothing held, answered at once.
    first, _ = news(seed.url, digest, since=0, wait_ms=0)
    assert first == wire.PieceNews(task_id=digest, version=0)

    polled: list[tuple[wire.PieceNews, float]] = []
    poll = threading.Thread(target=lambda: polled.append(news(seed.url, digest, since=0, wait_ms=10_000)))
    poll.start()
    time.sleep(0.3)  # not readiness: lets the poll reach the seed before the pull starts
    out = cluster.workdir / "news-live.blob"
    job = cluster.start_get(peer, cluster.blob_url("news/live", digest), out)
    poll.join(timeout=60)
    ((answer, waited),) = polled
    # Woken by the first stored piece, long before its 10 s wait, and before the blob is whole.
    assert 1 <= answer.version < count and not answer.complete, answer
    assert waited < 9.0
    assert list(Bitmap(count, answer.pieces)) == list(range(answer.version))
    assert len(answer.piece_digests) == answer.version and answer.first_digest == 0
    # A piece answer tells the same news: the last piece, likely not held yet (a 404), then the
    # first (held): each says what the seed holds as it answers.
    for number in (count - 1, 0):
        piece = httpx.get(f"{seed.url}/v1/tasks/{digest}/pieces/{number}", timeout=30)
        assert piece.status_code in (200, 404), piece.text
        said = parse_pieces_header(piece.headers[PIECES_HEADER], count)
        assert said is not None, piece.headers[PIECES_HEADER]
        version, bitmap = said
        assert answer.version <= version <= count and list(Bitmap(count, bitmap)) == list(range(version))
        assert (number in range(version)) == (piece.status_code == 200)

    # The next poll, since that version, answers with the next piece.
    later, _ = news(seed.url, digest, since=answer.version, wait_ms=10_000, digests=answer.version)
    assert later.version > answer.version and later.first_digest == answer.version
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert sha256_file(out) == digest

    whole, waited = news(seed.url, digest, since=0, wait_ms=10_000)
    assert whole.version == count and whole.complete and waited < 5.0
    pieces = [httpx.get(f"{peer.url}/v1/tasks/{digest}/pieces/{n}").content for n in range(count)]
    assert whole.piece_digests == [blake3.blake3(p).digest() for p in pieces]
    said = parse_pieces_header(
        httpx.get(f"{peer.url}/v1/tasks/{digest}/pieces/1", timeout=30).headers[PIECES_HEADER], count
    )
    assert said is not None and said[0] == count and list(Bitmap(count, said[1])) == list(range(count))
    # A peer tells what it holds, but no digests: children trust only a seed's.
    held, _ = news(peer.url, digest, since=0, wait_ms=0)
    assert held.version == count and held.complete and held.piece_digests == []
    # Nothing new: the poll waits its wait_ms, then answers with the same version.
    same, waited = news(peer.url, digest, since=count, wait_ms=500)
    assert same.version == count and 0.4 < waited < 5.0


@pytest.mark.parametrize(
    "path, status, reason",
    [
        ("/v1/tasks/sha256:zz/news", 400, "invalid"),
        ("/v1/tasks/{good}/news?since=abc", 400, "since"),
        ("/v1/tasks/{good}/news?since=-1", 400, "since"),
        ("/v1/tasks/{good}/news?wait_ms=1e3", 400, "wait_ms"),
        ("/v1/tasks/{good}/news?digests=%C2%B2", 400, "digests"),
        ("/v1/tasks/{good}/news?since=99999999999999999999", 400, "since"),
        ("/v1/tasks/{good}/news/more", 404, "no such endpoint"),
    ],
)
def test_news_rejects_malformed_requests_with_one_line(cluster: Cluster, path: str, status: int, reason: str) -> None:
    for node in (cluster.seeds[0], cluster.peers[0]):
        response = httpx.get(node.url + path.format(good=GOOD_DIGEST), timeout=30)
        assert response.status_code == status
        text = response.text.strip()
        assert reason in text and "\n" not in text and "Traceback" not in text
        assert httpx.get(f"{node.url}/healthz").status_code == 200


def test_news_is_read_with_get_and_a_long_wait_is_capped(cluster: Cluster) -> None:
    peer = cluster.peers[0]
    url = f"{peer.url}/v1/tasks/{GOOD_DIGEST}/news"
    refused = httpx.post(url)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"
    # A wait past the cap is the cap (10 s), not an error: it answers, unchanged, after it.
    started = time.monotonic()
    capped = httpx.get(url, params={"since": 0, "wait_ms": 3_600_000}, timeout=60)
    assert capped.status_code == 200 and 9.0 < time.monotonic() - started < 30.0
    assert wire.decode(wire.PieceNews, capped.content).version == 0

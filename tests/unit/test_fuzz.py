"""Bad input, generated: hypothesis throws malformed msgpack, paths, digests, names, ranges,
request heads and oversized headers and bodies at every HTTP port of an in-process scheduler,
seed and peer (scheduler API, piece servers, seed trigger, mirror, metrics). Each must get a
4xx with a one-line reason (never a 5xx of ours, never a traceback in the log), nothing may be
written for it, and the service must still answer /healthz right after.

The services run in a trio run on a background thread for the module, so that hypothesis can
drive plain synchronous examples against the same sockets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2pdist import wire
from p2pdist.content.digest import piece_digest
from p2pdist.storage.store import Store
from tests.support.inprocess import InProcessCluster, start_cluster

MiB = 1 << 20
BLOB = random.Random(5).randbytes(3 * MiB)  # two pieces: 2 MiB and 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PIECE_LENGTHS = (2 * MiB, 1 * MiB)
# The only address a fuzzed message may point a service at: nothing listens on port 1.
SAFE_URL = "http://127.0.0.1:1/v2/a/blobs/" + "sha256:" + "cd" * 32
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class _ErrorLog(logging.Handler):
    """Collects what a crash leaves: any record with a traceback, and the HTTP server's errors
    (a handler that raised or returned garbage). A seed logging that a fuzzed trigger's origin
    is unreachable is the service working, not a crash."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or (record.levelno >= logging.ERROR and record.name == "p2pdist.http"):
            self.records.append(self.format(record))


@dataclass
class Services:
    cluster: InProcessCluster
    workdir: Path
    errors: _ErrorLog
    client: httpx.Client

    @property
    def ports(self) -> dict[str, str]:
        c = self.cluster
        return {"scheduler": c.scheduler_url, "seed": c.seed_url, "peer": c.peer_url, "proxy": c.proxy_url}

    def files(self) -> set[tuple[str, int]]:
        return {(str(p), p.stat().st_size) for p in self.workdir.rglob("*") if p.is_file()}

    def assert_healthy(self) -> None:
        for name, url in self.ports.items():
            assert self.client.get(f"{url}/healthz").status_code == 200, f"{name} stopped answering"
        # Cleared once seen, so hypothesis blames the example that caused it, not every later one.
        crashes, self.errors.records = self.errors.records, []
        assert not crashes, "\n".join(crashes)


def hold_blob(data_dir: Path) -> None:
    """Put BLOB's verified pieces where the peer's store finds them on start."""
    task = Store(data_dir).open(BLOB_DIGEST, len(BLOB), SAFE_URL)
    digests = []
    for number, start in enumerate((0, PIECE_LENGTHS[0])):
        piece = BLOB[start : start + PIECE_LENGTHS[number]]
        writer = task.new_piece(number)
        writer.write(piece)
        writer.commit()
        digests.append(piece_digest(piece))
    task.save_digests(digests)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    workdir = tmp_path_factory.mktemp("fuzz")
    hold_blob(workdir / "peer-data")
    ready = threading.Event()
    started: dict[str, Any] = {}

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                started["cluster"] = await start_cluster(nursery, workdir)
                started["token"] = trio.lowlevel.current_trio_token()
                started["scope"] = nursery.cancel_scope
                ready.set()
        except BaseException as exc:
            started["error"] = exc
            raise
        finally:
            ready.set()

    errors = _ErrorLog()
    logging.getLogger("p2pdist").addHandler(errors)
    thread = threading.Thread(target=trio.run, args=(main,), name="fuzz-services", daemon=True)
    thread.start()
    assert ready.wait(60), "services did not start"
    assert "cluster" in started, f"services failed to start: {started.get('error')!r}"
    try:
        with httpx.Client(timeout=20) as client:
            yield Services(started["cluster"], workdir, errors, client)
    finally:
        trio.from_thread.run_sync(started["scope"].cancel, trio_token=started["token"])
        thread.join(20)
        logging.getLogger("p2pdist").removeHandler(errors)


def one_line_4xx(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    text = response.text.strip()
    if response.request.method == "HEAD":
        return text  # the reason is in the GET's body
    assert text, "a refusal must say why"
    assert "\n" not in text and "Traceback" not in text, text[:300]
    if response.headers.get("content-type", "").startswith("application/json"):
        assert json.loads(text)["errors"][0]["message"]
    return text


# --- the scheduler's msgpack API -----------------------------------------------------------

ENDPOINTS = (
    "/v1/hosts",
    "/v1/hosts/leave",
    "/v1/tasks/register",
    "/v1/tasks/sync",
    "/v1/tasks/seed",
    "/v1/tasks/leave",
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
digests = st.one_of(
    st.sampled_from([BLOB_DIGEST, "sha256:" + "cd" * 32]),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65).map(lambda h: "sha256:" + h),
    st.sampled_from(
        [
            "",
            "sha256:",
            "md5:" + "a" * 32,
            "sha512:" + "a" * 128,
            BLOB_DIGEST.upper(),
            BLOB_DIGEST + "\n",
            " " + BLOB_DIGEST,
            "sha256:" + "٣" * 64,
            "../" * 20,
        ]
    ),
    st.text(max_size=80),
)
urls = st.sampled_from(
    [
        SAFE_URL,
        "",
        "file:///etc/passwd",
        "ftp://127.0.0.1:1/x",
        "http//x",
        "javascript:alert(1)",
        "/v2/a/blobs/x",
        "gopher://127.0.0.1:1/",
    ]
)
# Any of these stand in for a field of the wrong type or size.
wrong_values = st.one_of(
    msgpack_values,
    st.just("x" * 8193),
    st.just(-1),
    st.just(1 << 62),
    st.just([0] * 5000),
    st.just([b"\x00" * 31]),
    st.just({"nested": {"deeper": [1, 2, 3]}}),
)


def valid_fields(path: str) -> dict[str, Any]:
    """A message that would be accepted at `path` (its URLs point nowhere)."""
    base: dict[str, Any] = {"host_id": "fuzz-host", "task_id": BLOB_DIGEST}
    if path == "/v1/hosts":
        return {
            "host_id": "fuzz-host",
            "url": SAFE_URL.split("/v2/")[0],
            "kind": "peer",
            "upload_slots": 1,
            "tasks": [{"task_id": BLOB_DIGEST, "content_length": len(BLOB), "pieces": b"\x80"}],
        }
    if path == "/v1/hosts/leave":
        return {"host_id": "fuzz-host"}
    if path == "/v1/tasks/register":
        return {**base, "url": SAFE_URL, "headers": {}}
    if path == "/v1/tasks/sync":
        return {**base, "new_pieces": [0], "bad_parents": [], "done": False}
    if path == "/v1/tasks/seed":
        return {**base, "content_length": len(BLOB), "first_digest": 0, "piece_digests": [b"\x00" * 32]}
    return base


@st.composite
def scheduler_bodies(draw: st.DrawFn, path: str) -> bytes:
    kind = draw(st.sampled_from(["bytes", "value", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "value":
        return msgpack.packb(draw(msgpack_values), use_bin_type=True)  # type: ignore[no-any-return]
    fields = valid_fields(path)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "digest", "url"]))
        key = draw(st.sampled_from(sorted(fields))) if fields else "host_id"
        if action == "replace":
            fields[key] = draw(wrong_values)
        elif action == "drop":
            fields.pop(key, None)
        elif action == "add":
            fields[draw(st.text(min_size=1, max_size=10))] = draw(msgpack_values)
        elif action == "digest":
            fields["task_id"] = draw(digests)
        else:
            fields["url"] = draw(urls)
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def endpoint_and_body(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(ENDPOINTS))
    return path, draw(scheduler_bodies(path))


@FUZZ
@given(case=endpoint_and_body())
def test_scheduler_answers_any_msgpack_with_a_reply_or_a_one_line_4xx(
    services: Services, case: tuple[str, bytes]
) -> None:
    path, body = case
    response = services.client.post(
        services.cluster.scheduler_url + path, content=body, headers={"content-type": wire.CONTENT_TYPE}
    )
    if response.status_code != 200:
        one_line_4xx(response)
    services.assert_healthy()


@pytest.mark.parametrize(
    "body, status",
    [
        (b"\x91" * 100_000 + b"\xc0", 400),  # arrays nested 100,000 deep
        (b"\x81\xa1a" * 50_000 + b"\xc0", 400),  # maps nested 50,000 deep
        (msgpack.packb({"host_id": "h", "task_id": BLOB_DIGEST, "new_pieces": list(range(300_000))}), 200),
        (b"\xdd\xff\xff\xff\xff", 400),  # an array header claiming 4 billion items, then nothing
        (b"\xdb\xff\xff\xff\xff", 400),  # a str header claiming 4 GiB
        (msgpack.packb({"host_id": "h", "task_id": BLOB_DIGEST}) + b"trailing", 400),
        (msgpack.packb({"host_id": msgpack.ExtType(1, b"x"), "task_id": BLOB_DIGEST}), 400),
        (msgpack.packb({1: "h", "task_id": BLOB_DIGEST}), 400),  # a non-string key
        (b"\x00" * (5 << 20), 413),
    ],
)
def test_scheduler_survives_bombs_and_oversized_bodies(services: Services, body: bytes, status: int) -> None:
    response = services.client.post(f"{services.cluster.scheduler_url}/v1/tasks/sync", content=body)
    assert response.status_code == status, response.text[:300]
    if status != 200:
        one_line_4xx(response)
    services.assert_healthy()


# --- piece servers and the seed trigger ----------------------------------------------------

piece_numbers = st.one_of(
    st.integers(min_value=-5, max_value=10**12).map(str),
    st.sampled_from(["", "0x1", "1e3", " 1", "1 ", "+1", "0" * 20, "²", "٣", "１", "1.0", "%00", "..", "0/"]),
    st.text(max_size=12),
)
path_junk = st.sampled_from(["", "/", "/..", "/../../etc/passwd", "%2f..%2f..", "?x=1", "#frag", "//", "/%00"])


@pytest.mark.parametrize("number", ["²", "٣", "１", "0" * 10, "-0"])
def test_piece_number_must_be_ascii_digits(services: Services, number: str) -> None:
    """str.isdigit() accepts "²" (int() then raised: a 500) and "٣" (read as piece 3)."""
    for base in (services.cluster.peer_url, services.cluster.seed_url):
        response = services.client.get(f"{base}/v1/tasks/{BLOB_DIGEST}/pieces/{_quote(number)}")
        assert response.status_code == 400 and "invalid piece number" in one_line_4xx(response)
    services.assert_healthy()


@FUZZ
@given(digest=digests, number=piece_numbers, junk=path_junk, method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]))
def test_piece_servers_refuse_bad_digests_numbers_and_paths(
    services: Services, digest: str, number: str, junk: str, method: str
) -> None:
    before = services.files()
    target = f"/v1/tasks/{_quote(digest)}/pieces/{_quote(number)}{junk}"
    for base in (services.cluster.peer_url, services.cluster.seed_url):
        response = services.client.request(method, base + target)
        if response.status_code in (200, 206):
            # Only a held piece, asked for properly, comes back.
            assert (digest, base) == (BLOB_DIGEST, services.cluster.peer_url) and method in ("GET", "HEAD")
            assert number.isascii() and int(number) in (0, 1)
        else:
            one_line_4xx(response)
    assert services.files() == before
    services.assert_healthy()


ranges = st.one_of(
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.integers(0, 5 * MiB).map(str) | st.just(""),
        st.integers(0, 5 * MiB).map(str) | st.just(""),
    ),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-10, 10**30), st.integers(-10, 10**30)),
    st.sampled_from(
        [
            "bytes=0-1,5-6",
            "bytes=-",
            "items=0-1",
            "bytes= 0-1",
            "bytes=٣-٤",
            "bytes=0-1-2",
            "bytes=" + "9" * 5000,
            "bytes=--1",
            "bytes=1-0",
        ]
    ),
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t and "\x00" not in t),
)


@FUZZ
@given(range_header=ranges, number=st.sampled_from([0, 1]))
def test_piece_ranges_are_served_exactly_or_refused(services: Services, range_header: str, number: int) -> None:
    url = f"{services.cluster.peer_url}/v1/tasks/{BLOB_DIGEST}/pieces/{number}"
    try:
        response = services.client.get(url, headers={b"range": range_header.strip().encode()})
    except httpx.LocalProtocolError:
        return  # a header value httpx itself will not send
    start = number * PIECE_LENGTHS[0]
    piece = BLOB[start : start + PIECE_LENGTHS[number]]
    if response.status_code == 200:
        assert response.content == piece
    elif response.status_code == 206:
        content_range = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers["content-range"])
        assert content_range is not None, response.headers["content-range"]
        first, last, total = map(int, content_range.groups())
        assert total == len(piece) and response.content == piece[first : last + 1]
    else:
        assert response.status_code in (400, 416), response.status_code
        one_line_4xx(response)
    services.assert_healthy()


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=100),
        msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        st.builds(
            lambda d, u, h: msgpack.packb({"task_id": d, "url": u, "headers": h}),
            digests,
            urls,
            st.dictionaries(st.text(max_size=5), msgpack_values, max_size=2),
        ),
    )
)
def test_seed_trigger_refuses_malformed_messages(services: Services, body: bytes) -> None:
    before = services.files()
    response = services.client.post(f"{services.cluster.seed_url}/v1/seed/tasks", content=body)
    if response.status_code != 202:
        one_line_4xx(response)
        assert services.files() == before
    services.assert_healthy()


# --- the mirror ----------------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(
        [
            "a",
            "library/alpine",
            "..",
            "../etc",
            "a//b",
            "UPPER",
            "a/../b",
            "-a",
            "a-",
            "a" * 300,
            "a/" * 200 + "a",
            "%2e%2e",
            "a\x00b",
            "ä",
            "a b",
            "/abs",
        ]
    ),
    st.text(max_size=40),
)
references = st.one_of(
    digests, st.sampled_from(["latest", "", "-bad", "a" * 200, "../x", "v1.0"]), st.text(max_size=20)
)
# ns values the mirror must refuse before any lookup: nothing here is a hostname it could dial.
bad_ns = st.one_of(
    st.sampled_from(
        [
            "a/b@c",
            "..",
            "[::1",
            "host name",
            "127.0.0.1:",
            ":80",
            "%00",
            "a:b",
            "a..b",
            "-a.io",
            "a" * 64 + ".io",
            "host:0",
            "host:65536",
            "[zz::1]",
        ]
    ),
    st.text(max_size=30).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?", t)),
)


@FUZZ
@given(
    kind=st.sampled_from(["blobs", "manifests", "tags/list", "referrers", "_catalog", "x"]),
    name=names,
    reference=references,
    ns=bad_ns | st.none(),
    method=st.sampled_from(["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
)
# Found by this test on 2026-12-02: a blob GET with ns=".." passed the ns check and crashed the
# handler in the resolver's IDNA step (HTTP 500).
@example(kind="blobs", name="a", reference="sha256:" + "03" * 32, ns="..", method="GET")
@example(kind="blobs", name="a", reference="sha256:" + "03" * 32, ns="a" * 64 + ".io", method="GET")
def test_mirror_refuses_bad_names_references_and_namespaces(
    services: Services, kind: str, name: str, reference: str, ns: str | None, method: str
) -> None:
    before = services.files()
    target = f"/v2/{_quote(name, safe='/')}/{kind}" + (
        "" if kind in ("tags/list", "_catalog") else f"/{_quote(reference)}"
    )
    params = {} if ns is None else {"ns": ns}
    response = services.client.request(
        method, services.cluster.proxy_url + target, params=params, headers={"x-p2pdist-origin-scheme": "http"}
    )
    one_line_4xx(response)
    assert services.files() == before
    services.assert_healthy()


header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@FUZZ
@given(
    headers=st.fixed_dictionaries(
        {},
        optional={
            "x-p2pdist": header_values | st.sampled_from(["0", "1", "999", "-1", "1e9", "00001"]),
            "x-p2pdist-origin-scheme": header_values | st.sampled_from(["http", "https", "HTTP", "ftp", "file"]),
            "range": ranges.filter(str.isascii),
            "authorization": header_values
            | st.sampled_from(["Basic", "Basic !!!", "Bearer", "Basic " + "QQ==" * 3000]),
            "accept": header_values,
        },
    ),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_mirror_headers_never_break_a_blob_request(services: Services, headers: dict[str, str], method: str) -> None:
    """A well-formed blob request whose registry (nothing on 127.0.0.1:1) cannot be reached:
    whatever its headers, the answer is a 4xx reason, the 502 that says the registry is down, or
    the 508 that says the hop count shows a loop."""
    before = services.files()
    try:
        response = services.client.request(
            method,
            f"{services.cluster.proxy_url}/v2/a/blobs/{BLOB_DIGEST}",
            params={"ns": "127.0.0.1:1"},
            headers=headers,
        )
    except httpx.LocalProtocolError:
        return  # a header httpx itself will not send
    if response.status_code == 508:
        assert method == "HEAD" or "loop" in response.text  # x-p2pdist claimed this many daemons already passed it on
    elif response.status_code != 502:
        one_line_4xx(response)
    assert services.files() == before
    services.assert_healthy()


def test_mirror_refuses_a_non_ascii_hop_count(services: Services) -> None:
    response = services.client.get(
        f"{services.cluster.proxy_url}/v2/a/blobs/{BLOB_DIGEST}",
        params={"ns": "127.0.0.1:1"},
        headers={b"x-p2pdist": b"\xb2"},
    )  # latin-1 "²"
    services.errors.records.clear()  # the traceback this logs is the bug itself
    assert response.status_code != 500, response.text


def test_mirror_refuses_a_namespace_with_a_non_ascii_port(services: Services) -> None:
    response = services.client.get(
        f"{services.cluster.proxy_url}/v2/a/blobs/{BLOB_DIGEST}",
        params={"ns": "127.0.0.1:\u0663"},
        headers={"x-p2pdist-origin-scheme": "http"},
    )
    assert response.status_code == 400, response.text


# --- every port: raw request heads, huge headers and bodies, metrics -----------------------


def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on us mid-send: what it answered is what counts
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


request_heads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda m, t, v, h: f"{m} {t} {v}\r\n{h}\r\n".encode("latin-1", "replace"),
        st.sampled_from(["GET", "POST", "G\x00T", "", "CONNECT", "get"]),
        st.sampled_from(["/healthz", "*", "http://x/", "/%", "/%zz", "/\x7f", "", "/" + "a" * 9000, "/\xff"]),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "", "HTTP/1.1 extra"]),
        st.sampled_from(
            [
                "",
                "host: x\r\n",
                "content-length: -1\r\n",
                "content-length: 1, 2\r\n",
                "transfer-encoding: chunked\r\n\r\nzz\r\n",
                "content-length: 99999999999999999999\r\n",
                "transfer-encoding: gzip, chunked\r\n",
                "bad header\r\n",
                " folded: x\r\n",
                "host: x\r\nhost: y\r\n",
                "expect: 100-continue\r\ncontent-length: 10\r\n",
            ]
        ),
    ),
)


@FUZZ
@given(head=request_heads, port=st.sampled_from(["scheduler", "seed", "peer", "proxy"]))
def test_every_port_survives_garbage_request_heads(services: Services, head: bytes, port: str) -> None:
    before = services.files()
    answer = raw_exchange(services.ports[port], head)
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        m = re.fullmatch(rb"HTTP/1\.1 (\d{3}) .*", status_line)
        assert m, status_line[:100]
        # 501 is RFC 9112's answer to a transfer coding the server does not implement.
        assert int(m.group(1)) < 500 or (int(m.group(1)) == 501 and b"Transfer-Encoding" in answer), answer[:300]
    assert services.files() == before
    services.assert_healthy()


@pytest.mark.parametrize("port", ["scheduler", "seed", "peer", "proxy"])
def test_connect_is_refused_not_a_tunnel(services: Services, port: str) -> None:
    """A 2xx to CONNECT switches h11 to a tunnel: the body then crashed the connection."""
    answer = raw_exchange(services.ports[port], b"CONNECT /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 "), answer[:200]
    services.assert_healthy()


@pytest.mark.parametrize("port", ["scheduler", "seed", "peer", "proxy"])
def test_every_port_refuses_huge_headers_and_bodies(services: Services, port: str) -> None:
    url = services.ports[port]
    target = {
        "scheduler": "/v1/tasks/sync",
        "seed": "/v1/seed/tasks",
        "peer": f"/v1/tasks/{BLOB_DIGEST}/pieces/0",
        "proxy": f"/v2/a/blobs/{BLOB_DIGEST}",
    }[port]
    client = services.client
    assert client.get(url + target, headers={"x-big": "a" * (20 << 10)}).status_code == 431
    many = [(f"x-{i}", "v" * 100) for i in range(300)]
    assert client.get(url + target, headers=many).status_code == 431
    assert client.get(url + "/" + "a" * (20 << 10)).status_code in (414, 431)
    # 100 MiB declared, 1 MiB sent: refused without reading the rest, the connection closed.
    answer = raw_exchange(
        url, f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: {100 << 20}\r\n\r\n".encode() + b"\x00" * MiB
    )
    assert re.match(rb"HTTP/1\.1 4\d\d ", answer), answer[:200]
    if port in ("scheduler", "seed"):
        assert answer.startswith(b"HTTP/1.1 413 ")
        chunked = raw_exchange(
            url,
            f"POST {target} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode()
            + b"100000\r\n"
            + b"\x00" * 0x100000
            + b"\r\n"
            + b"400000\r\n"
            + b"\x00" * 0x400000
            + b"\r\n0\r\n\r\n",
        )
        assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]
    # A body shorter than its content-length, then the client gives up: no hang for others.
    raw_exchange(url, f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nshort".encode())
    services.assert_healthy()


@FUZZ
@given(
    port=st.sampled_from(["scheduler", "seed", "peer", "proxy"]),
    path=st.sampled_from(["/metrics", "/healthz"]),
    query=st.text(max_size=30),
    method=st.sampled_from(["GET", "HEAD", "POST", "OPTIONS"]),
)
def test_metrics_and_health_answer_or_refuse_any_request(
    services: Services, port: str, path: str, query: str, method: str
) -> None:
    response = services.client.request(method, services.ports[port] + path, params={"q": query})
    if response.status_code != 200:
        one_line_4xx(response)
    elif method == "GET" and path == "/metrics":
        assert "# TYPE" in response.text
    services.assert_healthy()


def test_nothing_written_outside_the_data_dirs(services: Services) -> None:
    """After all the above, the only files are the services' own: host ids, the held blob."""
    allowed = {services.workdir / "peer-data", services.workdir / "seed-data"}
    for path in services.workdir.rglob("*"):
        if path.is_file():
            assert any(parent in allowed for parent in path.parents), path
    tasks = {p.name for p in (services.workdir / "peer-data" / "tasks").iterdir()}
    assert tasks == {BLOB_DIGEST.split(":")[1]}
    assert not list((services.workdir / "seed-data" / "tasks").iterdir())
    assert os.path.exists(services.workdir / "peer-data" / "host-id")


def _quote(text: str, safe: str = "") -> str:
    return quote(text, safe=safe)

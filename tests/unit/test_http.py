"""The h11/trio HTTP server over real loopback sockets, with httpx (or raw bytes) as client."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pdist.errors import BadRequest, NotFound
from p2pdist.transport.ratelimit import TokenBucket
from p2pdist.transport.server import (
    FileBody,
    Handler,
    Request,
    Response,
    parse_target,
    serve_http,
    text_response,
)

MiB = 1024 * 1024


# Every test here runs twice: as given, and with its kept-alive connections parked in the lane
# between requests (lean parsing, and a quick handler that leaves every request it is not
# given to the handler), so that the lane hands each case back to the usual path unchanged.
_LANE: dict[str, bool] = {"on": False}


@pytest.fixture(autouse=True, params=["tasks", "lane"])
def lane_or_not(request: pytest.FixtureRequest) -> None:
    _LANE["on"] = request.param == "lane"


# For the slow cases with one request per connection: a connection joins the lane only after
# its first answer, so they would run the same code twice.
one_request_per_connection = pytest.mark.parametrize("lane_or_not", ["tasks"], indirect=True)


async def start(nursery: trio.Nursery, handler: Handler, **options: Any) -> str:
    if _LANE["on"]:
        options = {"lean": True, "quick_handler": lambda request: None, **options, "lane": True}
    host, port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, name="test", **options))
    return f"http://{host}:{port}"


async def raw_exchange(base_url: str, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    host, port = base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * MiB + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def test_get_returns_bytes_body_over_one_kept_alive_connection(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        clients: list[tuple[str, int]] = []

        async def handler(request: Request) -> Response:
            clients.append(request.client)
            return Response(200, [("x-path", request.path)], b"hello " + request.path.encode())

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            for name in ("a", "b", "c"):
                response = await client.get(f"{url}/{name}")
                assert response.status_code == 200
                assert response.content == f"hello /{name}".encode()
                assert response.headers["content-length"] == str(len(response.content))
                assert response.headers["x-path"] == f"/{name}"
        assert len(set(clients)) == 1


async def test_request_exposes_decoded_path_query_and_joined_headers(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        seen: list[Request] = []

        async def handler(request: Request) -> Response:
            seen.append(request)
            return text_response(200, "ok")

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{url}/v2/a%20b/blobs/sha256:00?ns=x&ns=y&empty=",
                headers=[("X-Thing", "1"), ("x-thing", "2")],
            )
            assert response.status_code == 200
            assert response.text == "ok\n"
            bad = await client.get(f"{url}/%ff%fe")
            assert bad.status_code == 400
        (request,) = seen
        assert request.method == "GET"
        assert request.target == "/v2/a%20b/blobs/sha256:00?ns=x&ns=y&empty="
        assert request.path == "/v2/a b/blobs/sha256:00"
        assert request.query == {"ns": "x", "empty": ""}
        assert request.headers["x-thing"] == "1, 2"
        assert request.client[0] == "127.0.0.1"


def test_parse_target_rejects_what_it_cannot_decode() -> None:
    assert parse_target("/a%2Fb?x=1&y") == ("/a/b", {"x": "1", "y": ""})
    for target in ("*", "http://elsewhere/x", "/%ff", "/x?a=%ff"):
        with pytest.raises(BadRequest):
            parse_target(target)


class SentBytes:
    """The server's on_bytes_sent count. The server counts a send once it returns, which can be
    after the client has read the last byte, so a test waits for `reached` rather than race it."""

    def __init__(self, expected: int) -> None:
        self.total = 0
        self.expected = expected
        self.reached = trio.Event()

    def __call__(self, nbytes: int) -> None:
        self.total += nbytes
        if self.total >= self.expected:
            self.reached.set()


async def test_file_body_sends_exactly_the_requested_slice(nursery: trio.Nursery, blob: tuple[Path, bytes]) -> None:
    with trio.fail_after(10):
        path, data = blob
        offset, length = 12_345, 2 * MiB + 7
        sent = SentBytes(2 * length)

        async def handler(request: Request) -> Response:
            return Response(200, [("content-type", "application/octet-stream")],
                            FileBody(path, offset, length))  # fmt: skip

        url = await start(nursery, handler, on_bytes_sent=sent)
        async with httpx.AsyncClient() as client:
            for _ in range(2):  # the connection is reusable after a sendfile body
                response = await client.get(f"{url}/blob")
                assert response.status_code == 200
                assert response.headers["content-length"] == str(length)
                assert response.content == data[offset : offset + length]
        await sent.reached.wait()
        assert sent.total == 2 * length


async def test_file_body_past_the_end_of_the_file_is_a_500_not_a_short_body(
    nursery: trio.Nursery, blob: tuple[Path, bytes]
) -> None:
    with trio.fail_after(10):
        path, data = blob

        async def handler(request: Request) -> Response:
            return Response(200, body=FileBody(path, len(data) - 10, 100))

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/blob")
            assert response.status_code == 500


async def test_head_gives_the_get_content_length_and_no_body(nursery: trio.Nursery, blob: tuple[Path, bytes]) -> None:
    with trio.fail_after(10):
        path, data = blob

        async def stream() -> AsyncIterator[bytes]:
            yield b"never sent"

        async def handler(request: Request) -> Response:
            if request.path == "/file":
                return Response(200, body=FileBody(path, 0, len(data)))
            if request.path == "/stream":
                return Response(200, [("content-length", "10")], stream())
            return Response(200, body=b"0123456789abc")

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            for target, length in (("/file", len(data)), ("/bytes", 13), ("/stream", 10)):
                response = await client.head(url + target)
                assert response.status_code == 200
                assert response.headers["content-length"] == str(length)
                assert response.content == b""
            # nothing stray was left on the connection
            response = await client.get(f"{url}/bytes")
            assert response.content == b"0123456789abc"


async def test_async_iterable_body_is_sent_chunked(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        parts = [b"first ", b"", b"x" * 200_000, b" last"]

        async def stream() -> AsyncIterator[bytes]:
            for part in parts:
                await trio.lowlevel.checkpoint()
                yield part

        async def handler(request: Request) -> Response:
            return Response(200, body=stream())

        sent = SentBytes(1)
        url = await start(nursery, handler, on_bytes_sent=sent)
        async with httpx.AsyncClient() as client:
            for _ in range(2):
                response = await client.get(f"{url}/stream")
                assert response.status_code == 200
                assert response.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in response.headers
                assert response.content == b"".join(parts)
        # Only file bodies (pieces) count as uploaded: a streamed or in-memory body does not.
        assert sent.total == 0


async def test_handler_errors_with_a_status_answer_one_line_and_keep_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            if request.path == "/bad":
                raise BadRequest("digest is not sha256:<64 hex>")
            if request.path == "/missing":
                raise NotFound("no such blob\nsecond line")
            if request.path == "/bug":
                raise KeyError("oops")
            return text_response(200, "fine")

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/bad")
            assert response.status_code == 400
            assert response.text == "digest is not sha256:<64 hex>\n"
            response = await client.get(f"{url}/missing")
            assert response.status_code == 404
            assert response.text == "no such blob second line\n"
            with caplog.at_level(logging.ERROR, logger="p2pdist.http"):
                response = await client.get(f"{url}/bug")
            assert response.status_code == 500
            assert response.text == "internal error\n"
            assert any(r.exc_info and "handler failed" in r.getMessage() for r in caplog.records)
            response = await client.get(f"{url}/ok")
            assert response.status_code == 200
            assert response.text == "fine\n"


async def test_malformed_request_gets_400_and_the_server_keeps_serving(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        url = await start(nursery, handler)
        reply = await raw_exchange(url, b"THIS IS NOT\x01 HTTP\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert reply.count(b"\n", reply.index(b"\r\n\r\n") + 4) == 1  # a one-line reason
        reply = await raw_exchange(url, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/")).text == "fine\n"


@pytest.mark.parametrize("header_bytes", [2_000, 100_000])
async def test_oversized_request_head_gets_431(nursery: trio.Nursery, header_bytes: int) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        url = await start(nursery, handler, max_header_bytes=1024)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/", headers={"x-big": "a" * header_bytes})
            assert response.status_code == 431
            assert (await client.get(f"{url}/")).text == "fine\n"


async def test_request_body_over_the_limit_gets_413(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            body = await request.body(limit=1000)
            return Response(200, body=body[::-1])

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}/echo", content=b"x" * 5000)
            assert response.status_code == 413
            assert response.text == "request body over 1000 bytes\n"

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(5):
                    yield b"y" * 400

            response = await client.post(f"{url}/echo", content=chunked())
            assert response.status_code == 413
            response = await client.post(f"{url}/echo", content=b"abc")
            assert response.status_code == 200
            assert response.content == b"cba"


async def test_unread_request_body_is_skipped_and_the_connection_reused(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        clients: list[tuple[str, int]] = []

        async def handler(request: Request) -> Response:
            clients.append(request.client)
            return text_response(200, request.method)

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            assert (await client.put(f"{url}/x", content=b"z" * 100_000)).text == "PUT\n"
            assert (await client.get(f"{url}/x")).text == "GET\n"
            # too big to drain: answered, then the connection is closed; httpx reconnects
            assert (await client.put(f"{url}/x", content=b"z" * (3 * MiB))).text == "PUT\n"
            assert (await client.get(f"{url}/x")).text == "GET\n"
        assert clients[0] == clients[1] == clients[2] != clients[3]


@pytest.mark.parametrize("declared_length", [None, "2000"])
async def test_body_iterator_failing_midway_truncates_the_response(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, declared_length: str | None
) -> None:
    with trio.fail_after(10):

        async def stream() -> AsyncIterator[bytes]:
            yield b"a" * 1000
            await trio.sleep(0.05)
            raise RuntimeError("disk vanished")

        async def handler(request: Request) -> Response:
            headers = [("content-length", declared_length)] if declared_length else []
            return Response(200, headers, stream())

        url = await start(nursery, handler)
        async with httpx.AsyncClient() as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await client.get(f"{url}/stream")
        errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
        assert any("disk vanished" in str(error) for error in errors)


@one_request_per_connection
async def test_client_leaving_mid_response_is_cleaned_up_quietly(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        path = tmp_path / "big"
        path.write_bytes(b"\0" * (32 * MiB))
        closed = trio.Event()

        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"b" * 65536
            finally:
                closed.set()

        async def handler(request: Request) -> Response:
            if request.path == "/stream":
                return Response(200, body=endless())
            return Response(200, body=FileBody(path, 0, 32 * MiB))

        url = await start(nursery, handler)
        host, port = url.removeprefix("http://").split(":")
        with caplog.at_level(logging.DEBUG, logger="p2pdist.http"):
            for target in (b"/file", b"/stream"):
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 200")
                await stream.aclose()
            await closed.wait()  # the generator body was closed, not leaked
            await trio.sleep(0.2)
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/file")).content == b"\0" * (32 * MiB)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@one_request_per_connection
async def test_client_that_stops_reading_a_file_body_is_dropped_after_the_request_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        path = tmp_path / "big"
        path.write_bytes(b"\0" * (32 * MiB))
        done = trio.Event()

        async def handler(request: Request) -> Response:
            return Response(200, body=FileBody(path, 0, 32 * MiB, on_done=done.set))

        url = await start(nursery, handler, request_timeout_s=0.5)
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(1.5)  # the client reads nothing for three times the timeout
        await done.wait()  # the upload gave up (and freed what it held)
        received = 0
        try:
            while chunk := await stream.receive_some(1 << 20):
                received += len(chunk)
        except trio.BrokenResourceError:
            pass  # reset by the server: also a cut-short body
        assert received < 32 * MiB
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/big")
        assert response.status_code == 200 and len(response.content) == 32 * MiB


@one_request_per_connection
async def test_upload_bucket_limits_file_throughput(nursery: trio.Nursery, blob: tuple[Path, bytes]) -> None:
    with trio.fail_after(10):
        path, data = blob
        size = 2 * MiB

        async def handler(request: Request) -> Response:
            return Response(200, body=FileBody(path, 0, size))

        bucket = TokenBucket(rate_bps=3 * MiB, burst_bytes=64 * 1024)
        url = await start(nursery, handler, upload_bucket=bucket)
        async with httpx.AsyncClient() as client:
            started = time.monotonic()
            response = await client.get(f"{url}/blob")
            elapsed = time.monotonic() - started
        assert response.content == data[:size]
        # (2 MiB - 64 KiB burst) / 3 MiB/s = 0.646 s at least; generous above
        assert 0.6 <= elapsed <= 3.0


async def test_cancelling_the_server_closes_idle_connections_promptly() -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        async with trio.open_nursery() as nursery:
            url = await start(nursery, handler)
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/")).status_code == 200
                started = time.monotonic()
                nursery.cancel_scope.cancel()
        assert time.monotonic() - started < 1.0
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{url}/")


@one_request_per_connection
async def test_a_trickled_request_head_gets_408_after_the_head_timeout_even_with_a_long_handler_budget(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        # The proxy's shape: an hour for the handler, a second for the head.
        url = await start(nursery, handler, request_timeout_s=3600.0, head_timeout_s=1.0)
        host, port = url.removeprefix("http://").split(":")
        started = time.monotonic()
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 408 ")
        assert 0.9 <= time.monotonic() - started < 5
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/")).text == "fine\n"


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        url = await start(nursery, handler, idle_timeout_s=60.0, head_timeout_s=0.5)
        host, port = url.removeprefix("http://").split(":")
        started = time.monotonic()
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            assert await stream.receive_some(65536) == b""  # closed by the server
        assert time.monotonic() - started < 5


async def test_connections_past_the_cap_get_503_with_a_log_line_and_the_server_recovers(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        url = await start(nursery, handler, max_connections=3, head_timeout_s=30.0)
        host, port = url.removeprefix("http://").split(":")
        held = []
        for _ in range(3):  # three kept-alive connections, each known to the server by its answer
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"fine\n"):
                received += await stream.receive_some(65536)
            held.append(stream)
        with caplog.at_level(logging.WARNING, logger="p2pdist.http"):
            reply = await raw_exchange(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert reply.endswith(b"too many connections\n")
        assert b"\r\nretry-after: 1\r\n" in reply.lower()
        assert any("max_connections" in r.getMessage() for r in caplog.records)
        for stream in held:
            await stream.aclose()
        # Once the held connections are gone, new ones are served again.
        async with httpx.AsyncClient() as client:
            for _ in range(50):
                try:
                    if (await client.get(f"{url}/")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.05)
            assert (await client.get(f"{url}/")).text == "fine\n"


async def test_a_quick_handler_answers_lean_calls_at_once_and_leaves_the_rest_to_the_handler(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        handled: list[str] = []

        def quick(request: Request) -> Response | None:
            if request.path == "/slow":
                return None
            if request.path == "/bad":
                raise BadRequest("no such thing\nhere")
            if request.path == "/bug":
                raise KeyError("x")
            body = request.body_now()
            return None if body is None else Response(200, [("content-type", "text/plain")], b"quick:" + body)

        async def handler(request: Request) -> Response:
            handled.append(request.path)
            return text_response(200, "slow " + (await request.body()).decode())

        url = await start(nursery, handler, lean=True, quick_handler=quick)
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        answers = []
        async with stream:
            received = b""
            for path, body in (("/a", b"1"), ("/slow", b"2"), ("/bad", b""), ("/bug", b""), ("/b", b"3")):
                head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body))
                await stream.send_all(head + body)
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
                head, _, received = received.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(received) < length:
                    received += await stream.receive_some(65536)
                answers.append((head.decode(), received[:length].decode()))
                received = received[length:]
        assert answers[0][0].startswith("HTTP/1.1 200 ") and answers[0][1] == "quick:1"
        assert answers[1][0].startswith("HTTP/1.1 200 ") and answers[1][1] == "slow 2\n"
        assert answers[2][0].startswith("HTTP/1.1 400 ") and answers[2][1] == "no such thing here\n"
        assert answers[3][0].startswith("HTTP/1.1 500 ") and answers[3][1] == "internal error\n"
        assert answers[4][1] == "quick:3"
        assert handled == ["/slow"]


async def test_a_kept_alive_connection_idle_past_its_timeout_is_closed_and_the_server_serves_on(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            return text_response(200, "fine")

        url = await start(nursery, handler, lean=True, idle_timeout_s=0.5)
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"fine\n"):
                received += await stream.receive_some(65536)
            answered = time.monotonic()
            assert await stream.receive_some(65536) == b""  # closed by the server once idle
            assert 0.4 <= time.monotonic() - answered < 5
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/")).text == "fine\n"

"""The daemons' lean HTTP client over real loopback sockets: bodies received in a worker thread."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from functools import partial

import pytest
import trio

from p2pdist.errors import UpstreamError
from p2pdist.transport.piececlient import POLL_MS, PieceClient
from p2pdist.transport.server import Request, Response, serve_http

MiB = 1 << 20


async def serve_raw(nursery: trio.Nursery, reply: bytes, *, then_stall: bool) -> str:
    """A server that answers every connection with `reply`, then stalls or closes."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(reply)
        if then_stall:
            await trio.sleep_forever()
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_body_received_in_a_thread_arrives_whole_and_the_connection_is_reused(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        data = os.urandom(5 * MiB + 17)
        connections: list[tuple[str, int]] = []

        async def handler(request: Request) -> Response:
            connections.append(request.client)
            return Response(200, body=data)

        host, port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, name="test"))
        client = PieceClient()
        for _ in range(2):
            sha = hashlib.sha256()
            async with client.get(f"http://{host}:{port}/piece") as response:
                assert response.status == 200 and response.can_drain_in_thread
                await response.drain_in_thread(sha.update)
            assert sha.digest() == hashlib.sha256(data).digest()
        await client.aclose()
        assert connections[0] == connections[1]


async def test_body_cut_short_is_an_upstream_error_naming_the_bytes_received(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        url = await serve_raw(
            nursery, b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 300, then_stall=False
        )
        client = PieceClient()
        received: list[int] = []
        with pytest.raises(UpstreamError, match="after 300 of 1000 bytes"):
            async with client.get(f"{url}/piece") as response:
                await response.drain_in_thread(lambda chunk: received.append(len(chunk)))
        assert sum(received) == 300
        await client.aclose()


async def test_cancelling_a_body_received_in_a_thread_stops_it_promptly(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        url = await serve_raw(nursery, b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10, then_stall=True)
        client = PieceClient()
        started = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            async with client.get(f"{url}/piece") as response:
                await response.drain_in_thread(lambda chunk: None)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 0.3 + 4 * POLL_MS / 1000
        await client.aclose()


async def test_a_retry_on_a_fresh_connection_that_breaks_is_an_upstream_error(nursery: trio.Nursery) -> None:
    """A kept-alive connection found closed gets one fresh try; if that one breaks too (a
    scheduler killed mid-answer), the caller gets an UpstreamError it handles, not a crash."""
    with trio.fail_after(10):
        connections = 0

        async def handle(stream: trio.SocketStream) -> None:
            nonlocal connections
            connections += 1
            await stream.receive_some(65536)
            if connections == 1:
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await stream.aclose()  # the kept-alive connection goes away while idle
                return
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # reset without an answer

        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1/tasks/sync"
        client = PieceClient()
        async with client.request("POST", url, body=b"x") as response:
            assert await response.read() == b"ok"
        with pytest.raises(UpstreamError):
            async with client.request("POST", url, body=b"x") as response:
                await response.read()
        assert connections == 2  # the idle one, then one fresh try
        await client.aclose()


@pytest.mark.parametrize(
    "reply, status, body",
    [
        # Plain heads, parsed without h11.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: 1\r\n\r\nabc", 200, b"abc"),
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nx-a: 1 2\r\n\r\nno", 503, b"no"),
        (b"HTTP/1.0 404 Not Found\r\ncontent-length: 0\r\n\r\n", 404, b""),
        # Left to h11, which reads them as before.
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 200, b"ok"),
        (b"HTTP/1.1 200 \xe9t\xe9\r\ncontent-length: 2\r\n\r\nok", 200, b"ok"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok", 200, b"ok"),
    ],
)
async def test_response_heads_plain_or_odd_read_the_same(
    nursery: trio.Nursery, reply: bytes, status: int, body: bytes
) -> None:
    with trio.fail_after(10):
        url = await serve_raw(nursery, reply, then_stall=True)
        client = PieceClient()
        async with client.get(f"{url}/piece", {"x-p2pdist": "1"}) as response:
            assert (response.status, await response.read()) == (status, body)
            assert response.headers["content-length"] == str(len(body))
        await client.aclose()


@pytest.mark.parametrize(
    "reply, error",
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokay", "more than its content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok", "malformed response"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\nok", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\nok", "malformed response"),
        (b"SMTP ready\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "malformed response"),
        (b"", "malformed response|closed the connection"),  # closed without a word
    ],
)
async def test_malformed_or_unsupported_responses_are_upstream_errors(
    nursery: trio.Nursery, reply: bytes, error: str
) -> None:
    with trio.fail_after(10):
        url = await serve_raw(nursery, reply, then_stall=False)
        client = PieceClient()
        with pytest.raises(UpstreamError, match=error):
            async with client.get(f"{url}/piece") as response:
                await response.read()
        await client.aclose()


def test_requests_with_odd_fields_are_written_by_h11() -> None:
    from p2pdist.transport.piececlient import _Head

    plain = _Head("POST", "/v1/tasks/sync", [("host", "h:1"), ("content-length", "2")], b"{}")
    assert plain.lean == b"POST /v1/tasks/sync HTTP/1.1\r\nhost: h:1\r\ncontent-length: 2\r\n\r\n{}"
    assert _Head("GET", "/a b", [("host", "h")], b"").lean is None
    assert _Head("GET", "/a", [("host", "h"), ("x", "caf\xe9")], b"").lean is None
    assert _Head("PUT", "/a", [("host", "h")], b"").lean is None

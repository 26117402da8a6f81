"""The HTTP server's lane (p2pdist/transport/lane.py) over real loopback sockets: kept-alive
connections parked between requests, quick answers written by the lane's one task, and every
case it cannot finish handed back to the connection's own task with the same bytes on the wire."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio

from p2pdist.errors import BadRequest
from p2pdist.transport.drain import CURRENT, Drain
from p2pdist.transport.server import Request, Response, serve_http, text_response

MiB = 1024 * 1024


def post(path: str, body: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


async def read_answer(stream: trio.SocketStream, buffer: bytearray) -> tuple[str, bytes]:
    """One length-framed answer from `stream` (what follows it stays in `buffer`)."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the connection"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    buffer[:] = rest
    while len(buffer) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the connection mid-answer"
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return head.decode(), body


class Served:
    """A quick handler that echoes, answers big, fails or leaves a request, by its path; and a
    handler that says it took one."""

    def __init__(self) -> None:
        self.quick_calls = 0
        self.handled: list[str] = []

    def quick(self, request: Request) -> Response | None:
        self.quick_calls += 1
        if request.path == "/slow":
            return None
        if request.path == "/bad":
            raise BadRequest("no such thing")
        body = request.body_now()
        if body is None:
            return None
        if request.path == "/big":
            return Response(200, [("content-type", "application/octet-stream")], b"z" * (8 * MiB))
        return Response(200, [("content-type", "text/plain")], b"quick:" + body)

    async def handler(self, request: Request) -> Response:
        self.handled.append(request.path)
        return text_response(200, "slow " + (await request.body()).decode())


@contextlib.asynccontextmanager
async def parked(host: str, port: int) -> AsyncIterator[tuple[trio.SocketStream, bytearray]]:
    """A connection whose first call was answered, so that it now waits in the lane."""
    async with await trio.open_tcp_stream(host, port) as stream:
        buffer = bytearray()
        await stream.send_all(post("/echo", b"first"))
        assert (await read_answer(stream, buffer))[1] == b"quick:first"
        yield stream, buffer


async def start(nursery: trio.Nursery, served: Served, **options: Any) -> tuple[str, int]:
    host, port = await nursery.start(
        partial(
            serve_http,
            served.handler,
            "127.0.0.1",
            0,
            name="test",
            lean=True,
            quick_handler=served.quick,
            lane=True,
            **options,
        )
    )
    return host, port


async def test_parked_connections_get_quick_answers_the_handlers_answers_and_errors_in_order(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served)
        streams = [await trio.open_tcp_stream(host, port) for _ in range(5)]
        buffers = [bytearray() for _ in streams]
        with caplog.at_level(logging.DEBUG, logger="p2pdist.http"):
            for round_ in range(20):
                for i, stream in enumerate(streams):
                    await stream.send_all(post("/echo", b"%d-%d" % (i, round_)))
                for i, stream in enumerate(streams):
                    head, body = await read_answer(stream, buffers[i])
                    assert head.startswith("HTTP/1.1 200 ") and body == b"quick:%d-%d" % (i, round_)
            stream, buffer = streams[0], buffers[0]
            for path, body in (("/slow", b"s"), ("/bad", b""), ("/echo", b"after")):
                await stream.send_all(post(path, body))
                answers = await read_answer(stream, buffer)
                if path == "/slow":
                    assert answers[1] == b"slow s\n"
                elif path == "/bad":
                    assert answers[0].startswith("HTTP/1.1 400 ") and answers[1] == b"no such thing\n"
                else:
                    assert answers[1] == b"quick:after"
        for stream in streams:
            await stream.aclose()
        assert served.handled == ["/slow"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_pipelined_requests_in_one_write_are_all_answered_in_order(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served)
        async with parked(host, port) as (stream, buffer):
            await stream.send_all(b"".join(post("/echo", b"%d" % n) for n in range(50)) + post("/slow", b"x"))
            for n in range(50):
                assert (await read_answer(stream, buffer))[1] == b"quick:%d" % n
            assert (await read_answer(stream, buffer))[1] == b"slow x\n"
            await stream.send_all(post("/echo", b"last"))
            assert (await read_answer(stream, buffer))[1] == b"quick:last"


async def test_an_answer_bigger_than_the_socket_buffer_is_finished_by_the_connections_task(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served)
        async with parked(host, port) as (stream, buffer):
            await stream.send_all(post("/big"))
            await trio.sleep(0.1)  # the lane writes what fits, and hands the rest over
            head, body = await read_answer(stream, buffer)
            assert head.startswith("HTTP/1.1 200 ") and body == b"z" * (8 * MiB)
            await stream.send_all(post("/echo", b"2"))
            assert (await read_answer(stream, buffer))[1] == b"quick:2"


async def test_a_head_split_across_writes_is_read_on_by_the_connections_task(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served)
        async with parked(host, port) as (stream, buffer):
            whole = post("/echo", b"split")
            await stream.send_all(whole[:10])
            await trio.sleep(0.05)
            await stream.send_all(whole[10:])
            # h11 reads a split head and its body, as without the lane: the handler's answer
            assert (await read_answer(stream, buffer))[1] == b"slow split\n"
            await stream.send_all(post("/echo", b"3"))
            assert (await read_answer(stream, buffer))[1] == b"quick:3"


async def test_a_trickled_head_on_a_parked_connection_still_gets_408(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served, head_timeout_s=0.3)
        async with parked(host, port) as (stream, buffer):
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHo")
            head, _ = await read_answer(stream, buffer)
            assert head.startswith("HTTP/1.1 408 ")


async def test_garbage_on_a_parked_connection_gets_a_400_and_the_server_serves_on(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served)
        async with parked(host, port) as (stream, buffer):
            await stream.send_all(b"\x00\x01 not http at all\r\n\r\n")
            head, _ = await read_answer(stream, buffer)
            assert head.startswith("HTTP/1.1 400 ")
            assert await stream.receive_some(100) == b""  # a refusal closes the connection
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(post("/echo", b"again"))
            assert (await read_answer(stream, bytearray()))[1] == b"quick:again"


async def test_parked_connections_idle_past_their_timeout_are_closed(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served, idle_timeout_s=0.4)
        async with await trio.open_tcp_stream(host, port) as stream:
            buffer = bytearray()
            for n in range(4):  # activity keeps it open past the timeout
                if n:
                    await trio.sleep(0.25)
                await stream.send_all(post("/echo", b"%d" % n))
                await read_answer(stream, buffer)
                answered = trio.current_time()
            assert await stream.receive_some(100) == b""
            assert 0.3 <= trio.current_time() - answered < 2


async def test_a_client_that_closes_while_parked_frees_its_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        host, port = await start(nursery, served, max_connections=3)
        for n in range(10):  # more than the cap, one after another: each close must free its slot
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(post("/echo", b"%d" % n))
                assert (await read_answer(stream, bytearray()))[1] == b"quick:%d" % n
            await trio.sleep(0.02)


async def test_while_draining_a_parked_connection_gets_503_from_the_usual_path(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        served = Served()
        drain = Drain()
        token = CURRENT.set(drain)  # the server's tasks inherit it, as under run_service
        try:
            host, port = await start(nursery, served)
        finally:
            CURRENT.reset(token)
        async with parked(host, port) as (stream, buffer):
            drain.draining = True
            await stream.send_all(post("/echo", b"2"))
            head, body = await read_answer(stream, buffer)
            assert head.startswith("HTTP/1.1 503 ") and body == b"draining: shutting down\n"

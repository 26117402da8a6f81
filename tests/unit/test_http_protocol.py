"""The server's HTTP protocol without sockets: request bytes in, protocol events out; responses
in, the bytes to write out (file bodies as spans for sendfile)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import h11
import pytest

from p2pdist.errors import BodyTooLarge
from p2pdist.transport.protocol import (
    NEED_DATA,
    Answer,
    ClientClosed,
    FileBody,
    FileSpan,
    NeedData,
    Piece,
    Refusal,
    RequestReceived,
    Response,
    ServerProtocol,
    error_response,
    text_response,
)

CLIENT = ("127.0.0.1", 5000)


LEAN = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["h11", "lean"])
def lean_lane(request: pytest.FixtureRequest) -> None:
    """Every test here runs with the lean lane off and on: whatever it takes must come out the
    same as through h11, and whatever it leaves to h11 must behave as before."""
    LEAN[0] = request.param


def protocol(max_header_bytes: int = 16 * 1024) -> ServerProtocol:
    return ServerProtocol(CLIENT, max_header_bytes=max_header_bytes, lean=LEAN[0])


def wire(pieces: list[Piece]) -> bytes:
    assert not any(isinstance(p, FileSpan) for p in pieces)
    return b"".join(bytes(p) for p in pieces if not isinstance(p, FileSpan))


def parse_response(data: bytes, method: str = "GET") -> tuple[h11.Response, bytes]:
    """Read `data` back with h11's client side: the response head and its body."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    head = client.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return head, body


def send_whole(p: ServerProtocol, response: Response) -> bytes:
    assert isinstance(response.body, bytes)
    pieces = p.respond_head(response, p.body_length(response))
    if p.sends_body(response):
        pieces += p.respond_data(response.body)
    return wire(pieces + p.respond_end())


def request(p: ServerProtocol, data: bytes) -> RequestReceived:
    p.receive_data(data)
    event = p.next_request()
    assert isinstance(event, RequestReceived), event
    return event


def test_a_request_head_split_over_reads_becomes_one_request_with_decoded_parts() -> None:
    p = protocol()
    first = p.next_request()
    assert isinstance(first, NeedData) and first.idle
    p.receive_data(b"GET /v2/a%20b/blobs/x?ns=reg&ns=other HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")
    partial = p.next_request()
    assert isinstance(partial, NeedData) and not partial.idle  # part of a head: the request timeout runs
    event = request(p, b"x-a: 2\r\n\r\n")
    req = event.request
    assert (req.method, req.path, req.query) == ("GET", "/v2/a b/blobs/x", {"ns": "reg"})
    assert req.headers["x-a"] == "1, 2" and req.client == CLIENT


def test_keep_alive_serves_a_second_request_after_the_first_response() -> None:
    p = protocol()
    request(p, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = parse_response(send_whole(p, text_response(200, "one")))
    assert head.status_code == 200 and body == b"one\n"
    assert p.discard_body() is True and p.start_next_cycle()
    assert request(p, b"").request.path == "/two"


def test_client_closing_between_requests_is_no_error() -> None:
    p = protocol()
    p.receive_data(b"")
    assert isinstance(p.next_request(), ClientClosed)


def test_garbage_is_refused_with_a_one_line_400_that_closes() -> None:
    p = protocol()
    p.receive_data(b"THIS IS NOT\x01 HTTP\r\n\r\n")
    event = p.next_request()
    assert isinstance(event, Refusal)
    data = send_whole(p, event.response)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in data.lower()
    assert data.split(b"\r\n\r\n", 1)[1].count(b"\n") == 1
    assert p.must_close


def test_a_timed_out_head_can_still_be_answered_408() -> None:
    p = protocol()
    p.receive_data(b"GET / HTT")
    assert isinstance(p.next_request(), NeedData)
    refusal = p.refusal(408, "request head not received in time")
    assert isinstance(refusal, Refusal) and refusal.response.status == 408


@pytest.mark.parametrize(
    "data, status",
    [
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
        (b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://elsewhere/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431),
    ],
)
def test_requests_the_handler_never_sees_are_answered_and_the_connection_kept(data: bytes, status: int) -> None:
    # h11 limits only a head still incomplete; one that arrived whole but is over
    # max_header_bytes gets a 431 without the handler.
    p = protocol(max_header_bytes=1024)
    p.receive_data(data)
    event = p.next_request()
    assert isinstance(event, Answer) and event.response.status == status
    head, _ = parse_response(send_whole(p, event.response))
    assert head.status_code == status
    assert p.discard_body() is True and p.start_next_cycle()


def test_a_head_over_the_buffer_limit_is_refused_431_and_closes() -> None:
    p = protocol(max_header_bytes=1024)
    p.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
    event = p.next_request()
    assert isinstance(event, Refusal) and event.response.status == 431


def test_head_of_a_large_file_carries_its_length_and_no_body() -> None:
    p = protocol()
    request(p, b"HEAD /blob HTTP/1.1\r\nHost: x\r\n\r\n")
    response = Response(200, body=FileBody("/nonexistent", 0, 10 * 1024 * 1024))
    assert not p.sends_body(response)
    data = wire(p.respond_head(response, p.body_length(response)) + p.respond_end())
    head, body = parse_response(data, method="HEAD")
    assert dict(head.headers)[b"content-length"] == str(10 * 1024 * 1024).encode() and body == b""


def test_a_file_body_is_handed_back_as_a_span_for_sendfile() -> None:
    p = protocol()
    request(p, b"GET /piece HTTP/1.1\r\nHost: x\r\n\r\n")
    response = Response(200, [("content-length", "999")], FileBody("/x", 100, 4096))
    pieces = p.respond_head(response, p.body_length(response))
    span = FileSpan(7, 100, 4096)
    pieces += p.respond_data(span) + p.respond_end()
    assert [p for p in pieces if isinstance(p, FileSpan)] == [span]
    head = b"".join(bytes(x) for x in pieces if not isinstance(x, FileSpan))
    assert head.lower().count(b"content-length") == 1  # the handler's wrong one was replaced
    assert b"content-length: 4096" in head.lower()


def test_a_streamed_body_without_a_length_is_sent_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"x"

    p = protocol()
    request(p, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    response = Response(200, body=parts())
    assert p.body_length(response) is None
    data = wire(p.respond_head(response, None) + p.respond_data(b"hello ") + p.respond_data(b"world") + p.respond_end())
    head, body = parse_response(data)
    assert dict(head.headers)[b"transfer-encoding"] == b"chunked" and body == b"hello world"


def test_a_body_longer_than_its_declared_length_fails_and_the_connection_is_dropped() -> None:
    p = protocol()
    request(p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    p.respond_head(Response(200, [("content-length", "3")]), 3)
    with pytest.raises(h11.LocalProtocolError):
        p.respond_data(b"four")
    assert not p.response_complete and not p.start_next_cycle()


def test_request_body_is_read_whole_within_its_limit() -> None:
    p = protocol()
    event = request(p, b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    assert p.start_body(100) == (True, b"")
    assert p.read_body(100) is NEED_DATA
    p.receive_data(b"56789")
    assert p.read_body(100) == b"0123456789"
    assert event.request.method == "POST"


def test_request_body_declared_over_the_limit_is_refused_before_it_is_read() -> None:
    p = protocol()
    request(p, b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    with pytest.raises(BodyTooLarge):
        p.start_body(1000)
    with pytest.raises(BodyTooLarge):  # and stays refused
        p.start_body(1000)


def test_chunked_request_body_over_the_limit_is_refused_as_it_arrives() -> None:
    p = protocol()
    request(p, b"POST /v1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert p.start_body(1000) == (True, b"")
    p.receive_data(b"3e8\r\n" + b"y" * 1000 + b"\r\n5\r\nyyyyy\r\n0\r\n\r\n")
    with pytest.raises(BodyTooLarge):
        p.read_body(1000)


def test_a_client_waiting_for_100_continue_gets_it_when_the_body_is_read() -> None:
    p = protocol()
    request(p, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    expected, first = p.start_body(100)
    assert expected and first.startswith(b"HTTP/1.1 100 ")


def test_an_unread_body_is_skipped_when_small_and_closes_the_connection_when_large() -> None:
    small = protocol()
    request(small, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    data = send_whole(small, text_response(200, "PUT"))
    assert b"connection: close" not in data.lower()
    assert small.discard_body() is NEED_DATA
    small.receive_data(b"z" * 100_000)
    assert small.discard_body() is True and small.start_next_cycle()

    large = protocol()
    request(large, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n")
    data = send_whole(large, text_response(200, "PUT"))
    assert b"connection: close" in data.lower() and large.must_close


def test_error_response_answers_only_exceptions_that_carry_a_status() -> None:
    class Gone(Exception):
        status = 410

    answer = error_response(Gone("it went\naway"))
    assert answer is not None and answer.status == 410 and answer.body == b"it went away\n"
    assert error_response(KeyError("x")) is None
    assert error_response(type("Odd", (Exception,), {"status": True})()) is None


# --- the lean lane against h11 ----------------------------------------------------------

PARITY_REQUESTS = [
    b"POST /v1/tasks/sync HTTP/1.1\r\nHost: s:8002\r\nContent-Type: application/msgpack\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /v2/a%20b/blobs/x?ns=reg&ns=other HTTP/1.1\r\nhost: x\r\nX-A:  spaced  value \r\n\r\n",
    b"POST /empty HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /dup HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\nok",
    b"POST /close HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"GET /old HTTP/1.0\r\n\r\n",
    b"GET /nohost HTTP/1.1\r\nX: y\r\n\r\n",
    b"POST /plus HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nok",
    b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"b" * 70000,
    b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
    b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /latin HTTP/1.1\r\nHost: x\r\nX-L: caf\xe9\r\n\r\n",
]


async def served(lean: bool, data: bytes, response: Response) -> tuple[object, bytes, bool]:
    """What a protocol makes of `data` (the request's parts, or the refusal), the bytes of
    `response` (or of the refusal) and whether the connection then stays open."""
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=lean)

    async def read_body(limit: int) -> bytes:  # what the transport does, with every byte here
        if not p.start_body(limit)[0]:
            return b""
        body = p.read_body(limit)
        assert isinstance(body, bytes)
        return body

    p.receive_data(data)
    event = p.next_request(read_body)
    if isinstance(event, RequestReceived):
        r = event.request
        seen: object = (r.method, r.target, r.path, r.query, r.headers, await r.body())
    elif isinstance(event, Answer | Refusal):
        seen, response = type(event).__name__, event.response
    else:
        seen = type(event).__name__
        return seen, b"", False
    out = send_whole(p, response)
    return seen, out, p.discard_body() is True and p.start_next_cycle()


@pytest.mark.parametrize("data", PARITY_REQUESTS, ids=range(len(PARITY_REQUESTS)))
async def test_the_lean_lane_reads_and_answers_every_request_as_h11_does(data: bytes) -> None:
    answer = Response(200, [("content-type", "application/msgpack")], b"\x80reply")
    through_h11 = await served(False, data, answer)
    lean = await served(True, data, answer)
    assert lean[0] == through_h11[0] and lean[2] == through_h11[2]
    if through_h11[1]:
        method = data.split(b" ", 1)[0].decode()
        lean_head, lean_body = parse_response(lean[1], method)
        h11_head, h11_body = parse_response(through_h11[1], method)
        assert (lean_head.status_code, lean_body) == (h11_head.status_code, h11_body)
        assert sorted(lean_head.headers) == sorted(h11_head.headers)


async def test_the_lean_lane_serves_pipelined_requests_one_by_one() -> None:
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    p.receive_data(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n2"
    )
    for path, body in (("/a", b"1"), ("/b", b"2")):
        event = p.next_request()
        assert isinstance(event, RequestReceived) and event.request.path == path
        assert await event.request.body() == body
        head, reply = parse_response(send_whole(p, Response(200, [], b"ok")), "POST")
        assert head.status_code == 200 and reply == b"ok"
        assert p.discard_body() is True and p.start_next_cycle()
    assert isinstance(p.next_request(), NeedData)


async def test_a_lean_answer_that_says_close_ends_the_connection_and_a_streamed_one_is_chunked() -> None:
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(p, b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    pieces = p.respond_head(Response(200, []), None) + p.respond_data(b"abc") + p.respond_end()
    head, body = parse_response(wire(pieces))
    assert head.status_code == 200 and body == b"abc"
    assert p.start_next_cycle()
    request(p, b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    send_whole(p, text_response(503, "draining", [("connection", "close")]))
    assert p.must_close and not p.start_next_cycle()


def test_a_lean_answer_shorter_than_its_declared_length_fails() -> None:
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    p.respond_head(Response(200, [("content-length", "3")]), 3)
    p.respond_data(b"ab")
    with pytest.raises(h11.LocalProtocolError):
        p.respond_end()
    assert not p.response_complete and not p.start_next_cycle()


@pytest.mark.parametrize(
    "response",
    [
        Response(200, [("content-type", "application/msgpack")], b"\x80reply"),
        Response(404, [("content-type", "text/plain"), ("Content-Length", "99")], b"gone\n"),
        Response(503, [("connection", "close")], b"later\n"),
        Response(200, [], b""),
    ],
    ids=["msgpack", "stale-length", "close", "empty"],
)
def test_a_lean_answer_in_one_piece_is_the_bytes_and_state_of_the_usual_framing(response: Response) -> None:
    data = b"POST /v1/tasks/sync HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    usual = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(usual, data)
    expected = send_whole(usual, response)
    whole = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(whole, data)
    assert whole.lean_answer(response) == expected
    assert (whole.must_close, whole.response_complete) == (usual.must_close, usual.response_complete)
    assert whole.lean_answer(response) is None  # one answer per request


def test_a_lean_answer_is_only_for_lean_requests_with_bytes_bodies() -> None:
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(p, b"GET / HTTP/1.0\r\n\r\n")  # through h11
    assert p.lean_answer(Response(200, [], b"ok")) is None
    p = ServerProtocol(CLIENT, max_header_bytes=16 * 1024, lean=True)
    request(p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert p.lean_answer(Response(204, [], b"")) is None
    assert p.lean_answer(Response(200, [], FileBody("/nowhere", 0, 1))) is None

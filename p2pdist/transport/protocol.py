"""The HTTP/1.1 server protocol, apart from any socket: h11 turns received bytes into requests
(or refusals), and responses into the bytes to send, file bodies left as `FileSpan`s for the
transport to sendfile. `server.py` is the trio loop that moves the bytes and keeps the time.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal, cast
from urllib.parse import parse_qsl, unquote

import h11

from p2pdist.errors import BadRequest, BodyTooLarge

# A request body the handler did not read is read and discarded to keep the connection alive
# only if it is at most this big; larger ones close the connection instead.
DRAIN_LIMIT_BYTES = 1024 * 1024


@dataclass
class FileBody:
    """`length` bytes of the file at `path` starting at `offset`, sent with os.sendfile."""

    path: str | os.PathLike[str]
    offset: int
    length: int
    # Called once the body has been sent or has failed (e.g. to free an upload slot).
    on_done: Callable[[], None] | None = field(default=None, compare=False)


ResponseBody = bytes | FileBody | AsyncIterable[bytes] | AsyncIterable[bytes | FileBody]


@dataclass
class Response:
    """Content-Length is set for bytes and FileBody bodies; an AsyncIterable body is sent
    chunked unless the handler sets content-length itself."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: ResponseBody = b""


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    client: tuple[str, int]
    # Reads the body from the connection (the transport's), given the size limit.
    _read_body: Callable[[int], Awaitable[bytes]] | None = field(default=None, repr=False, compare=False)
    _body: bytes | None = field(default=None, repr=False, compare=False)

    async def body(self, limit: int = 1 << 20) -> bytes:
        """The whole request body; BodyTooLarge (413) if it is over `limit` bytes."""
        if self._body is None:
            self._body = b"" if self._read_body is None else await self._read_body(limit)
        if len(self._body) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        return self._body

    def body_now(self, limit: int = 1 << 20) -> bytes | None:
        """The body if it has arrived with the head (the lean lane takes it whole), without
        waiting; None if it must be read with body(). BodyTooLarge as body()."""
        if self._body is None:
            if self._read_body is not None:
                return None
            self._body = b""
        if len(self._body) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        return self._body


Handler = Callable[[Request], Awaitable[Response]]
# Answers a request at once, without awaiting anything, or says None to leave it to the Handler.
QuickHandler = Callable[[Request], Response | None]


def text_response(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A one-line text/plain response."""
    line = " ".join(message.splitlines()) + "\n"
    return Response(
        status,
        [("content-type", "text/plain; charset=utf-8"), *headers],
        line.encode("utf-8"),
    )


def error_response(exc: BaseException) -> Response | None:
    """The answer to a handler's exception that carries an HTTP status (4xx/5xx), else None."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return text_response(status, str(exc) or HTTPStatus(status).phrase)
    return None


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into its percent-decoded path and query (first value wins)."""
    if not target.startswith("/"):
        raise BadRequest(f"request target must be a path: {target[:100]!r}")
    raw_path, _, raw_query = target.partition("#")[0].partition("?")
    try:
        path = unquote(raw_path, errors="strict")
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict", max_num_fields=100)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"malformed request target: {exc}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        query.setdefault(key, value)
    return path, query


class FileSpan:
    """Stands in for a FileBody's bytes in h11 so it frames and counts them; see h11's
    `send_with_data_passthrough`. The transport sends it with sendfile."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


# What ServerProtocol.next_request gives back.
class NeedData:
    """More bytes are needed; `idle` if none of the next request has arrived yet."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle


@dataclass
class RequestReceived:
    """A request for the handler."""

    request: Request


@dataclass
class Answer:
    """A request answered without the handler (CONNECT, an undecodable target, a head over
    the limit); the connection stays usable."""

    response: Response


@dataclass
class Refusal:
    """A request that could not be parsed: send the response, then close."""

    response: Response


class ClientClosed:
    """The client closed its side between requests (or h11 cannot go on)."""


ProtocolEvent = NeedData | RequestReceived | Answer | Refusal | ClientClosed
Piece = bytes | FileSpan  # what the transport writes: bytes, or a file region to sendfile
NEED_DATA = h11.NEED_DATA  # a body read that wants more bytes


# The lean lane (see ServerProtocol): what it takes without h11. Anything else goes to h11.
LEAN_METHODS = frozenset({"GET", "POST"})
LEAN_HEAD_BYTES = 8 * 1024
LEAN_BODY_BYTES = 64 * 1024
_LEAN_TARGET = re.compile(r"/[\x21-\x7e]*")
_LEAN_NAME = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_LEAN_VALUE = r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?"
# Header lines, each ending in CRLF: a name, a colon, a value with optional blanks around it.
_LEAN_HEADER_LINES = re.compile(rf"(?:{_LEAN_NAME}:[ \t]*{_LEAN_VALUE}[ \t]*\r\n)*")
_LEAN_HEADER_PAIRS = re.compile(rf"({_LEAN_NAME}):[ \t]*({_LEAN_VALUE})[ \t]*\r\n")
# Encoded response heads kept by lean_answer, per status and header list (a service answers
# with a handful of them).
LEAN_HEADS_KEPT = 256
_LEAN_HEADS: dict[tuple[object, ...], tuple[bytes, bool]] = {}
# Headers whose meaning changes the framing or the connection: h11 handles those requests.
_LEAN_REFUSED_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade", "connection"})


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


# A lean head as parsed: method, target, path, query (or the BadRequest its target makes),
# headers, Content-Length; False if it is not one for the lean lane (h11 reads it).
_LeanHead = tuple[str, str, str, dict[str, str] | BadRequest, dict[str, str], int]
# Heads parsed, by their bytes (see _lean_next): up to this many, of up to this size each.
LEAN_PARSED_KEPT = 1024
LEAN_PARSED_HEAD_BYTES = 1024
_LEAN_PARSED: dict[bytes, _LeanHead | Literal[False]] = {}


def _parse_lean_head(raw: bytes) -> _LeanHead | Literal[False]:
    """A request head without its blank line, if the lean lane takes it: a GET or POST of
    HTTP/1.1 with a plain target, well-formed header lines, a Host, each header once, at
    most a Content-Length for framing (up to LEAN_BODY_BYTES) and nothing that changes
    framing or the connection."""
    try:
        head = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    request_line, crlf, lines = head.partition("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in LEAN_METHODS:
        return False
    method, target, _ = parts
    if not _LEAN_TARGET.fullmatch(target):
        return False
    # Every header line checked in one match, then split in one pass (both at C speed):
    # a line by line loop of regex calls was most of the cost of reading a request.
    lines += crlf
    if not _LEAN_HEADER_LINES.fullmatch(lines):
        return False
    pairs = _LEAN_HEADER_PAIRS.findall(lines)
    headers = {name.lower(): value for name, value in pairs}
    if len(headers) < len(pairs) or not _LEAN_REFUSED_HEADERS.isdisjoint(headers):
        return False  # a repeated header, or one that changes framing or the connection
    length = headers.get("content-length", "0")
    if "host" not in headers or not length.isdigit() or int(length) > LEAN_BODY_BYTES:
        return False
    query: dict[str, str] | BadRequest
    if "%" in target or "?" in target or "#" in target:
        try:
            path, query = parse_target(target)
        except BadRequest as exc:
            path, query = target, exc
    else:
        path, query = target, {}  # what parse_target makes of a plain path, without its work
    return method, target, path, query, headers, int(length)


class ServerProtocol:
    """One connection's requests and responses as bytes, with h11. The transport feeds it
    `receive_data`, asks `next_request`, and writes what `respond_*` return.

    With `lean`, the common request is parsed and answered without h11: a whole HTTP/1.1 GET
    or POST in the bytes received between requests, with a Host, at most a Content-Length
    for framing, and nothing that changes the connection (no Transfer-Encoding, Expect,
    Upgrade or Connection header). h11's per-request cost was most of the scheduler's CPU per
    sync. Whatever else arrives (a split head, a large body, HTTP/1.0, an odd header, garbage)
    goes to h11 as before, with every byte, so its answers to bad input are unchanged.
    """

    def __init__(self, client: tuple[str, int], *, max_header_bytes: int, lean: bool = False) -> None:
        self.client = client
        self.max_header_bytes = max_header_bytes
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._lean = lean
        self._lean_buffer = b""  # received bytes h11 has not seen, for the lean lane
        # The current request came through the lean lane: its response is framed here. Then
        # `_lean_left` is what the body still owes its Content-Length (None: sent chunked)
        # and `_lean_state` how the response stands: "head", "body", then "done" or "close"
        # (sent whole; "close" if it said `connection: close`), or "failed".
        self._lean_request = False
        self._lean_left: int | None = None
        self._lean_state = "head"
        self._method = "GET"
        self._request_headers: Sequence[tuple[bytes, bytes]] = ()
        self._body_chunks: list[bytes] = []
        self._body_size = 0
        # Set once a request body was refused as too large: what is left of it is no body.
        self._body_refused = False
        self._discarded = 0  # bytes of an unread request body skipped so far
        # h11 has been given bytes (or the close): until then it is idle with nothing
        # trailing, which the lean lane takes for granted instead of asking it every request.
        self._h11_fed = False

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" when it closed its side."""
        if data and self._lean_between_requests():
            self._lean_buffer += data
            return
        self._to_h11()
        self._h11_fed = True
        self._h11.receive_data(data)

    def _lean_between_requests(self) -> bool:
        if not self._lean or self._lean_request:
            return False
        if not self._h11_fed:
            return True
        h = self._h11
        return h.our_state is h11.IDLE and h.their_state is h11.IDLE and not h.trailing_data[0]

    def _to_h11(self) -> None:
        """Hand the lean lane's bytes to h11, which serves the request they start."""
        if self._lean_buffer:
            data, self._lean_buffer = self._lean_buffer, b""
            self._h11_fed = True
            self._h11.receive_data(data)

    # --- requests -------------------------------------------------------------------------

    def next_request(self, read_body: Callable[[int], Awaitable[bytes]] | None = None) -> ProtocolEvent:
        """The next thing the transport must act on. `read_body` goes into the Request so the
        handler can read its body through the transport."""
        if self._lean_buffer:
            if (lean := self._lean_next()) is not None:
                return lean
            self._to_h11()
        elif self._lean_between_requests() and not (self._h11_fed and self._h11.trailing_data[1]):
            return NeedData(idle=True)  # what h11 would say (nothing received, not closed), without asking it
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            return self.refusal(exc.error_status_hint, str(exc) or "malformed request")
        if event is h11.NEED_DATA:
            return NeedData(idle=not self._h11.trailing_data[0])
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return ClientClosed()
        if not isinstance(event, h11.Request):
            raise RuntimeError(f"unexpected h11 event {event!r}")
        return self._accept(event, read_body)

    def refusal(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Refusal | ClientClosed:
        """A one-line refusal that closes the connection, if a response can still be sent."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return ClientClosed()
        self._method = "GET"  # whatever the unparsed request was, the refusal has a body
        return Refusal(text_response(status, message, [("connection", "close"), *headers]))

    def _lean_next(self) -> RequestReceived | Answer | None:
        """The next request from the lean lane's bytes, or None to let h11 have them."""
        buffer = self._lean_buffer
        end = buffer.find(b"\r\n\r\n", 0, LEAN_HEAD_BYTES)
        if end < 0 or end + 4 > self.max_header_bytes:
            return None
        # A daemon's calls repeat the same few heads (its path, host, types, secret, a length):
        # what a head says is kept by its bytes, so most calls skip the parse. What a head
        # says depends on nothing else, so a kept answer is the parse's answer.
        key = buffer[:end]
        head = _LEAN_PARSED.get(key)
        if head is None:
            head = _parse_lean_head(key)
            if end <= LEAN_PARSED_HEAD_BYTES:
                if len(_LEAN_PARSED) >= LEAN_PARSED_KEPT:
                    _LEAN_PARSED.clear()
                _LEAN_PARSED[key] = head
        if head is False:
            return None
        method, target, path, query, headers, length = head
        start = end + 4
        stop = start + length
        if len(buffer) < stop:
            return None  # the body is still on its way: h11 reads it
        self._lean_buffer = buffer[stop:]
        self._lean_request = True
        self._lean_state = "head"
        self._method = method
        self._body_refused = False
        if isinstance(query, BadRequest):
            return Answer(text_response(query.status, str(query)))
        return RequestReceived(
            Request(
                method=method,
                target=target,
                path=path,
                query=dict(query),
                headers=dict(headers),
                client=self.client,
                _body=buffer[start:stop],
            )
        )

    def _accept(self, event: h11.Request, read_body: Callable[[int], Awaitable[bytes]] | None) -> ProtocolEvent:
        method = event.method.decode("ascii")
        self._method = method
        self._request_headers = event.headers
        self._body_refused = False
        if method == "CONNECT":
            # h11 takes any 2xx to CONNECT as a switch to a tunnel, after which no body can go out.
            return Answer(text_response(405, "CONNECT is not supported: this is not a proxy"))
        try:
            target = event.target.decode("ascii")
        except UnicodeDecodeError:
            return Answer(text_response(400, "request target is not ASCII"))
        try:
            path, query = parse_target(target)
        except BadRequest as exc:
            return Answer(text_response(exc.status, str(exc)))
        head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_bytes > self.max_header_bytes:
            return Answer(text_response(431, f"request head over {self.max_header_bytes} bytes"))
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("ascii")
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return RequestReceived(
            Request(
                method=method,
                target=target,
                path=path,
                query=query,
                headers=headers,
                client=self.client,
                _read_body=read_body,
            )
        )

    # --- the request body -----------------------------------------------------------------

    def start_body(self, limit: int) -> tuple[bool, bytes]:
        """Whether a request body is to be read, and the bytes to send first (a 100 Continue).
        BodyTooLarge if its declared length is over `limit`."""
        if self._body_refused:
            raise BodyTooLarge(f"request body over {limit} bytes")
        if self._h11.their_state is not h11.SEND_BODY:
            return False, b""
        declared = self._declared_length()
        if declared is not None and declared > limit:
            self._body_refused = True
            raise BodyTooLarge(f"request body over {limit} bytes")
        self._body_chunks, self._body_size = [], 0
        if self._h11.they_are_waiting_for_100_continue:
            return True, self._h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        return True, b""

    def read_body(self, limit: int) -> bytes | type[h11.NEED_DATA]:
        """The whole body once it has arrived, else NEED_DATA. BodyTooLarge past `limit`;
        h11.RemoteProtocolError for a malformed body."""
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                return h11.NEED_DATA
            if isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > limit:
                    self._body_refused = True
                    raise BodyTooLarge(f"request body over {limit} bytes")
                self._body_chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                body = b"".join(self._body_chunks)
                self._body_chunks = []
                return body
            else:
                raise RuntimeError(f"unexpected h11 event in a request body: {event!r}")

    def _declared_length(self) -> int | None:
        declared = [v for k, v in self._request_headers if k == b"content-length"]
        return int(declared[0]) if declared else None  # h11 has checked it is a number

    def _must_close_for_unread_body(self) -> bool:
        """Whether the request body the handler left unread is too costly to drain."""
        if self._h11.their_state is not h11.SEND_BODY:
            return False
        if self._h11.they_are_waiting_for_100_continue:
            return True  # the client may never send it
        declared = self._declared_length()
        return declared is not None and declared > DRAIN_LIMIT_BYTES

    # --- responses ------------------------------------------------------------------------

    def body_length(self, response: Response) -> int | None:
        """The Content-Length the response will carry (None: sent chunked)."""
        body = response.body
        if isinstance(body, bytes):
            return len(body)
        if isinstance(body, FileBody):
            return body.length
        declared = [v for k, v in response.headers if k.lower() == "content-length"]
        return int(declared[0]) if declared else None

    def sends_body(self, response: Response) -> bool:
        return not (self._method == "HEAD" or response.status in (204, 304))

    def respond_head(self, response: Response, length: int | None) -> list[Piece]:
        """The status line and headers: content-length set from `length`, `connection: close`
        added when the unread request body is too big to drain."""
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        if length is not None and response.status != 204:
            headers.append(("content-length", str(length)))
        if self._must_close_for_unread_body():
            headers.append(("connection", "close"))
        if self._lean_request:
            return [self._lean_head(response.status, headers, length)]
        head = h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))
        return self._send(head)

    def lean_answer(self, response: Response) -> bytes | None:
        """All of `response` to a lean request as one piece, framed as respond_head,
        respond_data and respond_end frame it, when its body is bytes; else None (send it
        the usual way). The scheduler answers every call so: one write, the head of each
        distinct status and header list encoded once."""
        body = response.body
        if not self._lean_request or self._lean_state != "head" or type(body) is not bytes:
            return None
        status = response.status
        if status in (204, 304):
            return None
        key = (status, *response.headers)
        framed = _LEAN_HEADS.get(key)
        if framed is None:
            headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
            try:
                head = b"".join(
                    [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
                    + [b"%s: %s\r\n" % (k.encode("ascii"), v.encode("latin-1")) for k, v in headers]
                )
            except UnicodeEncodeError:
                return None  # the usual way fails on it too, and says so
            framed = (head, any(k.lower() == "connection" and "close" in v.lower() for k, v in headers))
            if len(_LEAN_HEADS) < LEAN_HEADS_KEPT:
                _LEAN_HEADS[key] = framed
        head, close = framed
        self._lean_left = 0
        self._lean_closes = close
        self._lean_state = "close" if close else "done"
        return b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)

    def respond_data(self, data: bytes | FileSpan) -> list[Piece]:
        """A body part, framed (a chunk header and trailer when sent chunked)."""
        if self._lean_request:
            return self._lean_data(data)
        return self._send(h11.Data(data=cast(bytes, data)))

    def respond_end(self) -> list[Piece]:
        if self._lean_request:
            return self._lean_end()
        return self._send(h11.EndOfMessage())

    def response_failed(self) -> None:
        """The response could not be sent whole: h11 will let no further one follow."""
        if self._lean_request:
            self._lean_state = "failed"
            return
        self._h11.send_failed()

    # --- responses to lean requests: the framing h11 would write ------------------------

    def _lean_head(self, status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
        if self._lean_state != "head":
            self._lean_state = "failed"
            raise h11.LocalProtocolError("a response head was already sent")
        no_body = self._method == "HEAD" or status in (204, 304)
        close = any(k.lower() == "connection" and "close" in v.lower() for k, v in headers)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        lines += [b"%s: %s\r\n" % (k.encode("ascii"), v.encode("latin-1")) for k, v in headers]
        if length is None and not no_body:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        self._lean_left = 0 if no_body else length
        self._lean_state = "body"
        self._lean_closes = close
        return b"".join(lines)

    def _lean_data(self, data: bytes | FileSpan) -> list[Piece]:
        if self._lean_state != "body":
            self._lean_state = "failed"
            raise h11.LocalProtocolError("no response body can be sent now")
        size = len(data)
        if self._lean_left is None:
            return [b"%x\r\n" % size, data, b"\r\n"] if size else []
        if size > self._lean_left:
            self._lean_state = "failed"
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self._lean_left -= size
        return [data]

    def _lean_end(self) -> list[Piece]:
        if self._lean_state != "body":
            self._lean_state = "failed"
            raise h11.LocalProtocolError("no response to end")
        if self._lean_left:
            self._lean_state = "failed"
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        end: list[Piece] = [b"0\r\n\r\n"] if self._lean_left is None else []
        self._lean_state = "close" if self._lean_closes else "done"
        return end

    def _send(self, event: h11.Event) -> list[Piece]:
        try:
            return cast(list[Piece], self._h11.send_with_data_passthrough(event) or [])
        except BaseException:
            self._h11.send_failed()
            raise

    # --- between requests -----------------------------------------------------------------

    @property
    def must_close(self) -> bool:
        """The response said the connection ends here (close it gracefully)."""
        if self._lean_request:
            return self._lean_state == "close"
        return self._h11.our_state is h11.MUST_CLOSE

    @property
    def response_complete(self) -> bool:
        """False after a response cut short: the connection can only be dropped."""
        if self._lean_request:
            return self._lean_state == "done"
        return self._h11.our_state is h11.DONE

    def discard_body(self) -> bool | type[h11.NEED_DATA]:
        """Skip what is left of a request body the handler did not read: True once it has
        all arrived, False if it is over DRAIN_LIMIT_BYTES or malformed, else NEED_DATA."""
        if self._lean_request:
            return True  # the lean lane took the whole body with the head
        try:
            while self._h11.their_state is h11.SEND_BODY:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return h11.NEED_DATA
                if isinstance(event, h11.Data):
                    self._discarded += len(event.data)
                    if self._discarded > DRAIN_LIMIT_BYTES:
                        return False
        except h11.RemoteProtocolError:
            return False
        return True

    def start_next_cycle(self) -> bool:
        """Get ready for the next request on this connection; False if there can be none."""
        if self._lean_request:
            if self._lean_state != "done":
                return False
            self._lean_request = False
            self._lean_state = "head"
            return True
        if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        self._discarded = 0
        return True

"""The one HTTP/1.1 client for the cluster's own traffic: pieces from parents, calls to the
scheduler, and the scheduler's wake-ups to seeds. h11 writes each request and parses each
response head; the body bytes after the head bypass h11 (they start in h11's trailing data),
received with recv_into into a reused buffer (one per receiving thread, or per connection on
the async path) and handed to the caller as views. Keep-alive connections per server. The
common exchange (a plain request head; an HTTP/1.1 or 1.0 response head with at most a
Content-Length for framing) is written and parsed here without h11, whose per-exchange cost
was a third of a peer's piece requests; anything else in a response head is handed to h11
whole, so odd or malformed answers are judged exactly as before.

httpx measured 160-250 MB/s here for 4 MiB pieces; this path reaches several times that,
which the "at least half of curl" target needs, and a scheduler sync costs a fraction of
httpx's CPU (peers sync several times a second). Only what our servers speak is supported:
Content-Length bodies, no redirects, no chunked encoding. https:// servers are reached over
TLS (bytes then come through SSLStream, not recv_into); a cluster secret rides on every request.
The registry clients talk to the outside world (redirects, token auth) and stay on httpx.
"""

from __future__ import annotations

import os
import re
import select
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import trio

from p2pdist.errors import UpstreamError
from p2pdist.transport.plainsock import receive_now, write_now
from p2pdist.transport.trust import bearer_headers

MAX_HEAD_BYTES = 16 * 1024
HEAD_RECEIVE_BYTES = 64 * 1024  # a head and whatever of the body came with it
RECV_BYTES = 1 << 20
IDLE_PER_PARENT = 8
DRAIN_BYTES = 64 * 1024
POLL_MS = 50  # how often a receiving thread looks for its task's cancellation
SMALL_BODY_BYTES = 64 * 1024  # scheduler replies, refusals: read into a buffer of their size
# What a request or response head may hold for this module to write or parse it without h11.
_TARGET = re.compile(r"/[\x21-\x7e]*")
_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: [\t\x20-\x7e]*)?")
# Headers this module leaves to h11 (framing it does not do, or a field h11 would refuse).
_H11_ONLY = frozenset({"transfer-encoding"})

_thread_buffers = threading.local()


def _thread_buffer() -> bytearray:
    """This worker thread's receive buffer. Allocated once per thread, not per connection: a
    fresh MiB costs its zeroing and, on first touch, a page fault per 4 KiB, which a peer
    opening a connection to each new parent paid in its event loop."""
    buf: bytearray | None = getattr(_thread_buffers, "buf", None)
    if buf is None:
        buf = _thread_buffers.buf = bytearray(RECV_BYTES)
    return buf


@dataclass
class PieceResponse:
    status: int
    headers: dict[str, str]
    length: int
    _conn: _Conn
    _buffered: bytearray = field(default_factory=bytearray)
    received: int = 0
    keep_alive: bool = True  # whether the server lets the connection carry another request

    async def chunks(self) -> AsyncIterator[memoryview]:
        """The body, as views into a buffer reused between chunks: consume each before the next."""
        if (first := self._take_buffered()) is not None:
            yield first
        remaining = self.length - self.received
        buf = bytearray(remaining) if remaining <= SMALL_BODY_BYTES else self._conn.recv_buffer()
        view = memoryview(buf)
        if isinstance(self._conn.stream, trio.SSLStream):
            async for chunk in self._tls_chunks(self._conn.stream, view):
                yield chunk
            return
        sock = self._conn.stream.socket
        while self.received < self.length:
            # Fill the whole buffer before handing it on: one write and one hash update per
            # MiB instead of one per socket read.
            want = min(len(buf), self.length - self.received)
            filled = 0
            while filled < want:
                try:
                    n = await sock.recv_into(view[filled:want])
                except OSError as exc:
                    raise _connection_failed(exc) from None
                if n == 0:
                    raise self._cut_short(filled)
                filled += n
            self.received += filled
            yield view[:filled]

    async def _tls_chunks(
        self, stream: trio.SSLStream[trio.SocketStream], view: memoryview
    ) -> AsyncIterator[memoryview]:
        while self.received < self.length:
            want = min(len(view), self.length - self.received)
            filled = 0
            while filled < want:
                try:
                    data = await stream.receive_some(want - filled)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise UpstreamError(f"TLS connection to server failed: {exc.__cause__ or exc}") from None
                if not data:
                    raise self._cut_short(filled)
                view[filled : filled + len(data)] = data
                filled += len(data)
            self.received += filled
            yield view[:filled]

    @property
    def can_drain_in_thread(self) -> bool:
        return not isinstance(self._conn.stream, trio.SSLStream)

    async def drain_in_thread(self, sink: Callable[[memoryview], None], then: Callable[[], None] | None = None) -> None:
        """Receive the rest of the body in a worker thread, handing `sink` (called in that
        thread) each filled buffer, up to RECV_BYTES at a time, then calling `then` there
        (the caller's finishing work, at no second thread hop). Plain TCP only.

        The receive, and whatever `sink` does with the bytes (hash, write), then run beside
        the event loop and beside other pieces' threads: one peer pulling from one parent
        uses both cores, and the loop is not woken for every socket read. Cancelling the
        calling task stops the thread within POLL_MS.
        """
        if then is None and self.received + len(self._buffered) >= self.length:
            if (first := self._take_buffered()) is not None:  # all here: no thread needed
                sink(first)
            return
        await trio.to_thread.run_sync(self._drain_blocking, sink, then)

    def _drain_blocking(self, sink: Callable[[memoryview], None], then: Callable[[], None] | None) -> None:
        if (first := self._take_buffered()) is not None:
            sink(first)
        self._receive_blocking(sink)
        if then is not None:
            then()

    def _receive_blocking(self, sink: Callable[[memoryview], None]) -> None:
        if self.received >= self.length:
            return
        stream = self._conn.stream
        assert isinstance(stream, trio.SocketStream)
        fd = stream.socket.fileno()
        view = memoryview(_thread_buffer())
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while self.received < self.length:
            want = min(len(view), self.length - self.received)
            filled = 0
            while filled < want:
                try:
                    n = os.readv(fd, [view[filled:want]])
                except BlockingIOError:
                    trio.from_thread.check_cancelled()
                    poller.poll(POLL_MS)
                    continue
                except OSError as exc:
                    raise _connection_failed(exc) from None
                if n == 0:
                    raise self._cut_short(filled)
                filled += n
            self.received += filled
            sink(view[:filled])

    def _take_buffered(self) -> memoryview | None:
        """The body's bytes that arrived with the response head, counted as received."""
        if not self._buffered:
            return None
        first = bytes(self._buffered[: self.length])
        self._buffered.clear()
        self.received += len(first)
        return memoryview(first)

    def _cut_short(self, filled: int) -> UpstreamError:
        return UpstreamError(f"server closed the connection after {self.received + filled} of {self.length} bytes")

    def take_buffered_body(self) -> bytes | None:
        """The whole body when it all came with the head (a refusal, a scheduler reply): taken
        without the async generator, the buffer and the event-loop round of `chunks()`;
        None when some of it is still on the wire."""
        if self.received or len(self._buffered) < self.length:
            return None
        body = bytes(self._buffered[: self.length])
        self._buffered.clear()
        self.received = self.length
        return body

    async def read(self) -> bytes:
        if (body := self.take_buffered_body()) is not None:
            return body
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
        return bytes(out)


@dataclass
class _Conn:
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    buffer: bytearray | None = None  # for bodies received on the event loop; made on first use

    def recv_buffer(self) -> bytearray:
        if self.buffer is None:
            self.buffer = bytearray(RECV_BYTES)
        return self.buffer

    async def send(self, data: bytes) -> None:
        """send_all, with the write tried first straight on the socket when it is plain TCP: a
        request head nearly always fits the socket buffer, and trio's send_all (its conflict
        detector, a checkpoint before and after) cost several times the write, on every piece
        request, busy answer and scheduler call."""
        if isinstance(self.stream, trio.SocketStream):
            data = write_now(self.stream.socket, data)
            if not data:
                return
        await self.stream.send_all(data)

    async def receive(self, max_bytes: int) -> bytes:
        """receive_some, read straight from the socket when it is plain TCP (waiting until it is
        readable), as `send` writes."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return bytes(await stream.receive_some(max_bytes))
        return await receive_now(stream.socket, max_bytes)


class PieceClient:
    def __init__(
        self, *, connect_timeout_s: float = 5.0, secret: str | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.auth_headers = bearer_headers(secret)
        self.ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}

    def get(self, url: str, headers: dict[str, str] | None = None) -> AbstractAsyncContextManager[PieceResponse]:
        return self.request("GET", url, headers)

    @asynccontextmanager
    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> AsyncIterator[PieceResponse]:
        """One request on a kept-alive connection. A body the caller leaves unread is drained
        when it is small (a 404 or 503 text), so a refusal does not cost a new connection."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"unsupported URL {url[:100]}")
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        fields = [("host", parts.netloc), *{**self.auth_headers, **(headers or {})}.items()]
        if body or method not in ("GET", "HEAD"):
            fields.append(("content-length", str(len(body))))
        head = _Head(method, target or "/", fields, body)
        if head.lean is None:
            try:
                head.h11_request()
            except h11.LocalProtocolError as exc:
                raise UpstreamError(f"cannot send {url[:100]}: {exc}") from None
        conn, reused = await self._connect(key)
        response: PieceResponse | None = None
        try:
            try:
                response = await self._exchange(conn, head, body)
            except UpstreamError:
                if not reused:
                    raise
                # A kept-alive connection the server closed meanwhile: one fresh try.
                await conn.stream.aclose()
                conn, reused = await self._connect(key, fresh=True)
                response = await self._exchange(conn, head, body)
            yield response
            unread = method != "HEAD" and response.received < response.length <= response.received + DRAIN_BYTES
            # A refusal's text nearly always came with its head: taken at once, no wait.
            if unread and response.take_buffered_body() is None:
                with trio.move_on_after(1.0):
                    async for _ in response.chunks():
                        pass
        except BaseException:
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()
            raise
        else:
            idle = self._idle.setdefault(key, [])
            if response.keep_alive and response.received == response.length and len(idle) < IDLE_PER_PARENT:
                idle.append(conn)
            else:
                with trio.CancelScope(shield=True):
                    await conn.stream.aclose()

    async def _exchange(self, conn: _Conn, head: _Head, body: bytes) -> PieceResponse:
        """Send a request and read the response head; a broken connection is an UpstreamError."""
        data = head.lean
        if data is None:
            protocol = head.h11_connection()
            data = protocol.send(head.h11_request())
            if body:
                data += protocol.send(h11.Data(data=body))
            data += protocol.send(h11.EndOfMessage())
        try:
            await conn.send(data)
            if head.lean is None:
                return await self._read_head(conn, protocol)
            return await self._read_lean_head(conn, head)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _as_upstream(exc) from None

    async def _read_lean_head(self, conn: _Conn, head: _Head) -> PieceResponse:
        """The response head, parsed here when it is a plain one; else everything received so
        far goes to h11 (as if it had sent the request) and h11 parses it."""
        received = b""
        while (end := received.find(b"\r\n\r\n")) < 0:
            if len(received) > MAX_HEAD_BYTES:
                break
            data = await conn.receive(HEAD_RECEIVE_BYTES)
            if not data:
                break
            received += data
        else:
            parsed = _parse_head(received[:end])
            if parsed is not None:
                status, keep_alive, headers = parsed
                length = int(headers.get("content-length", "0"))
                rest = received[end + 4 :]
                if len(rest) > length:
                    raise UpstreamError("server sent more than its content-length")
                return PieceResponse(status, headers, length, conn, bytearray(rest), keep_alive=keep_alive)
        protocol = head.h11_connection()
        protocol.send(head.h11_request())
        if head.body:
            protocol.send(h11.Data(data=head.body))
        protocol.send(h11.EndOfMessage())
        protocol.receive_data(received)  # b"": the server closed before answering
        return await self._read_head(conn, protocol)

    async def _connect(self, key: tuple[str, str, int], fresh: bool = False) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        if idle and not fresh:
            return idle.pop(), True
        scheme, host, port = key
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        try:
            with trio.fail_after(self.connect_timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                stream = tcp
                if scheme == "https":
                    context = self.ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise UpstreamError(f"cannot connect to server {host}:{port}: {type(exc).__name__}{cause}") from None
        return _Conn(stream), False

    async def _read_head(self, conn: _Conn, protocol: h11.Connection) -> PieceResponse:
        try:
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    protocol.receive_data(await conn.receive(HEAD_RECEIVE_BYTES))
                elif isinstance(event, h11.Response):
                    break
                elif not isinstance(event, h11.InformationalResponse):  # a 100 Continue: the answer follows
                    raise UpstreamError(f"server sent {type(event).__name__} instead of a response")
        except h11.RemoteProtocolError as exc:
            if protocol.their_state is h11.SEND_RESPONSE and protocol.trailing_data == (b"", True):
                raise UpstreamError("server closed the connection before answering") from None
            raise UpstreamError(f"server sent a malformed response: {exc}") from None
        headers: dict[str, str] = {}
        for name, value in event.headers:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        if "transfer-encoding" in headers:
            raise UpstreamError("server sent a chunked body; want a Content-Length")
        # h11 has checked that content-length is one non-negative number.
        length = int(headers.get("content-length", "0"))
        rest, _ = protocol.trailing_data
        if len(rest) > length:
            raise UpstreamError("server sent more than its content-length")
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = event.http_version == b"1.1" and "close" not in tokens
        return PieceResponse(event.status_code, headers, length, conn, bytearray(rest), keep_alive=keep_alive)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for conns in self._idle.values():
                for conn in conns:
                    await conn.stream.aclose()
        self._idle.clear()


class _Head:
    """One request head: `lean` is its bytes when this module writes it (a plain GET, HEAD or
    POST of a small body, every field a plain token and value), else None and h11 writes it."""

    def __init__(self, method: str, target: str, fields: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.fields, self.body = method, target, fields, body
        self.lean: bytes | None = None
        if method in ("GET", "HEAD", "POST") and _TARGET.fullmatch(target):
            lines = [f"{method} {target} HTTP/1.1\r\n"]
            for name, value in fields:
                if not (_NAME.fullmatch(name) and _VALUE.fullmatch(value)):
                    return
                lines.append(f"{name}: {value}\r\n")
            lines.append("\r\n")
            self.lean = "".join(lines).encode("ascii") + body

    def h11_request(self) -> h11.Request:
        return h11.Request(method=self.method, target=self.target, headers=self.fields)

    def h11_connection(self) -> h11.Connection:
        """A fresh h11 connection per exchange: the body bypasses h11, so the one that parsed
        the last head never saw that response end."""
        return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)


def _parse_head(raw: bytes) -> tuple[int, bool, dict[str, str]] | None:
    """(status, keep-alive, headers) of a plain response head (the bytes before its blank
    line); None for anything this module leaves to h11: a 1xx, a folded or odd line, a
    repeated Content-Length, a Transfer-Encoding."""
    lines = raw.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        return None
    headers: dict[str, str] = {}
    try:
        for line in lines[1:]:
            name, colon, value = line.decode("ascii").partition(":")
            value = value.strip(" \t")
            if not colon or not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
                return None
            name = name.lower()
            if name in _H11_ONLY:
                return None
            if name == "content-length" and name in headers:
                return None
            headers[name] = value  # as from h11: a repeated field's last value
    except UnicodeDecodeError:
        return None
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        return None
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return int(status_line.group(2)), status_line.group(1) == b"1" and "close" not in tokens, headers


def _connection_failed(exc: OSError) -> UpstreamError:
    return UpstreamError(f"connection to server failed: {exc.strerror or exc}")


def _as_upstream(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamError(f"connection to server failed: {type(exc).__name__}")

"""The small HTTP/1.1 server every p2pdist service speaks: h11 on trio, keep-alive, and file
bodies sent with os.sendfile straight from the page cache to the socket (optionally through
the daemon's upload TokenBucket); with an ssl_context, TLS, and file bodies read and sent as
bytes. Handlers are `async def handler(Request) -> Response`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import h11
import trio

from p2pdist.errors import BadRequest, P2PError
from p2pdist.transport.ratelimit import TokenBucket

log = logging.getLogger("p2pdist.http")

# Bytes per receive_some; request heads and bodies are small.
RECEIVE_BYTES = 64 * 1024
# sendfile chunk without a rate limit: large, the kernel sends what fits in the socket buffer.
SENDFILE_CHUNK_BYTES = 8 * 1024 * 1024
# Tokens taken per write when rate limited, so many senders interleave fairly.
LIMITED_CHUNK_BYTES = 1024 * 1024
# Bodies up to this size go out in the same write as the response head.
SMALL_BODY_BYTES = 64 * 1024
# A request body the handler did not read is read and discarded to keep the connection alive
# only if it is at most this big; larger ones close the connection instead.
DRAIN_LIMIT_BYTES = 1024 * 1024
# How long a closing connection waits for the client to see our EOF and close its side, so
# that the kernel does not reset the connection under a response the client has not read.
CLOSE_GRACE_S = 1.0
LISTEN_BACKLOG = 1024
# Unthrottled file bodies at least this big are sent from a worker thread (see _sendfile_blocking).
THREAD_SENDFILE_BYTES = 256 * 1024
POLL_MS = 50  # how often a sending thread looks for its task's cancellation


class BodyTooLarge(BadRequest):
    status = 413


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
    _connection: _Connection | None = field(default=None, repr=False, compare=False)
    _body: bytes | None = field(default=None, repr=False, compare=False)

    async def body(self, limit: int = 1 << 20) -> bytes:
        """The whole request body; BodyTooLarge (413) if it is over `limit` bytes."""
        if self._body is None:
            if self._connection is None:
                self._body = b""
            else:
                self._body = await self._connection.read_body(self.headers, limit)
        if len(self._body) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        return self._body


Handler = Callable[[Request], Awaitable[Response]]


def text_response(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A one-line text/plain response."""
    line = " ".join(message.splitlines()) + "\n"
    return Response(
        status,
        [("content-type", "text/plain; charset=utf-8"), *headers],
        line.encode("utf-8"),
    )


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


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    name: str,
    upload_bucket: TokenBucket | None = None,
    request_timeout_s: float = 30.0,
    idle_timeout_s: float = 60.0,
    max_header_bytes: int = 16 * 1024,
    on_bytes_sent: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound (host, port).

    `request_timeout_s` bounds reading a request head plus running the handler, and how long
    any single write of the response may stall; a slow but moving download is not cut off.
    `idle_timeout_s` bounds how long a kept-alive connection may wait for its next request.
    With `ssl_context`, every connection is TLS; the handshake must finish within
    `request_timeout_s`. `on_bytes_sent` may be called from a worker thread (large unthrottled
    file bodies are sent from one), so it must be thread-safe, as a Prometheus counter is.
    """
    server = _Server(
        handler=handler,
        name=name,
        upload_bucket=upload_bucket,
        request_timeout_s=request_timeout_s,
        idle_timeout_s=idle_timeout_s,
        max_header_bytes=max_header_bytes,
        on_bytes_sent=on_bytes_sent,
        ssl_context=ssl_context,
    )
    listener = await _open_listener(host, port)
    bound_host, bound_port = listener.socket.getsockname()[:2]
    log.info("%s: serving %s on %s:%d", name, "HTTPS" if ssl_context else "HTTP", bound_host, bound_port)
    task_status.started((bound_host, bound_port))
    try:
        await trio.serve_listeners(server.serve_connection, [listener])
    finally:
        log.info("%s: HTTP server on %s:%d stopped", name, bound_host, bound_port)


async def _open_listener(host: str, port: int) -> trio.SocketListener:
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


@dataclass
class _Server:
    handler: Handler
    name: str
    upload_bucket: TokenBucket | None
    request_timeout_s: float
    idle_timeout_s: float
    max_header_bytes: int
    on_bytes_sent: Callable[[int], None] | None
    ssl_context: ssl.SSLContext | None = None

    async def serve_connection(self, socket_stream: trio.SocketStream) -> None:
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = socket_stream
        if self.ssl_context is not None:
            stream = trio.SSLStream(socket_stream, self.ssl_context, server_side=True, https_compatible=True)
        connection = _Connection(self, stream, socket_stream)
        try:
            if isinstance(stream, trio.SSLStream):
                try:
                    with trio.fail_after(self.request_timeout_s):
                        await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    # A plain-HTTP client, a scanner, an untrusted certificate: not our error.
                    raise _ClientGone(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
            await connection.run()
        except _ClientGone as exc:
            log.debug("%s: client %s went away: %s", self.name, connection.client_label, exc)
        except trio.TooSlowError:
            log.info("%s: client %s timed out", self.name, connection.client_label)
        except h11.RemoteProtocolError as exc:
            log.info("%s: client %s broke HTTP: %s", self.name, connection.client_label, exc)
        except P2PError as exc:
            log.warning("%s: response to %s aborted: %s", self.name, connection.client_label, exc)
        except Exception:
            log.exception("%s: connection from %s failed", self.name, connection.client_label)
        finally:
            await trio.aclose_forcefully(stream)


class _ClientGone(Exception):
    """The client closed or reset the connection; nothing to report but a debug line."""


class _FileSpan:
    """Stands in for a FileBody's bytes in h11 so it frames and counts them; see h11's
    `send_with_data_passthrough`."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(address[0]), int(address[1]))


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class _Connection:
    """One client connection: a keep-alive loop of request, handler, response."""

    def __init__(self, server: _Server, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
                 socket_stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        # The TCP stream under `stream` (the same one without TLS): its socket for sendfile.
        self.socket_stream = socket_stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_bytes)
        self.client = _peer(socket_stream)
        self.client_label = f"{self.client[0]}:{self.client[1]}"
        self._request_headers: Sequence[tuple[bytes, bytes]] = ()
        # Set once a request body was refused as too large: what is left of it is no body.
        self._body_refused = False

    # --- I/O primitives -------------------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        if not data:
            return
        try:
            with trio.fail_after(self.server.request_timeout_s):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc

    async def _receive(self) -> bytes:
        try:
            # bytes() is a no-op on a socket's bytes; SSLStream may hand back a bytearray.
            return bytes(await self.stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self._receive())
                continue
            if event is h11.PAUSED:
                raise RuntimeError("h11 paused while a message was in progress")
            return cast(h11.Event, event)

    async def _send(self, event: h11.Event) -> None:
        """Send one h11 event; any failure leaves h11 in ERROR so the connection closes."""
        try:
            pieces = self.conn.send_with_data_passthrough(event)
            if pieces:
                await self._send_pieces(pieces)
        except BaseException:
            self.conn.send_failed()
            raise

    async def _send_pieces(self, pieces: list[Any]) -> None:
        small: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, _FileSpan):
                await self._send_bytes(b"".join(small))
                small = []
                await self._sendfile(piece)
            elif len(piece) <= SMALL_BODY_BYTES:
                small.append(piece)
            else:
                await self._send_bytes(b"".join(small))
                small = []
                await self._send_bytes(piece)
        await self._send_bytes(b"".join(small))

    async def _sendfile(self, span: _FileSpan) -> None:
        if self.stream is not self.socket_stream:
            await self._send_file_bytes(span)  # TLS: the kernel cannot encrypt for us
            return
        sock = self.socket_stream.socket
        out_fd = sock.fileno()
        bucket = self.server.upload_bucket
        on_sent = self.server.on_bytes_sent
        if bucket is None and span.length >= THREAD_SENDFILE_BYTES:
            await trio.to_thread.run_sync(self._sendfile_blocking, span)
            return
        step = SENDFILE_CHUNK_BYTES
        if bucket is not None:
            step = min(LIMITED_CHUNK_BYTES, bucket.burst_bytes)
        offset = span.offset
        end = span.offset + span.length
        while offset < end:
            chunk_end = min(end, offset + step)
            if bucket is not None:
                await bucket.take(chunk_end - offset)  # a checkpoint too
            else:
                await trio.lowlevel.checkpoint()
            while offset < chunk_end:
                # Try first, wait only when the socket is full: after a token-bucket sleep it
                # usually has room, and a deadline per chunk costs more CPU than the send.
                try:
                    sent = os.sendfile(out_fd, span.fd, offset, chunk_end - offset)
                except BlockingIOError:
                    with trio.fail_after(self.server.request_timeout_s):
                        await sock.wait_writable()
                    continue
                except ConnectionError as exc:
                    raise _ClientGone(str(exc)) from exc
                if sent == 0:
                    raise OSError(errno.EIO, "file ended before the promised length")
                offset += sent
                if on_sent is not None:
                    on_sent(sent)

    def _sendfile_blocking(self, span: _FileSpan) -> None:
        """sendfile for an unthrottled body, run in a worker thread: the kernel's work (on
        loopback it also runs the receiver's side) then does not hold up the event loop, which
        meanwhile serves other requests and the daemon's own downloads. Cancelling the calling
        task, or a client that takes nothing for request_timeout_s, stops it within POLL_MS."""
        out_fd = self.socket_stream.socket.fileno()
        on_sent = self.server.on_bytes_sent
        poller = select.poll()
        poller.register(out_fd, select.POLLOUT)
        offset, end = span.offset, span.offset + span.length
        stalled_since: float | None = None
        while offset < end:
            trio.from_thread.check_cancelled()
            try:
                sent = os.sendfile(out_fd, span.fd, offset, min(end - offset, SENDFILE_CHUNK_BYTES))
            except BlockingIOError:
                now = time.monotonic()
                if stalled_since is None:
                    stalled_since = now
                elif now - stalled_since > self.server.request_timeout_s:
                    raise trio.TooSlowError from None
                poller.poll(POLL_MS)
                continue
            except ConnectionError as exc:
                raise _ClientGone(str(exc)) from exc
            if sent == 0:
                raise OSError(errno.EIO, "file ended before the promised length")
            stalled_since = None
            offset += sent
            if on_sent is not None:
                on_sent(sent)

    async def _send_file_bytes(self, span: _FileSpan) -> None:
        """A file span read with pread and sent as bytes, for streams sendfile cannot serve."""
        bucket = self.server.upload_bucket
        step = LIMITED_CHUNK_BYTES if bucket is None else min(LIMITED_CHUNK_BYTES, bucket.burst_bytes)
        offset = span.offset
        end = span.offset + span.length
        while offset < end:
            data = os.pread(span.fd, min(step, end - offset), offset)
            if not data:
                raise OSError(errno.EIO, "file ended before the promised length")
            if bucket is not None:
                await bucket.take(len(data))
            await self._send_bytes(data)
            offset += len(data)
            self._count_sent(len(data))

    # --- the request/response cycle -------------------------------------------------------

    async def run(self) -> None:
        while True:
            request_event = await self._receive_request()
            if request_event is None:
                return
            await self._respond(request_event)
            if not await self._finish_cycle():
                return

    async def _receive_request(self) -> h11.Request | None:
        """The next request head, or None if the client closed or stayed idle too long."""
        try:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data: bytes | None = None
                with trio.move_on_after(self.server.idle_timeout_s):
                    data = await self._receive()
                if data is None:
                    return None  # idle too long between requests
                self.conn.receive_data(data)
                event = self.conn.next_event()
                if event is h11.NEED_DATA:  # a head split over several reads
                    with trio.fail_after(self.server.request_timeout_s):
                        event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, str(exc) or "malformed request")
            return None
        except trio.TooSlowError:
            await self._refuse(408, "request head not received in time")
            return None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise RuntimeError(f"unexpected h11 event {event!r}")
        return event

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request we could not parse, then close (h11 will not go on after it)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = text_response(status, message, [("connection", "close")])
        await self._send_response("GET", response)
        await self._close_gracefully()

    async def _respond(self, event: h11.Request) -> None:
        method = event.method.decode("ascii")
        self._request_headers = event.headers
        self._body_refused = False
        if method == "CONNECT":
            # h11 takes any 2xx to CONNECT as a switch to a tunnel, after which no body can go out.
            await self._send_response(method, text_response(405, "CONNECT is not supported: this is not a proxy"))
            return
        try:
            request = self._make_request(event)
        except BadRequest as exc:
            await self._send_response(method, text_response(exc.status, str(exc)))
            return
        head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_bytes > self.server.max_header_bytes:
            response = text_response(431, f"request head over {self.server.max_header_bytes} bytes")
            await self._send_response(method, response)
            return
        response = await self._call_handler(request)
        await self._send_response(method, response)

    def _make_request(self, event: h11.Request) -> Request:
        try:
            target = event.target.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("request target is not ASCII") from None
        path, query = parse_target(target)
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("ascii")
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return Request(
            method=event.method.decode("ascii"),
            target=target,
            path=path,
            query=query,
            headers=headers,
            client=self.client,
            _connection=self,
        )

    async def _call_handler(self, request: Request) -> Response:
        try:
            with trio.fail_after(self.server.request_timeout_s):
                response = await self.server.handler(request)
        except _ClientGone:
            raise
        except h11.RemoteProtocolError as exc:
            # The request body was malformed; h11 will not reuse the connection.
            return text_response(exc.error_status_hint, str(exc) or "malformed request body")
        except trio.TooSlowError:
            log.warning(
                "%s: %s %s from %s: no response within %.1f s",
                self.server.name, request.method, request.target, self.client_label,
                self.server.request_timeout_s,
            )  # fmt: skip
            return text_response(503, "request timed out", [("connection", "close")])
        except Exception as exc:
            status = _status_of(exc)
            if status is not None:
                return text_response(status, str(exc) or HTTPStatus(status).phrase)
            log.exception(
                "%s: handler failed on %s %s from %s",
                self.server.name, request.method, request.target, self.client_label,
            )  # fmt: skip
            return text_response(500, "internal error")
        if not isinstance(response, Response) or not 200 <= response.status <= 599:
            log.error(
                "%s: handler returned an invalid response to %s %s: %r",
                self.server.name, request.method, request.target, response,
            )  # fmt: skip
            return text_response(500, "internal error")
        return response

    async def read_body(self, headers: dict[str, str], limit: int) -> bytes:
        if self._body_refused:
            raise BodyTooLarge(f"request body over {limit} bytes")
        if self.conn.their_state is not h11.SEND_BODY:
            return b""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._body_refused = True
            raise BodyTooLarge(f"request body over {limit} bytes")
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    self._body_refused = True
                    raise BodyTooLarge(f"request body over {limit} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise RuntimeError(f"unexpected h11 event in a request body: {event!r}")

    async def _send_response(self, method: str, response: Response) -> None:
        status = response.status
        body = response.body
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        no_body = method == "HEAD" or status in (204, 304)
        length: int | None = None
        fd: int | None = None
        try:
            if isinstance(body, bytes):
                length = len(body)
            elif isinstance(body, FileBody):
                length = body.length
                if not no_body:
                    fd = self._open_file(body)
            else:
                declared = [v for k, v in response.headers if k.lower() == "content-length"]
                if declared:
                    length = int(declared[0])
        except Exception as exc:
            await _close_body(body)
            if isinstance(exc, OSError):
                log.error("%s: cannot open %s: %s", self.server.name, _path_of(body), exc)
            else:
                log.exception("%s: bad response body", self.server.name)
            status, message = 500, b"internal error\n"
            body, headers, length = message, [("content-type", "text/plain")], len(message)
        try:
            if length is not None and status != 204:
                headers.append(("content-length", str(length)))
            if self._must_close_for_unread_body():
                headers.append(("connection", "close"))
            head = h11.Response(status_code=status, headers=headers, reason=_reason(status))
            if no_body:
                await _close_body(body)
                await self._send_events([head, h11.EndOfMessage()])
            elif isinstance(body, bytes):
                await self._send_events([head, h11.Data(data=body), h11.EndOfMessage()])
                self._count_sent(len(body))
            elif isinstance(body, FileBody):
                assert fd is not None
                span = _FileSpan(fd, body.offset, body.length)
                await self._send_events(
                    [head, h11.Data(data=cast(bytes, span)), h11.EndOfMessage()]
                )
            else:
                await self._send(head)
                await self._send_iterable(body)
        finally:
            if fd is not None:
                os.close(fd)
            if isinstance(response.body, FileBody) and response.body.on_done is not None:
                response.body.on_done()

    async def _send_events(self, events: list[h11.Event]) -> None:
        try:
            pieces: list[Any] = []
            for event in events:
                pieces.extend(self.conn.send_with_data_passthrough(event) or ())
            await self._send_pieces(pieces)
        except BaseException:
            self.conn.send_failed()
            raise

    async def _send_iterable(self, body: AsyncIterable[bytes | FileBody]) -> None:
        bucket = self.server.upload_bucket
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                if isinstance(chunk, FileBody):
                    # A file region inside a streamed body still goes out with sendfile.
                    fd = self._open_file(chunk)
                    try:
                        span = _FileSpan(fd, chunk.offset, chunk.length)
                        await self._send_events([h11.Data(data=cast(bytes, span))])
                    finally:
                        os.close(fd)
                        if chunk.on_done is not None:
                            chunk.on_done()
                    continue
                if bucket is None:
                    await self._send(h11.Data(data=chunk))
                    self._count_sent(len(chunk))
                    continue
                for start in range(0, len(chunk), LIMITED_CHUNK_BYTES):
                    part = chunk[start : start + LIMITED_CHUNK_BYTES]
                    await bucket.take(len(part))
                    await self._send(h11.Data(data=part))
                    self._count_sent(len(part))
            await self._send(h11.EndOfMessage())
        except BaseException:
            # Whatever failed (the iterator, the client, a wrong content-length), the client
            # must see a truncated response, never one that looks complete.
            self.conn.send_failed()
            raise
        finally:
            await _close_body(iterator)

    def _count_sent(self, nbytes: int) -> None:
        if self.server.on_bytes_sent is not None and nbytes:
            self.server.on_bytes_sent(nbytes)

    def _open_file(self, body: FileBody) -> int:
        if body.offset < 0 or body.length < 0:
            raise ValueError(f"bad file range offset={body.offset} length={body.length}")
        fd = os.open(body.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_size < body.offset + body.length:
                raise OSError(
                    errno.EINVAL,
                    f"file is {info.st_size} bytes, range ends at {body.offset + body.length}",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _must_close_for_unread_body(self) -> bool:
        """Whether the request body the handler left unread is too costly to drain."""
        if self.conn.their_state is not h11.SEND_BODY:
            return False
        if self.conn.they_are_waiting_for_100_continue:
            return True  # the client may never send it
        declared = [v for k, v in self._request_headers if k == b"content-length"]
        return bool(declared) and int(declared[0]) > DRAIN_LIMIT_BYTES

    async def _finish_cycle(self) -> bool:
        """After a response: drain what is left of the request and get ready for the next."""
        if self.conn.our_state is h11.MUST_CLOSE:
            await self._close_gracefully()
            return False
        if self.conn.our_state is not h11.DONE:
            return False  # ERROR: the response was cut short, just drop the connection
        try:
            drained = 0
            if self.conn.their_state is h11.SEND_BODY:
                with trio.fail_after(self.server.request_timeout_s):
                    while self.conn.their_state is h11.SEND_BODY:
                        event = await self._next_event()
                        if isinstance(event, h11.Data):
                            drained += len(event.data)
                            if drained > DRAIN_LIMIT_BYTES:
                                return False
        except h11.RemoteProtocolError:
            return False
        if self.conn.their_state is not h11.DONE:
            return False
        self.conn.start_next_cycle()
        return True

    async def _close_gracefully(self) -> None:
        try:
            # Under TLS this skips close_notify: our responses are length-framed, and the
            # client's https_compatible reading accepts a bare EOF.
            await self.socket_stream.send_eof()
            with trio.move_on_after(CLOSE_GRACE_S):
                while await self.stream.receive_some(RECEIVE_BYTES):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _close_body(body: object) -> None:
    """Close an async generator body we stop iterating early, so its cleanup runs."""
    aclose = getattr(body, "aclose", None)
    if aclose is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_S):
        try:
            await aclose()
        except Exception:
            log.exception("closing a response body failed")


def _path_of(body: ResponseBody) -> str:
    return os.fspath(body.path) if isinstance(body, FileBody) else "?"

"""The trio transport of the small HTTP/1.1 server every p2pdist service speaks: accept,
read, write, timeouts and TLS around the socket-free protocol in `protocol.py`. Keep-alive,
and file bodies sent with os.sendfile straight from the page cache to the socket (optionally
through the daemon's upload TokenBucket); with an ssl_context, TLS, and file bodies read and
sent as bytes. Handlers are `async def handler(Request) -> Response`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import ssl
import stat
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass

import h11
import trio

from p2pdist.errors import BodyTooLarge, P2PError, StartupError
from p2pdist.transport.drain import Drain
from p2pdist.transport.drain import current as current_drain
from p2pdist.transport.lane import RESUME, Answered, Declined, Gone, Lane
from p2pdist.transport.plainsock import receive_now, write_now
from p2pdist.transport.protocol import (
    NEED_DATA,
    Answer,
    ClientClosed,
    FileBody,
    FileSpan,
    Handler,
    NeedData,
    Piece,
    QuickHandler,
    Refusal,
    Request,
    RequestReceived,
    Response,
    ResponseBody,
    ServerProtocol,
    error_response,
    parse_target,
    text_response,
)
from p2pdist.transport.ratelimit import TokenBucket

__all__ = [
    "BodyTooLarge",
    "FileBody",
    "Handler",
    "QuickHandler",
    "Request",
    "Response",
    "ResponseBody",
    "parse_target",
    "serve_http",
    "text_response",
]

log = logging.getLogger("p2pdist.http")

# Bytes per receive_some; request heads and bodies are small.
RECEIVE_BYTES = 64 * 1024
# sendfile chunk without a rate limit: large, the kernel sends what fits in the socket buffer.
SENDFILE_CHUNK_BYTES = 8 * 1024 * 1024
# Tokens taken per write when rate limited, so many senders interleave fairly.
LIMITED_CHUNK_BYTES = 1024 * 1024
# A rate-limited file body goes out in steps of 1/LIMITED_STEPS_PER_S of a second's traffic.
LIMITED_STEPS_PER_S = 8
# Bodies up to this size go out in the same write as the response head.
SMALL_BODY_BYTES = 64 * 1024
# How long a closing connection waits for the client to see our EOF and close its side, so
# that the kernel does not reset the connection under a response the client has not read.
CLOSE_GRACE_S = 1.0
LISTEN_BACKLOG = 1024
# Unthrottled file bodies at least this big are sent from a worker thread (see _sendfile_blocking).
THREAD_SENDFILE_BYTES = 256 * 1024
POLL_MS = 50  # how often a sending thread looks for its task's cancellation
# A request head (and a TLS handshake) must arrive within this from its first byte, or for a
# new connection from the accept: a client that trickles a head holds a connection and a task,
# so a few seconds, not the handler's budget (a blob GET may wait minutes for its first piece).
HEAD_TIMEOUT_S = 5.0
# Open connections per port beyond which new ones are answered 503 and closed at once.
MAX_CONNECTIONS = 1024
# How often the "connection cap reached" warning may repeat.
CAP_LOG_INTERVAL_S = 10.0


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    name: str,
    upload_bucket: TokenBucket | None = None,
    request_timeout_s: float = 30.0,
    idle_timeout_s: float = 60.0,
    head_timeout_s: float = HEAD_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_header_bytes: int = 16 * 1024,
    on_bytes_sent: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    lean: bool = False,
    quick_handler: QuickHandler | None = None,
    lane: bool = False,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound (host, port).

    `head_timeout_s` bounds a request head from its first byte (a new connection's first head
    from the accept; then 408), and a TLS handshake. `request_timeout_s` bounds running the
    handler, reading a request body, and how long any single write of the response may stall;
    a slow but moving download is not cut off. `idle_timeout_s` bounds how long a kept-alive
    connection may wait for its next request. Past `max_connections` open connections, a new
    one is answered 503 and closed, with a warning in the log. With `ssl_context`, every
    connection is TLS. `on_bytes_sent` counts the bytes of file bodies (the pieces a node
    uploads), not in-memory ones such as /metrics or /healthz answers; it may be called from a
    worker thread (large unthrottled file bodies are sent from one), so it must be
    thread-safe, as a Prometheus counter is. `lean` parses and frames plain keep-alive
    requests without h11 (see ServerProtocol): for a service of many small API calls.
    `quick_handler` is asked first for each request: it answers at once, awaiting nothing
    (so no deadline can apply), or returns None to leave the request to `handler`. With the
    lean lane, its bytes answer goes out in one write: the scheduler's API calls take this
    path, a coroutine and a cancel scope per call cost about a tenth of serving it. `lane`
    (with `lean` and a quick handler): plain connections wait between requests in one
    shared epoll set, and what the quick handler answers is served there without waking
    each connection's task (see lane.py).
    """
    server = _Server(
        handler=handler,
        name=name,
        upload_bucket=upload_bucket,
        request_timeout_s=request_timeout_s,
        idle_timeout_s=idle_timeout_s,
        head_timeout_s=head_timeout_s,
        max_connections=max_connections,
        max_header_bytes=max_header_bytes,
        on_bytes_sent=on_bytes_sent,
        ssl_context=ssl_context,
        lean=lean,
        quick_handler=quick_handler,
        lane=Lane(idle_timeout_s) if lane and lean and quick_handler is not None else None,
    )
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise StartupError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if port == 0:
        # Several addresses (a name with IPv4 and IPv6 ones) would each get a port of their
        # own; the caller is told one address, so serve that one only.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    log.info("%s: serving %s on %s:%d", name, "HTTPS" if ssl_context else "HTTP", bound_host, bound_port)
    task_status.started((bound_host, bound_port))
    try:
        if server.lane is None:
            await trio.serve_listeners(server.serve_connection, listeners)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.lane.run)
                await trio.serve_listeners(server.serve_connection, listeners)
    finally:
        log.info("%s: HTTP server on %s:%d stopped", name, bound_host, bound_port)


@dataclass
class _Server:
    handler: Handler
    name: str
    upload_bucket: TokenBucket | None
    request_timeout_s: float
    idle_timeout_s: float
    head_timeout_s: float
    max_connections: int
    max_header_bytes: int
    on_bytes_sent: Callable[[int], None] | None
    ssl_context: ssl.SSLContext | None = None
    lean: bool = False
    quick_handler: QuickHandler | None = None
    lane: Lane | None = None
    open_connections: int = 0
    refused_connections: int = 0
    _cap_logged_at: float = -CAP_LOG_INTERVAL_S

    async def serve_connection(self, socket_stream: trio.SocketStream) -> None:
        if self.open_connections >= self.max_connections:
            await self._refuse(socket_stream)
            return
        self.open_connections += 1
        try:
            await self._serve_connection(socket_stream)
        finally:
            self.open_connections -= 1

    async def _refuse(self, socket_stream: trio.SocketStream) -> None:
        """Over the cap: a one-line 503 (plain HTTP only; a TLS client just sees the close)."""
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._cap_logged_at >= CAP_LOG_INTERVAL_S:
            self._cap_logged_at = now
            log.warning(
                "%s: %d connections open (the cap, max_connections); refusing new ones with 503 (%d refused so far)",
                self.name,
                self.open_connections,
                self.refused_connections,
            )
        try:
            if self.ssl_context is None:
                # The same refusal a late request head gets, with its graceful close (read what
                # the client sent, or closing would reset the answer away).
                connection = _Connection(self, socket_stream, socket_stream)
                refusal = connection.protocol.refusal(503, "too many connections", [("retry-after", "1")])
                with trio.move_on_after(CLOSE_GRACE_S):
                    if isinstance(refusal, Refusal):
                        await connection._send_response(refusal.response)
                    await connection._close_gracefully()
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(socket_stream)

    async def _serve_connection(self, socket_stream: trio.SocketStream) -> None:
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = socket_stream
        if self.ssl_context is not None:
            stream = trio.SSLStream(socket_stream, self.ssl_context, server_side=True, https_compatible=True)
        connection = _Connection(self, stream, socket_stream)
        try:
            if isinstance(stream, trio.SSLStream):
                try:
                    with trio.fail_after(self.head_timeout_s):
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


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(address[0]), int(address[1]))


class _Connection:
    """One client connection: the trio loop of receive, handler, send around a ServerProtocol."""

    def __init__(
        self,
        server: _Server,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        socket_stream: trio.SocketStream,
    ) -> None:
        self.server = server
        self.stream = stream
        # The TCP stream under `stream` (the same one without TLS): its socket for sendfile.
        self.socket_stream = socket_stream
        self.client = _peer(socket_stream)
        self.client_label = f"{self.client[0]}:{self.client[1]}"
        self.protocol = ServerProtocol(self.client, max_header_bytes=server.max_header_bytes, lean=server.lean)
        self.requests = 0  # requests read so far on this connection
        # The connection's cancel scope (see run): its deadline is set only while waiting
        # for the next request.
        self._scope = trio.CancelScope()

    # --- the request/response cycle -------------------------------------------------------

    async def run(self) -> None:
        # One scope for the connection's life, its deadline moved for each wait between
        # requests (idle_timeout_s), instead of a scope of its own per wait: entering and
        # leaving one cost more than parsing the request. When it fires the connection ends.
        with self._scope:
            await self._serve_requests()

    async def _serve_requests(self) -> None:
        while True:
            event = await self._next_request()
            if isinstance(event, ClientClosed):
                return
            if isinstance(event, Refusal):
                await self._send_response(event.response)
                await self._close_gracefully()
                return
            drain = current_drain()
            if isinstance(event, Answered):
                await self._finish_quick(event, drain)
            elif isinstance(event, Answer):
                await self._send_response(event.response)
            elif drain is not None and drain.refuses(event.request.path):
                await self._send_response(text_response(503, "draining: shutting down", [("connection", "close")]))
            elif type(event) is not Declined and (quick := self._answer_now(event.request)) is not None:
                await self._send_quick(quick, drain)
            elif drain is not None:
                with drain.request():  # the daemon waits for this response before it exits
                    await self._send_response(await self._call_handler(event.request))
            else:
                await self._send_response(await self._call_handler(event.request))
            if not await self._finish_cycle():
                return

    async def _next_request(self) -> RequestReceived | Answer | Refusal | ClientClosed | Answered:
        """The next request, or what to do instead. On a kept-alive connection the wait for its
        first byte is bounded by idle_timeout_s (then the connection just closes); the head is
        bounded by head_timeout_s from its first byte, or from the accept for a connection's
        first request (then a 408). With the server's lane, a plain connection waits there
        between requests, and what the lane answered comes back as `Answered` only when it
        is left to finish."""
        deadline: float | None = None
        if self.requests == 0:
            deadline = trio.current_time() + self.server.head_timeout_s
        lane = self.server.lane if self.stream is self.socket_stream else None
        while True:
            event = self.protocol.next_request(self._read_body)
            if not isinstance(event, NeedData):
                if not isinstance(event, ClientClosed):
                    self.requests += 1
                return event
            if event.idle and deadline is None and lane is not None:
                handed = await lane.park(self)  # the lane counts the requests it takes
                if isinstance(handed, Gone):
                    raise _ClientGone(handed.why)
                if handed is not RESUME:
                    return handed  # type: ignore[return-value]  # never NeedData
                deadline = trio.current_time() + self.server.head_timeout_s
                continue  # the lane fed the protocol what it read
            elif event.idle and deadline is None:
                scope = self._scope
                scope.deadline = trio.current_time() + self.server.idle_timeout_s
                try:
                    # After an answer the client's next request is not there yet: wait for
                    # it before reading (a read tried first only fails).
                    data = await self._receive(ready=self.requests == 0)
                finally:
                    scope.deadline = math.inf
                if scope.cancel_called:
                    return ClientClosed()  # idle too long between requests (its end raced the bytes)
                deadline = trio.current_time() + self.server.head_timeout_s
            else:
                if deadline is None:
                    deadline = trio.current_time() + self.server.head_timeout_s
                try:
                    with trio.fail_at(deadline):
                        data = await self._receive()
                except trio.TooSlowError:
                    if event.idle:
                        return ClientClosed()  # connected and never said a word
                    return self.protocol.refusal(408, "request head not received in time")
            self.protocol.receive_data(data)

    def _answer_now(self, request: Request) -> Response | None:
        """The quick handler's answer, or None (no quick handler, or it left the request)."""
        quick = self.server.quick_handler
        if quick is None:
            return None
        try:
            response = quick(request)
        except Exception as exc:
            return self._failed(request, exc)
        if response is None:
            return None
        return self._checked(request, response)

    async def _send_quick(self, response: Response, drain: Drain | None) -> None:
        """Send a quick answer: with the lean lane and a bytes body, framed whole and written
        at once; only what does not fit the socket buffer waits (counted by the drain)."""
        data = self.protocol.lean_answer(response)
        if data is None:
            with drain.request() if drain is not None else contextlib.nullcontext():
                await self._send_response(response)
            return
        try:
            rest = self._write_now(data)
        except BaseException:
            self.protocol.response_failed()
            raise
        await self._send_rest(rest, drain)

    async def _finish_quick(self, answered: Answered, drain: Drain | None) -> None:
        """The end of a quick answer the lane began: the rest of it, or all of it."""
        if answered.rest is None:
            await self._send_quick(answered.response, drain)
        else:
            await self._send_rest(answered.rest, drain)

    async def _send_rest(self, rest: bytes, drain: Drain | None) -> None:
        """What of a quick answer did not fit the socket buffer, waiting as it must (counted
        by the drain)."""
        if not rest:
            return
        try:
            with drain.request() if drain is not None else contextlib.nullcontext():
                await self._send_bytes(rest)
        except BaseException:
            self.protocol.response_failed()
            raise

    def _write_now(self, data: bytes) -> bytes:
        """Write what the socket takes now, without TLS; what is left to send."""
        if self.stream is not self.socket_stream:
            return data
        try:
            return write_now(self.socket_stream.socket, data)
        except OSError as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc

    async def _call_handler(self, request: Request) -> Response:
        try:
            with _deadline(self.server.request_timeout_s) as scope:
                response = await self.server.handler(request)
            if scope.cancelled_caught:
                raise trio.TooSlowError
        except _ClientGone:
            raise
        except trio.TooSlowError:
            log.warning(
                "%s: %s %s from %s: no response within %.1f s",
                self.server.name, request.method, request.target, self.client_label,
                self.server.request_timeout_s,
            )  # fmt: skip
            return text_response(503, "request timed out", [("connection", "close")])
        except Exception as exc:
            return self._failed(request, exc)
        return self._checked(request, response)

    def _failed(self, request: Request, exc: Exception) -> Response:
        """The answer to a handler's exception."""
        if isinstance(exc, h11.RemoteProtocolError):
            # The request body was malformed; h11 will not reuse the connection.
            return text_response(exc.error_status_hint, str(exc) or "malformed request body")
        answer = error_response(exc)
        if answer is not None:
            return answer
        log.error(
            "%s: handler failed on %s %s from %s",
            self.server.name, request.method, request.target, self.client_label,
            exc_info=exc,
        )  # fmt: skip
        return text_response(500, "internal error")

    def _checked(self, request: Request, response: object) -> Response:
        """`response` if it is one a handler may give, else a 500 (and the bug logged)."""
        if not isinstance(response, Response) or not 200 <= response.status <= 599:
            log.error(
                "%s: handler returned an invalid response to %s %s: %r",
                self.server.name, request.method, request.target, response,
            )  # fmt: skip
            return text_response(500, "internal error")
        return response

    async def _read_body(self, limit: int) -> bytes:
        """Request.body() for this connection's current request."""
        expected, first = self.protocol.start_body(limit)
        if not expected:
            return b""
        await self._send_bytes(first)
        while (body := self.protocol.read_body(limit)) is NEED_DATA:
            self.protocol.receive_data(await self._receive())
        assert isinstance(body, bytes)
        return body

    def _next_cycle_now(self) -> bool | None:
        """`_finish_cycle` when nothing in it waits (the lane asks this too): True once ready
        for the next request, False if the connection can only be dropped, None if the rest
        must wait (a graceful close, or a request body still arriving)."""
        protocol = self.protocol
        if protocol.must_close:
            return None
        if not protocol.response_complete:
            return False  # the response was cut short, just drop the connection
        drained = protocol.discard_body()  # nearly always all there
        if drained is NEED_DATA:
            return None
        return bool(drained) and protocol.start_next_cycle()

    async def _finish_cycle(self) -> bool:
        """After a response: drain what is left of the request and get ready for the next."""
        if (ready := self._next_cycle_now()) is not None:
            return ready
        if self.protocol.must_close:
            await self._close_gracefully()
            return False
        with trio.fail_after(self.server.request_timeout_s):
            while (drained := self.protocol.discard_body()) is NEED_DATA:
                self.protocol.receive_data(await self._receive())
        return bool(drained) and self.protocol.start_next_cycle()

    # --- responses ------------------------------------------------------------------------

    async def _send_response(self, response: Response) -> None:
        protocol = self.protocol
        body = response.body
        sends_body = protocol.sends_body(response)
        fd: int | None = None
        try:
            length = protocol.body_length(response)
            if isinstance(body, FileBody) and sends_body:
                fd = self._open_file(body)
        except Exception as exc:
            await _close_body(body)
            if isinstance(exc, OSError):
                log.error("%s: cannot open %s: %s", self.server.name, _path_of(body), exc)
            else:
                log.exception("%s: bad response body", self.server.name)
            message = b"internal error\n"
            response = Response(500, [("content-type", "text/plain")], message)
            body, length = message, len(message)
        try:
            head = protocol.respond_head(response, length)
            if not sends_body:
                await _close_body(body)
                await self._send_pieces([*head, *protocol.respond_end()])
            elif isinstance(body, bytes):
                await self._send_pieces([*head, *protocol.respond_data(body), *protocol.respond_end()])
            elif isinstance(body, FileBody):
                assert fd is not None
                span = FileSpan(fd, body.offset, body.length)
                await self._send_pieces([*head, *protocol.respond_data(span), *protocol.respond_end()])
            else:
                await self._send_pieces(head)
                await self._send_iterable(body)
        except BaseException:
            protocol.response_failed()
            raise
        finally:
            if fd is not None:
                os.close(fd)
            if isinstance(response.body, FileBody) and response.body.on_done is not None:
                response.body.on_done()

    async def _send_iterable(self, body: AsyncIterable[bytes] | AsyncIterable[bytes | FileBody]) -> None:
        protocol = self.protocol
        bucket = self.server.upload_bucket
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                if isinstance(chunk, FileBody):
                    # A file region inside a streamed body still goes out with sendfile.
                    fd = self._open_file(chunk)
                    try:
                        await self._send_pieces(protocol.respond_data(FileSpan(fd, chunk.offset, chunk.length)))
                    finally:
                        os.close(fd)
                        if chunk.on_done is not None:
                            chunk.on_done()
                    continue
                if bucket is None:
                    await self._send_pieces(protocol.respond_data(chunk))
                    continue
                for start in range(0, len(chunk), LIMITED_CHUNK_BYTES):
                    part = chunk[start : start + LIMITED_CHUNK_BYTES]
                    await bucket.take(len(part))
                    await self._send_pieces(protocol.respond_data(part))
            await self._send_pieces(protocol.respond_end())
        except BaseException:
            # Whatever failed (the iterator, the client, a wrong content-length), the client
            # must see a truncated response, never one that looks complete.
            protocol.response_failed()
            raise
        finally:
            await _close_body(iterator)

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

    def _count_sent(self, nbytes: int) -> None:
        if self.server.on_bytes_sent is not None and nbytes:
            self.server.on_bytes_sent(nbytes)

    # --- socket I/O -----------------------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        if not data:
            return
        # Without TLS, try the write first, straight on the socket: a small response nearly
        # always fits the socket buffer, and trio's send_all (its conflict detector, its
        # try-then-wait helper and our deadline around it) cost several times the write
        # itself. Only what did not fit waits, bounded as before.
        data = self._write_now(data)
        if not data:
            return
        try:
            with _deadline(self.server.request_timeout_s) as scope:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def _receive(self, *, ready: bool = True) -> bytes:
        """The next bytes from the client (b"" once it closed its side). `ready`: they may be
        there already, so a read is tried before waiting."""
        if self.stream is self.socket_stream:
            return await self._receive_plain(ready=ready)
        try:
            # bytes() is a no-op on a socket's bytes; SSLStream may hand back a bytearray.
            return bytes(await self.stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc

    async def _receive_plain(self, *, ready: bool = True) -> bytes:
        """receive_some without TLS, straight on the socket as _send_bytes writes: wait until
        readable, then read. Bytes that were there at once (a client sending its next request
        before reading our answer) are taken after a checkpoint, so one connection cannot
        keep the others from running."""
        try:
            return await receive_now(self.socket_stream.socket, RECEIVE_BYTES, ready=ready)
        except (OSError, trio.ClosedResourceError) as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from exc

    async def _send_pieces(self, pieces: list[Piece]) -> None:
        small: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, FileSpan):
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

    async def _sendfile(self, span: FileSpan) -> None:
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
            # An eighth of a second of traffic per sendfile (up to LIMITED_CHUNK_BYTES), even
            # past the bucket's burst (1/16 s): each step is a timer, a sendfile and a wake-up
            # of the receiving thread at both ends, and a 16-host rollout at 8 MiB/s made
            # thousands of them. The rate holds: a take beyond the burst waits for its debt.
            step = min(LIMITED_CHUNK_BYTES, max(bucket.burst_bytes, bucket.rate_bps // LIMITED_STEPS_PER_S))
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

    def _sendfile_blocking(self, span: FileSpan) -> None:
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

    async def _send_file_bytes(self, span: FileSpan) -> None:
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


def _deadline(seconds: float) -> trio.CancelScope:
    """A scope cancelled `seconds` from now; the caller raises TooSlowError if it caught that.
    trio.fail_after does the same through a generator context manager, which cost more per
    request than the scope itself on the scheduler's path (three per request)."""
    return trio.CancelScope(deadline=trio.current_time() + seconds)


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

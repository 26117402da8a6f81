"""An HTTP-aware fault-injecting relay for the origin: 503s, resets mid-body and stalls on blob GETs.

Each client connection carries one request (the relay asks the target to close after it),
so every blob GET is seen whole and can be failed, cut or stalled as the `FaultPlan` says.
h11 parses the request and response heads; bodies pass through as bytes (`lab.pump`).
`serve_fault_relay` is a trio service; `python -m lab.faultrelay` runs it as a process
(see `FaultRelayProcess`). `GET /_faultrelay/stats` and `PUT /_faultrelay/plan` (JSON) are
answered by the relay itself, so a test can read counters and change faults mid-run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import signal
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import h11
import httpx
import trio

from lab.ports import free_port
from lab.pump import pump
from p2pdist.transport.ratelimit import TokenBucket

RECEIVE_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
CONTROL_PREFIX = "/_faultrelay/"
BLOB_GET = re.compile(r"/v2/.+/blobs/(?!uploads/)[^/?]+")
READY_TIMEOUT_S = 30.0


@dataclass
class FaultPlan:
    """Which blob GETs fail and how. Faults are dealt out in order: the first `fail_blob_gets`
    GETs are answered `fail_status`, the next `resets` are cut after `reset_after_bytes` body
    bytes, the next `stalls` go silent for `stall_s` after `stall_after_bytes`; the rest pass.
    Other requests (HEAD, manifests, /v2/) always pass. `rate_bps` caps all downstream bytes.
    """

    fail_blob_gets: int = 0
    fail_status: int = 503
    resets: int = 0
    reset_after_bytes: int = 0
    stalls: int = 0
    stall_after_bytes: int = 0
    stall_s: float = 0.0
    rate_bps: int | None = None

    @classmethod
    def from_json(cls, text: str | bytes) -> FaultPlan:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a fault plan is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown fault plan key(s): {', '.join(sorted(unknown))}")
        return cls(**raw)


@dataclass
class FaultStats:
    """What the relay saw and did. `ranges` lists the Range header of every blob GET ("" if none)."""

    connections: int = 0
    requests: int = 0
    blob_gets: int = 0
    failed: int = 0
    resets: int = 0
    stalls: int = 0
    downstream_bytes: int = 0  # everything sent to clients, heads included
    blob_body_bytes: int = 0  # body bytes of blob GETs sent to clients
    ranges: list[str] = field(default_factory=list)


class FaultRelay:
    """The plan in force and the counters; shared by all connections of one relay."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.stats = FaultStats()
        self.set_plan(plan or FaultPlan())

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._dealt = 0  # blob GETs seen under this plan
        self.bucket = TokenBucket(plan.rate_bps) if plan.rate_bps else None

    def deal(self) -> str:
        """The fault for the next blob GET: "fail", "reset", "stall" or "pass"."""
        n = self._dealt
        self._dealt += 1
        plan = self.plan
        for kind, count in (("fail", plan.fail_blob_gets), ("reset", plan.resets), ("stall", plan.stalls)):
            if n < count:
                return kind
            n -= count
        return "pass"


class _Unparsable(Exception):
    """The client or the target did not speak HTTP/1.1 (or closed before a whole head)."""


async def _receive_event(stream: trio.SocketStream, conn: h11.Connection, raw: bytearray | None = None) -> h11.Event:
    """The next h11 event of `conn`, reading `stream` as needed; what was read is added to `raw`."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Unparsable(str(exc)) from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            if raw is not None:
                raw += data
            conn.receive_data(data)
            continue
        if event is h11.PAUSED:
            raise _Unparsable("h11 paused")
        return cast(h11.Event, event)


@dataclass
class _RequestHead:
    method: str
    path: str
    range: str  # the Range header, "" if none
    event: h11.Request


def _parse_request(event: h11.Request) -> _RequestHead:
    headers = dict(event.headers)
    target = event.target.decode("latin-1")
    return _RequestHead(
        event.method.decode("latin-1"), target.split("?", 1)[0], headers.get(b"range", b"").decode("latin-1"), event
    )


def _forwarded(request: _RequestHead, upstream: h11.Connection) -> bytes:
    """The request head for the target, with `connection: close` in place of the client's."""
    headers = [(k, v) for k, v in request.event.headers.raw_items() if k.lower() != b"connection"]
    head = h11.Request(
        method=request.event.method, target=request.event.target, headers=[*headers, (b"connection", b"close")]
    )
    return upstream.send(head) or b""


def _reset(stream: trio.SocketStream) -> None:
    """Close with an RST, as a crashed or cut-off server would."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _response(
    conn: h11.Connection, status: int, body: bytes, headers: list[tuple[str, str]], reason: bytes = b""
) -> bytes:
    """A whole response with a JSON body that closes the connection, framed by h11."""
    head = h11.Response(
        status_code=status,
        reason=reason or HTTPStatus(status).phrase.encode(),
        headers=[
            ("content-type", "application/json"),
            *headers,
            ("content-length", str(len(body))),
            ("connection", "close"),
        ],
    )
    return b"".join(conn.send(event) or b"" for event in (head, h11.Data(data=body), h11.EndOfMessage()))


async def _send(client: trio.SocketStream, relay: FaultRelay, data: bytes) -> None:
    if relay.bucket is not None:
        await relay.bucket.take(len(data))
    await client.send_all(data)
    relay.stats.downstream_bytes += len(data)


async def _control(client: trio.SocketStream, conn: h11.Connection, relay: FaultRelay, request: _RequestHead) -> None:
    status, body = 200, b""
    if request.path == CONTROL_PREFIX + "stats" and request.method == "GET":
        body = json.dumps(asdict(relay.stats)).encode()
    elif request.path == CONTROL_PREFIX + "plan" and request.method == "PUT":
        plan = bytearray()
        while not isinstance(event := await _receive_event(client, conn), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return  # the client went away mid-body
            plan += event.data
        try:
            relay.set_plan(FaultPlan.from_json(bytes(plan)))
            body = json.dumps(asdict(relay.plan)).encode()
        except (ValueError, TypeError) as exc:
            status, body = 400, json.dumps({"error": str(exc)}).encode()
    else:
        status, body = 404, b'{"error": "no such control endpoint"}'
    await client.send_all(_response(conn, status, body, []))


async def _injected_failure(client: trio.SocketStream, conn: h11.Connection, relay: FaultRelay) -> None:
    body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "fault injected by p2pdist faultrelay"}]}).encode()
    await _send(
        client, relay, _response(conn, relay.plan.fail_status, body, [("retry-after", "1")], reason=b"Injected Fault")
    )


async def _relay_response(
    client: trio.SocketStream,
    target: trio.SocketStream,
    upstream: h11.Connection,
    relay: FaultRelay,
    fault: str,
    blob: bool,
) -> None:
    """The target's response head as it came, then its body, cut or stalled as `fault` says."""
    plan = relay.plan
    raw = bytearray()
    try:
        while not isinstance(await _receive_event(target, upstream, raw), h11.Response):
            pass  # a 100 Continue goes to the client with the head that follows it
    except _Unparsable:
        _reset(client)
        return
    pending, _ = upstream.trailing_data
    await _send(client, relay, bytes(raw[: len(raw) - len(pending)]))

    def count(nbytes: int) -> None:
        relay.stats.downstream_bytes += nbytes
        if blob:
            relay.stats.blob_body_bytes += nbytes

    async def send_body(data: bytes) -> None:
        if data:
            await _send(client, relay, data)
            if blob:
                relay.stats.blob_body_bytes += len(data)

    limit = {"reset": plan.reset_after_bytes, "stall": plan.stall_after_bytes}.get(fault)
    if limit is not None:
        first, pending = pending[:limit], pending[limit:]
        await send_body(first)
        if len(first) < limit and not await pump(
            target, client, receive_bytes=RECEIVE_BYTES, bucket=relay.bucket, on_bytes=count, limit=limit - len(first)
        ):
            return  # the body ended before the fault's point
        if fault == "reset":
            _reset(client)
            return
        await trio.sleep(plan.stall_s)
    await send_body(pending)
    await pump(target, client, receive_bytes=RECEIVE_BYTES, bucket=relay.bucket, on_bytes=count)


async def handle_connection(client: trio.SocketStream, target_host: str, target_port: int, relay: FaultRelay) -> None:
    stats = relay.stats
    stats.connections += 1
    async with client:
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            try:
                event = await _receive_event(client, conn)
            except _Unparsable:
                return
            if not isinstance(event, h11.Request):
                return  # closed before a request
            request = _parse_request(event)
            if request.path.startswith(CONTROL_PREFIX):
                await _control(client, conn, relay, request)
                return
            stats.requests += 1
            blob = request.method == "GET" and BLOB_GET.fullmatch(request.path) is not None
            fault = "pass"
            if blob:
                stats.blob_gets += 1
                stats.ranges.append(request.range)
                fault = relay.deal()
            if fault == "fail":
                stats.failed += 1
                await _injected_failure(client, conn, relay)
                return
            if fault == "reset":
                stats.resets += 1
            elif fault == "stall":
                stats.stalls += 1
            try:
                target = await trio.open_tcp_stream(target_host, target_port)
            except OSError:
                _reset(client)
                return
            async with target:
                upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
                # The body, if any, goes on as the client sends it, from what came with the head.
                await target.send_all(_forwarded(request, upstream) + conn.trailing_data[0])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump_up, client, target)
                    await _relay_response(client, target, upstream, relay, fault, blob)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, _Unparsable, h11.ProtocolError):
            pass  # one client's broken exchange; the relay serves the next


async def _pump_up(client: trio.SocketStream, target: trio.SocketStream) -> None:
    """The rest of the request (a body, if any) to the target."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await pump(client, target, receive_bytes=RECEIVE_BYTES)


async def serve_fault_relay(
    target_host: str,
    target_port: int,
    relay: FaultRelay,
    *,
    listen_port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay 127.0.0.1:`listen_port` to the target with `relay`'s faults until cancelled; `started(port)`."""

    async def handle(client: trio.SocketStream) -> None:
        await handle_connection(client, target_host, target_port, relay)

    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


async def run_fault_relay_process(target_host: str, target_port: int, listen_port: int, plan: FaultPlan) -> None:
    relay = FaultRelay(plan)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_fault_relay(
                    target_host, target_port, relay, listen_port=listen_port, task_status=task_status
                )
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


class FaultRelayProcess:
    """`python -m lab.faultrelay` as a child process, driven over its control endpoints."""

    def __init__(
        self, workdir: Path, target_host: str, plan: FaultPlan | None = None, *, name: str = "faultrelay"
    ) -> None:
        import sys

        from lab.procs import Service

        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "lab.faultrelay",
            "--target",
            target_host,
            "--listen",
            str(port),
            "--plan",
            json.dumps(asdict(plan or FaultPlan())),
        ]
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.service = Service(name, argv, workdir / f"{name}.log", self.url)
        try:
            self.service.wait_http(self.url + CONTROL_PREFIX + "stats", READY_TIMEOUT_S)
        except BaseException:
            self.service.stop()
            raise

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.url + CONTROL_PREFIX + "stats", timeout=10).json()
        return result

    def set_plan(self, plan: FaultPlan) -> None:
        response = httpx.put(self.url + CONTROL_PREFIX + "plan", content=json.dumps(asdict(plan)), timeout=10)
        response.raise_for_status()

    def stop(self) -> int:
        return self.service.stop()

    def __enter__(self) -> FaultRelayProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.faultrelay", description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT of the origin")
    parser.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--plan", default="{}", help="the FaultPlan as JSON, e.g. '{\"fail_blob_gets\": 2}'")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--target: expected HOST:PORT, got {args.target!r}")
    try:
        plan = FaultPlan.from_json(args.plan)
    except (ValueError, TypeError) as exc:
        parser.error(f"--plan: {exc}")
    started = time.monotonic()
    trio.run(run_fault_relay_process, host, int(port), args.listen, plan)
    print(f"faultrelay stopped after {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()

"""Load on one daemon and one scheduler: many clients pulling one blob through one peer's
mirror port at once, many simulated peers registering and syncing with one scheduler, and a
flood of bogus registrations while a real pull runs. Prints latency percentiles, errors and
the daemons' RSS (VmHWM, VmRSS from /proc/PID/status).

    .venv/bin/python -m benchmarks.load --pulls 200 --blob-size 8MiB --peers 1000
    .venv/bin/python -m benchmarks.load --pulls 0 --peers 0 --flood 20000 --flood-seconds 30
    .venv/bin/python -m benchmarks.load --pulls 0 --peers 2000 --by-type
    .venv/bin/python -m benchmarks.load --replay trace.msgpack   # from benchmarks.simulate --trace-out

Everything is real and on loopback: the Distribution registry as origin, a scheduler, a seed
and a peer as separate processes. The simulated peers are msgpack calls from this process
over a pool of kept-alive sockets (httpx would be the bottleneck, not the scheduler): each
announces itself, registers the task, reports its pieces in a few syncs and finishes.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

from benchmarks.replay import replay
from benchmarks.report import cpu_seconds
from lab.image import make_oci_layout, push_image
from lab.procs import Service, start_peer, start_scheduler, start_seed
from lab.registry import Origin
from p2pdist import wire
from p2pdist.config import SchedulerConfig, parse_size
from p2pdist.content.pieces import PieceLayout, piece_size_sent
from p2pdist.registry.oci import SCHEME_HEADER

REPO = "load/blob"
MiB = 1 << 20


@dataclass
class LoadResult:
    what: str
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_kib: int = 0
    cpu_s: float = math.nan  # the daemon's CPU time during the run

    def measure(self, pid: int, cpu_before: float) -> None:
        """Record the daemon's peak RSS and the CPU it used since `cpu_before`."""
        self.peak_rss_kib = rss_kib(pid)["VmHWM"]
        self.cpu_s = cpu_seconds(pid) - cpu_before

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds."""
        ordered = sorted(self.latencies_s)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    def summary(self) -> str:
        rate = len(self.latencies_s) / self.wall_s if self.wall_s else math.nan
        return (
            f"{self.what}: {len(self.latencies_s)} ok, {len(self.errors)} errors in {self.wall_s:.2f} s "
            f"({rate:.0f}/s); "
            f"latency p50 {self.percentile(50) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms, "
            f"max {max(self.latencies_s, default=math.nan) * 1000:.1f} ms; "
            f"daemon CPU {self.cpu_s:.1f} s, peak RSS {self.peak_rss_kib / 1024:.1f} MiB"
        )


class _Connections:
    """A pool of kept-alive HTTP/1.1 connections to one scheduler, speaking just enough HTTP
    for msgpack POSTs with Content-Length answers."""

    def __init__(self, url: str, size: int, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.size = size
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.send, self.receive = trio.open_memory_channel[tuple[trio.SocketStream, bytearray] | None](size)
        for _ in range(size):
            self.send.send_nowait(None)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        """Status, body and seconds from sending the request to the end of the answer."""
        conn = await self.receive.receive()
        started = time.perf_counter()
        try:
            if conn is None:
                conn = (await trio.open_tcp_stream(self.host, self.port), bytearray())
            stream, buffered = conn
            head = (
                f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\n{self.extra}content-length: {len(body)}\r\n\r\n"
            ).encode()
            await stream.send_all(head + body)
            while (end := buffered.find(b"\r\n\r\n")) < 0:
                buffered += await _receive(stream)
            lines = bytes(buffered[:end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(
                int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")
            )
            del buffered[: end + 4]
            while len(buffered) < length:
                buffered += await _receive(stream)
            reply = bytes(buffered[:length])
            del buffered[:length]
        except BaseException:
            if conn is not None:
                await trio.aclose_forcefully(conn[0])
            self.send.send_nowait(None)
            raise
        self.send.send_nowait(conn)
        return status, reply, time.perf_counter() - started

    async def aclose(self) -> None:
        for _ in range(self.size):
            conn = await self.receive.receive()
            if conn is not None:
                await conn[0].aclose()


async def _receive(stream: trio.SocketStream) -> bytes:
    data = await stream.receive_some(65536)
    if not data:
        raise ConnectionError("the scheduler closed the connection")
    return data


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def pull_through_mirror(proxy_url: str, origin_host: str, digest: str, clients: int) -> LoadResult:
    """`clients` GETs of one blob at once through the mirror; each checks the blob's sha256."""
    result = LoadResult(f"{clients} concurrent pulls of {digest[:19]}")
    url = f"{proxy_url}/v2/{REPO}/blobs/{digest}"
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    go = trio.Event()

    async def one(client: httpx.AsyncClient) -> None:
        await go.wait()
        started = time.perf_counter()
        sha = hashlib.sha256()
        try:
            async with client.stream("GET", url, params={"ns": origin_host}, headers={SCHEME_HEADER: "http"}) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.text.strip()[:200]}")
                async for chunk in resp.aiter_raw():
                    sha.update(chunk)
        except (httpx.HTTPError, RuntimeError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if "sha256:" + sha.hexdigest() != digest:
            result.errors.append("wrong bytes")
            return
        result.latencies_s.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=60), limits=limits) as client:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one, client)
            go.set()
        result.wall_s = time.perf_counter() - started
    return result


def _layout(blob_size: int, min_piece_bytes: int | None = None) -> PieceLayout:
    """The blob cut as the scheduler under test cuts it: the rule with its min_piece_bytes
    (the default when None)."""
    return PieceLayout.for_blob(blob_size, min_piece_bytes or SchedulerConfig().min_piece_bytes)


async def simulate_peers(
    scheduler_url: str,
    peers: int,
    *,
    blob_size: int = 512 * MiB,
    syncs: int = 3,
    concurrency: int = 200,
    secret: str | None = None,
    min_piece_bytes: int | None = None,
) -> LoadResult:
    """`peers` simulated hosts against one scheduler: announce, register, `syncs` syncs that
    report pieces, a last sync that says done. A simulated seed holds the whole task first."""
    result = LoadResult(f"{peers} simulated peers registering and syncing over {concurrency} connections")
    layout = _layout(blob_size, min_piece_bytes)
    task_id = "sha256:" + hashlib.sha256(b"p2pdist load task").hexdigest()
    # On an allowed registry (the lab's loopback), or the scheduler refuses the registrations;
    # the simulated seed holds the task, so nothing is ever fetched from it.
    blob_url = f"http://127.0.0.1:9/v2/{REPO}/blobs/{task_id}"
    every_piece = bytes([0xFF]) * ((layout.count + 7) // 8)
    headers = {"content-type": wire.CONTENT_TYPE, **({"authorization": f"Bearer {secret}"} if secret else {})}
    client = _Connections(scheduler_url, concurrency, headers)
    try:

        async def call(path: str, message: object) -> bytes | None:
            # Latency counts from the request's turn on a connection: waiting for one of
            # the pool's sockets is this load generator's queue, not the scheduler's.
            try:
                status, reply, seconds = await client.post(path, wire.encode(message))
            except (OSError, ValueError, StopIteration, trio.BrokenResourceError) as exc:
                result.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                return None
            if status != 200:
                result.errors.append(f"{path}: HTTP {status} {reply.strip()[:100]!r}")
                return None
            result.latencies_s.append(seconds)
            return reply

        seed = wire.AnnounceHost(
            host_id="load-seed",
            url="http://seed.invalid:4010",
            kind="seed",
            upload_slots=64,
            tasks=[
                wire.TaskHolding(
                    task_id=task_id,
                    content_length=blob_size,
                    pieces=every_piece,
                    url=blob_url,
                    piece_digests=[b"\x00" * 32] * layout.count,
                    piece_size=piece_size_sent(blob_size, layout.piece_size),
                )
            ],
        )
        await call("/v1/hosts", seed)

        async def peer(i: int) -> None:
            host_id = f"load-peer-{i:05d}"
            await call(
                "/v1/hosts",
                wire.AnnounceHost(host_id=host_id, url=f"http://peer-{i}.invalid:4000", kind="peer", upload_slots=16),
            )
            reply = await call("/v1/tasks/register", wire.Register(host_id=host_id, task_id=task_id, url=blob_url))
            if reply is None:
                return
            if not wire.decode(wire.SyncReply, reply).parents:
                result.errors.append(f"{host_id}: registered without parents")
            per_sync = max(1, layout.count // syncs)
            for n in range(syncs + 1):
                pieces = list(range(n * per_sync, min(layout.count, (n + 1) * per_sync))) if n < syncs else []
                await call(
                    "/v1/tasks/sync",
                    wire.Sync(
                        host_id=host_id, task_id=task_id, new_pieces=pieces, have_digests=layout.count, done=n == syncs
                    ),
                )

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(peers):
                nursery.start_soon(peer, i)
        result.wall_s = time.perf_counter() - started
    finally:
        await client.aclose()
    return result


@dataclass
class TypeCost:
    """One request type's phase of `cost_by_type`: its requests, the scheduler's CPU for them."""

    kind: str
    requests: int
    cpu_s: float
    wall_s: float
    latency: LoadResult

    def line(self) -> str:
        return (
            f"{self.kind:9s} {self.requests:6d} requests  {self.cpu_s:6.2f} CPU-s  "
            f"{self.cpu_s / max(1, self.requests) * 1000:6.3f} ms CPU per request  "
            f"{self.requests / self.wall_s:6.0f}/s  p50 {self.latency.percentile(50) * 1000:6.1f} ms  "
            f"p99 {self.latency.percentile(99) * 1000:6.1f} ms  errors {len(self.latency.errors)}"
        )


async def cost_by_type(
    scheduler_url: str,
    scheduler_pid: int,
    peers: int,
    *,
    blob_size: int = 512 * MiB,
    syncs: int = 3,
    concurrency: int = 200,
    secret: str | None = None,
    min_piece_bytes: int | None = None,
) -> list[TypeCost]:
    """The scheduler's CPU per request of each type, one type at a time: `peers` hosts
    announce, then register one task (held by a simulated seed), then sync it `syncs` times
    with new pieces and once more as done, then leave it; besides, the seed reports the
    digests of peers/16 other tasks 8 pieces at a time (seed progress). Each phase's CPU is
    the scheduler process's user+system time across it."""
    layout = _layout(blob_size, min_piece_bytes)
    task_id = "sha256:" + hashlib.sha256(b"p2pdist load task").hexdigest()
    blob_url = f"http://127.0.0.1:9/v2/{REPO}/blobs/{task_id}"
    headers = {"content-type": wire.CONTENT_TYPE, **({"authorization": f"Bearer {secret}"} if secret else {})}
    client = _Connections(scheduler_url, concurrency, headers)
    hosts = [f"load-peer-{i:05d}" for i in range(peers)]
    seed = wire.AnnounceHost(
        host_id="load-seed",
        url="http://seed.invalid:4010",
        kind="seed",
        upload_slots=64,
        tasks=[
            wire.TaskHolding(
                task_id=task_id,
                content_length=blob_size,
                pieces=bytes([0xFF]) * ((layout.count + 7) // 8),
                url=blob_url,
                piece_digests=[b"\x00" * 32] * layout.count,
                piece_size=piece_size_sent(blob_size, layout.piece_size),
            )
        ],
    )
    per_sync = max(1, layout.count // syncs)

    def sync(host_id: str, n: int) -> tuple[str, object]:
        pieces = list(range(n * per_sync, min(layout.count, (n + 1) * per_sync))) if n < syncs else []
        message = wire.Sync(
            host_id=host_id, task_id=task_id, new_pieces=pieces, have_digests=layout.count, done=n == syncs
        )
        return "/v1/tasks/sync", message

    reports = []
    for t in range(max(1, peers // 16)):
        other = "sha256:" + hashlib.sha256(f"p2pdist load seed task {t}".encode()).hexdigest()
        for first in range(0, layout.count, 8):
            count = min(8, layout.count - first)
            progress = wire.SeedProgress(
                host_id="load-seed",
                task_id=other,
                content_length=blob_size,
                first_digest=first,
                piece_digests=[bytes([t % 256]) * 32] * count,
                done=first + count == layout.count,
                piece_size=piece_size_sent(blob_size, layout.piece_size),
            )
            reports.append(("/v1/tasks/seed", progress))
    phases: list[tuple[str, list[tuple[str, object]]]] = [
        ("announce", [("/v1/hosts", seed)] + [
            ("/v1/hosts", wire.AnnounceHost(host_id=h, url=f"http://{h}.invalid:4000", kind="peer", upload_slots=16))
            for h in hosts
        ]),
        ("register", [("/v1/tasks/register", wire.Register(host_id=h, task_id=task_id, url=blob_url)) for h in hosts]),
        ("sync", [sync(h, n) for n in range(syncs + 1) for h in hosts]),
        ("seed", reports),
        ("leave", [("/v1/tasks/leave", wire.Leave(host_id=h, task_id=task_id)) for h in hosts]),
    ]  # fmt: skip
    out = []
    try:
        for kind, calls in phases:
            result = LoadResult(kind)
            bodies = [(path, wire.encode(message)) for path, message in calls]
            send, receive = trio.open_memory_channel[tuple[str, bytes]](len(bodies))
            for item in bodies:
                send.send_nowait(item)
            send.close()

            async def worker(
                result: LoadResult = result, receive: trio.MemoryReceiveChannel[tuple[str, bytes]] = receive
            ) -> None:
                async for path, body in receive:
                    try:
                        status, reply, seconds = await client.post(path, body)
                    except (OSError, ValueError, StopIteration, trio.BrokenResourceError) as exc:
                        result.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                        continue
                    if status != 200:
                        result.errors.append(f"{path}: HTTP {status} {reply.strip()[:100]!r}")
                        continue
                    result.latencies_s.append(seconds)

            before = cpu_seconds(scheduler_pid)
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
            wall = time.perf_counter() - started
            out.append(TypeCost(kind, len(bodies), cpu_seconds(scheduler_pid) - before, wall, result))
    finally:
        await client.aclose()
    return out


@dataclass
class FloodResult:
    """What the scheduler answered a flood of bogus registrations."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> str:
        answers = ", ".join(f"{n} x {status}" for status, n in sorted(self.statuses.items()))
        return (
            f"flood: {self.sent} bogus registrations in {self.wall_s:.1f} s ({self.sent / self.wall_s:.0f}/s): "
            f"{answers}; {len(self.errors)} transport errors"
        )


async def flood_registrations(
    scheduler_url: str,
    count: int,
    seconds: float,
    registry_host: str,
    *,
    hosts: int = 0,
    concurrency: int = 64,
    secret: str | None = None,
) -> FloodResult:
    """`count` registrations of made-up blobs, spread evenly over `seconds`: URLs of the right
    shape on an allowed registry (the origin answers 404 for each), so only the per-host rate
    and the waiting-task cap stand in their way. `hosts` host ids take turns (0: a new host id
    for every registration, which no per-host rate can catch)."""
    result = FloodResult()
    headers = {"content-type": wire.CONTENT_TYPE, **({"authorization": f"Bearer {secret}"} if secret else {})}
    client = _Connections(scheduler_url, concurrency, headers)
    nonce = time.time_ns()
    send, receive = trio.open_memory_channel[int](count)
    for i in range(count):
        send.send_nowait(i)
    send.close()
    started = trio.current_time()

    async def worker() -> None:
        async for i in receive:
            await trio.sleep_until(started + i * seconds / count)
            digest = "sha256:" + hashlib.sha256(f"p2pdist flood {nonce} {i}".encode()).hexdigest()
            message = wire.Register(
                host_id=f"flood-{i % hosts if hosts else i}",
                task_id=digest,
                url=f"http://{registry_host}/v2/flood/bogus/blobs/{digest}",
            )
            try:
                status, _, _ = await client.post("/v1/tasks/register", wire.encode(message))
            except (OSError, ValueError, StopIteration, trio.BrokenResourceError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            result.sent += 1
            result.statuses[status] += 1

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    finally:
        await client.aclose()
    result.wall_s = trio.current_time() - started
    return result


def metric_value(service_url: str, name: str) -> float:
    """Sum of one Prometheus metric's samples, from a service's /metrics."""
    text = httpx.get(f"{service_url}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if not line.startswith("#") and (line.startswith(name + " ") or line.startswith(name + "{"))
    )


@dataclass
class FloodReport:
    """A flood while a real pull runs: the pull, the scheduler's answers, and the RSS (KiB) of
    scheduler and seed idle before, at their peak during, and after the flood's state expired."""

    flood: FloodResult
    pull: LoadResult  # the real pull during the flood
    quiet_pull: LoadResult  # the same kind of pull (another blob of the same size) before it
    rss_kib: dict[str, dict[str, int]]
    expiry_wait_s: float

    def summary(self) -> str:
        def took(pull: LoadResult) -> str:
            if pull.errors:
                return f"FAILED: {pull.errors[0]}"
            return f"{pull.latencies_s[0]:.2f} s, sha256 checked"

        lines = [
            self.flood.summary(),
            f"real pull during the flood: {took(self.pull)} (the same pull before the flood: {took(self.quiet_pull)})",
        ]
        for name, rss in self.rss_kib.items():
            lines.append(
                f"{name} VmRSS: before {rss['before'] / 1024:.1f} MiB, during (peak) {rss['during'] / 1024:.1f} MiB, "
                f"after expiry {rss['after'] / 1024:.1f} MiB ({rss['after'] / rss['before'] - 1:+.0%})"
            )
        lines.append(f"flood state expired {self.expiry_wait_s:.1f} s after the flood ended")
        return "\n".join(lines)


def run_flood(
    workdir: Path,
    origin: Origin,
    *,
    count: int,
    seconds: float,
    expiry_s: float,
    blob_size: int,
    hosts: int = 0,
    pull_after_s: float | None = None,
) -> FloodReport:
    """Scheduler, seed and peer as processes; a warm-up pull; then `count` bogus registrations
    in `seconds` with a real pull of another blob started `pull_after_s` in (default: a third
    of the way); then wait until scheduler and seed have forgotten the flood (`expiry_s` is
    their peer_ttl_s and failed_fetch_ttl_s) and read their RSS again."""
    services: list[Service] = []
    try:
        images = [make_oci_layout(workdir / f"flood-image-{i}", [blob_size], 90 + i) for i in range(2)]
        for image in images:
            push_image(image, origin.host, REPO)
        warm, real = (image.layers[0].digest for image in images)
        scheduler = start_scheduler(workdir, extra_args=["--peer-ttl-s", f"{expiry_s:g}"])
        services.append(scheduler)
        seed = start_seed(workdir, scheduler.url, extra_args=["--failed-fetch-ttl-s", f"{expiry_s:g}"])
        services.append(seed)
        peer = start_peer(workdir, scheduler.url, "peer")
        services.append(peer)
        assert peer.proxy_url is not None
        proxy_url = peer.proxy_url
        warmup = trio.run(pull_through_mirror, proxy_url, origin.host, warm, 1)
        if warmup.errors:
            raise RuntimeError(f"warm-up pull failed: {warmup.errors[0]}")
        time.sleep(2.0)  # let the warm-up's buffers settle before taking the idle figure
        daemons = {"scheduler": scheduler, "seed": seed}
        rss = {name: {"before": rss_kib(s.pid)["VmRSS"], "during": 0} for name, s in daemons.items()}
        start_pull = seconds / 3 if pull_after_s is None else pull_after_s
        pulls: list[LoadResult] = []

        async def during() -> FloodResult:
            async with trio.open_nursery() as nursery:
                flooding = trio.Event()

                async def sample() -> None:
                    while True:
                        for name, service in daemons.items():
                            rss[name]["during"] = max(rss[name]["during"], rss_kib(service.pid)["VmRSS"])
                        if flooding.is_set():
                            return
                        await trio.sleep(0.25)

                async def pull() -> None:
                    await trio.sleep(start_pull)
                    pulls.append(await pull_through_mirror(proxy_url, origin.host, real, 1))

                nursery.start_soon(sample)
                nursery.start_soon(pull)
                flood = await flood_registrations(scheduler.url, count, seconds, origin.host, hosts=hosts)
                flooding.set()
            return flood

        log(f"flood: {count} bogus registrations in {seconds:g} s against scheduler pid {scheduler.pid}")
        flood = trio.run(during)
        ended = time.monotonic()
        log(f"waiting for scheduler and seed to forget the flood (expiry {expiry_s:g} s)")
        deadline = ended + expiry_s * 3 + 30
        while not (
            metric_value(scheduler.url, "p2pdist_scheduler_tasks") <= 2
            and metric_value(seed.url, "p2pdist_seed_failed_fetches") == 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the flood's tasks were not forgotten in time")
            time.sleep(0.5)
        expiry_wait_s = time.monotonic() - ended
        time.sleep(3.0)  # a few sweeps after the last record went (each may trim the heap)
        for name, service in daemons.items():
            rss[name]["after"] = rss_kib(service.pid)["VmRSS"]
        return FloodReport(flood=flood, pull=pulls[0], quiet_pull=warmup, rss_kib=rss, expiry_wait_s=expiry_wait_s)
    finally:
        for service in reversed(services):
            service.stop()


# The server of --http-floor, run as a child process: the HTTP server with the lean lane and a
# handler that does nothing but answer (300 bytes, as a sync reply), quick or not.
_FLOOR_SERVER = """
import sys, trio
from p2pdist.transport.server import Response, serve_http
REPLY = Response(200, [("content-type", "application/msgpack")], b"\\x80" * 300)
async def handler(request):
    await request.body()
    return REPLY
def quick(request):
    return REPLY if request.body_now() is not None else None
async def main():
    extra = {"quick_handler": quick, "lane": sys.argv[2] == "lane"} if sys.argv[1] == "quick" else {}
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: serve_http(handler, "127.0.0.1", 0, name="floor", lean=True, task_status=task_status, **extra)
        )
        print(port, flush=True)
trio.run(main)
"""


def http_floor(requests: int, connections: int, *, quick: bool, lane: bool = False) -> str:
    """The HTTP server's own CPU per request: a handler that only answers, in a child process,
    `requests` small POSTs over `connections` kept-alive connections from this one (each waits
    for its answer before the next, as a daemon does)."""
    server = subprocess.Popen(
        [sys.executable, "-c", _FLOOR_SERVER, "quick" if quick else "handler", "lane" if lane else "no-lane"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        body = wire.encode(wire.Sync(host_id="load-peer-00001", task_id="sha256:" + "0" * 64, new_pieces=[1, 2, 3]))

        async def run() -> float:
            client = _Connections(f"http://127.0.0.1:{port}", connections, {"content-type": wire.CONTENT_TYPE})

            async def worker(count: int) -> None:
                for _ in range(count):
                    status, _, _ = await client.post("/v1/tasks/sync", body)
                    assert status == 200, status

            try:
                async with trio.open_nursery() as nursery:  # every connection opened, warm
                    for _ in range(connections):
                        nursery.start_soon(worker, 10)
                before = cpu_seconds(server.pid)
                async with trio.open_nursery() as nursery:
                    for _ in range(connections):
                        nursery.start_soon(worker, requests // connections)
                return cpu_seconds(server.pid) - before
            finally:
                await client.aclose()

        cpu = trio.run(run)
        sent = requests // connections * connections
        return (
            f"http floor ({'quick handler' if quick else 'handler'}{' in the lane' if lane else ''}): "
            f"{sent} requests over {connections} "
            f"connections, server {cpu:.2f} CPU-s, {cpu / sent * 1e6:.0f} us per request"
        )
    finally:
        server.terminate()
        server.wait()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pulls", type=int, default=200, help="concurrent clients pulling one blob (0: skip)")
    parser.add_argument("--blob-size", default="8MiB", help="size of the pulled blob")
    parser.add_argument("--peers", type=int, default=1000, help="simulated peers against the scheduler (0: skip)")
    parser.add_argument("--connections", type=int, default=200, help="sockets the simulated peers share")
    parser.add_argument(
        "--by-type",
        action="store_true",
        help="with --peers: send each request type in its own phase and print the scheduler's CPU per request of each",
    )
    parser.add_argument(
        "--min-piece-bytes",
        default=None,
        help="with --peers: the scheduler's min_piece_bytes, and the layout the simulated peers use "
        "(4MiB: the layout before pieces became 2 MiB, to compare with figures taken then)",
    )
    parser.add_argument(
        "--http-floor",
        type=int,
        default=0,
        metavar="REQUESTS",
        help="the HTTP server's CPU per request behind a handler that only answers: a handler, a quick "
        "handler, a quick handler with parked connections (lane=True, as the scheduler serves), over "
        "--connections connections; nothing else runs",
    )
    parser.add_argument("--flood", type=int, default=0, help="bogus registrations during a real pull (0: skip)")
    parser.add_argument("--flood-seconds", type=float, default=30.0, help="time the flood is spread over")
    parser.add_argument(
        "--flood-hosts", type=int, default=0, help="host ids the flood takes turns with (0: a new one each time)"
    )
    parser.add_argument(
        "--expiry-s", type=float, default=60.0, help="scheduler peer_ttl_s and seed failed_fetch_ttl_s in the flood"
    )
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        metavar="TRACE",
        help="send a real scheduler the requests of a trace from benchmarks.simulate --trace-out, at their times, "
        "and say whether it kept up (benchmarks/replay.py); nothing else runs",
    )
    parser.add_argument("--replay-speed", type=float, default=1.0, help="replay this many times faster than the trace")
    parser.add_argument(
        "--replay-target-ms", type=float, default=100.0, help="latency and delay p99 the scheduler must stay within"
    )
    args = parser.parse_args(argv)
    if args.http_floor:
        for quick, lane in ((False, False), (True, False), (True, True)):
            print(http_floor(args.http_floor, args.connections, quick=quick, lane=lane))
        return 0
    if args.replay is not None:
        with tempfile.TemporaryDirectory(prefix="p2pdist-replay-") as tmp:
            log(f"replaying {args.replay}")
            replayed = replay(args.replay, Path(tmp), speed=args.replay_speed, target_s=args.replay_target_ms / 1000)
        print(replayed.summary())
        return 0
    blob_size = parse_size(args.blob_size)
    with tempfile.TemporaryDirectory(prefix="p2pdist-load-") as tmp:
        workdir = Path(tmp)
        if args.flood:
            with Origin() as origin:
                report = run_flood(
                    workdir / "flood",
                    origin,
                    count=args.flood,
                    seconds=args.flood_seconds,
                    expiry_s=args.expiry_s,
                    blob_size=blob_size,
                    hosts=args.flood_hosts,
                )
            print(report.summary())
        services: list[Service] = []
        try:
            min_piece_bytes = parse_size(args.min_piece_bytes) if args.min_piece_bytes else None
            scheduler = start_scheduler(
                workdir, extra_args=["--min-piece-bytes", str(min_piece_bytes)] if min_piece_bytes else []
            )
            services.append(scheduler)
            if args.peers and args.by_type:
                log(f"{args.peers} simulated peers against scheduler pid {scheduler.pid}, one request type at a time")
                costs = trio.run(
                    lambda: cost_by_type(
                        scheduler.url,
                        scheduler.pid,
                        args.peers,
                        concurrency=args.connections,
                        min_piece_bytes=min_piece_bytes,
                    )
                )
                for cost in costs:
                    print(cost.line())
                total = sum(c.requests for c in costs)
                print(f"all       {total:6d} requests  {sum(c.cpu_s for c in costs):6.2f} CPU-s  "
                      f"{sum(c.cpu_s for c in costs) / total * 1000:6.3f} ms CPU per request")  # fmt: skip
            elif args.peers:
                log(f"{args.peers} simulated peers against scheduler pid {scheduler.pid}")
                before = cpu_seconds(scheduler.pid)
                regs = trio.run(
                    lambda: simulate_peers(
                        scheduler.url, args.peers, concurrency=args.connections, min_piece_bytes=min_piece_bytes
                    )
                )
                regs.measure(scheduler.pid, before)
                print(regs.summary())
            if args.pulls:
                with Origin() as origin:
                    image = make_oci_layout(workdir / "image", [blob_size], 7)
                    push_image(image, origin.host, REPO)
                    digest = image.layers[0].digest
                    services.append(start_seed(workdir, scheduler.url))
                    peer = start_peer(workdir, scheduler.url, "peer")
                    services.append(peer)
                    assert peer.proxy_url is not None
                    log(f"{args.pulls} pulls of {blob_size / MiB:.0f} MiB through peer pid {peer.pid}")
                    before = cpu_seconds(peer.pid)
                    pulls = trio.run(pull_through_mirror, peer.proxy_url, origin.host, digest, args.pulls)
                    pulls.measure(peer.pid, before)
                    print(pulls.summary())
                    for error in sorted(set(pulls.errors))[:10]:
                        print(f"  error: {error}")
        finally:
            for service in reversed(services):
                service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

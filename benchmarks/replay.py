"""Replay a simulated rollout's control traffic against a real scheduler process: the requests
`benchmarks.simulate --trace-out` wrote down, the daemons' own wire messages, sent over the
real HTTP API at the times the simulator produced them, one kept-alive connection per host.

The scheduler runs pinned to one core (taskset) and this generator to the other. The hosts'
announces (time 0 in the trace) go first, untimed; the seed's URL is pointed at a stub in this
process that accepts the wake-up. Then every request is sent at its time, or as soon as its
host's previous request has been answered (a daemon waits for the answer before its next).

Definitions in the report:
- latency: from sending a request to the end of its answer;
- delay: from its time in the trace to the end of its answer (latency plus any wait behind
  its host's previous request or behind this generator);
- backlog: requests whose time has come and whose answer has not, sampled every 0.25 s;
- generator lag: how late this process sent a request that nothing held up (its host had no
  request in flight): the generator's own shortfall, not the scheduler's.
The scheduler kept up if latency p99 and delay p99 are both at most --replay-target-ms
(default 100) and the backlog in the second half of the schedule is not over twice that of the
first; it did not if the trace's mean rate times the CPU per request it measured needs more
than one core; else, with a generator lag p99 over 50 ms, the verdict says the run cannot tell.
"""

from __future__ import annotations

import bisect
import heapq
import math
import os
import select
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import trio

from benchmarks.report import cpu_seconds, percentile
from benchmarks.trace import TraceRecord, read_trace
from lab.ports import free_port
from lab.procs import Service, p2pdist_executable
from p2pdist import wire
from p2pdist.transport.server import Request, Response, serve_http

BACKLOG_SAMPLE_S = 0.25
GENERATOR_LAG_LIMIT_S = 0.050
SCHEDULER_CORE = 0
GENERATOR_CORE = 1


@dataclass
class Sent:
    record: TraceRecord
    scheduled_s: float  # when it was due, from the start of the schedule
    sent_s: float = math.nan
    answered_s: float = math.nan
    free_s: float = 0.0  # when its host's previous request was answered (0 for its first)
    status: int = 0
    error: str = ""


@dataclass
class ReplayResult:
    trace: Path
    hosts: int
    requests: list[Sent] = field(default_factory=list)
    setup_requests: int = 0
    wall_s: float = 0.0
    cpu_s: float = math.nan
    target_s: float = 0.100

    def answered(self) -> list[Sent]:
        return [s for s in self.requests if not s.error and s.status == 200]

    def errors(self) -> list[str]:
        return [s.error or f"{s.record.kind}: HTTP {s.status}" for s in self.requests if s.error or s.status != 200]

    def latencies(self, kind: str | None = None) -> list[float]:
        return [s.answered_s - s.sent_s for s in self.answered() if kind is None or s.record.kind == kind]

    def delays(self) -> list[float]:
        return [s.answered_s - s.scheduled_s for s in self.answered()]

    def generator_lags(self) -> list[float]:
        return [s.sent_s - max(s.scheduled_s, s.free_s) for s in self.requests if not math.isnan(s.sent_s)]

    def span_s(self) -> float:
        return max((s.scheduled_s for s in self.requests), default=0.0)

    def backlog(self) -> list[tuple[float, int]]:
        """(time, requests due and not yet answered) every BACKLOG_SAMPLE_S over the run."""
        due = sorted(s.scheduled_s for s in self.requests)
        done = sorted(s.answered_s if not math.isnan(s.answered_s) else math.inf for s in self.requests)
        samples = []
        t = 0.0
        while t <= self.wall_s + 1e-9:
            samples.append((round(t, 3), bisect.bisect_right(due, t) - bisect.bisect_right(done, t)))
            t += BACKLOG_SAMPLE_S
        return samples

    def verdict(self) -> tuple[bool | None, str]:
        """True: kept up; False: did not; None: this generator fell behind, the run cannot tell."""
        if not self.requests:
            return None, "no requests in the trace"
        lags = self.generator_lags()
        answered = len(self.answered())
        # The core the trace's rate needs at the CPU per request measured: past one core no
        # scheduler keeps up, however late this generator sent.
        needed = self.cpu_s / max(1, answered) * len(self.requests) / max(self.span_s(), 1e-9)
        if needed > 1.0:
            return False, (
                f"did not keep up: {len(self.requests) / max(self.span_s(), 1e-9):.0f} requests/s at "
                f"{self.cpu_s / max(1, answered) * 1000:.2f} ms CPU each need {needed:.0%} of one core"
            )
        if percentile(lags, 99) > GENERATOR_LAG_LIMIT_S:
            return None, (
                f"cannot tell: the load generator itself sent late (lag p99 {percentile(lags, 99) * 1000:.0f} ms)"
            )
        if self.errors():
            return False, f"did not keep up: {len(self.errors())} requests failed"
        latency = percentile(self.latencies(), 99)
        delay = percentile(self.delays(), 99)
        samples = self.backlog()
        span = self.span_s()
        middle = max((n for t, n in samples if t <= span / 2), default=0)
        end = max((n for t, n in samples if span / 2 < t <= span), default=0)
        reasons = []
        if latency > self.target_s:
            reasons.append(f"latency p99 {latency * 1000:.0f} ms > {self.target_s * 1000:.0f} ms")
        if delay > self.target_s:
            reasons.append(f"delay p99 {delay * 1000:.0f} ms > {self.target_s * 1000:.0f} ms")
        if end > max(middle, 1) * 2 and end > 10:
            reasons.append(f"backlog grew from {middle} (first half) to {end} (second half)")
        if reasons:
            return False, "did not keep up: " + "; ".join(reasons)
        return True, (
            f"kept up: latency p99 {latency * 1000:.1f} ms and delay p99 {delay * 1000:.1f} ms "
            f"<= {self.target_s * 1000:.0f} ms, backlog max {max((n for _, n in samples), default=0)}"
        )

    def summary(self) -> str:
        answered = self.answered()
        span = self.span_s()
        latency = self.latencies()
        delays = self.delays()
        lags = self.generator_lags()
        samples = self.backlog()
        lines = [
            f"replay of {self.trace.name}: {self.hosts} hosts, {len(self.requests)} requests over {span:.2f} s "
            f"({len(self.requests) / max(span, 1e-9):.0f}/s scheduled) after {self.setup_requests} announces",
            f"answered {len(answered)} in {self.wall_s:.2f} s ({len(answered) / max(self.wall_s, 1e-9):.0f}/s), "
            f"{len(self.errors())} errors",
            f"latency p50 {percentile(latency, 50) * 1000:.1f} ms, p99 {percentile(latency, 99) * 1000:.1f} ms, "
            f"max {max(latency, default=math.nan) * 1000:.1f} ms; delay behind schedule p50 "
            f"{percentile(delays, 50) * 1000:.1f} ms, p99 {percentile(delays, 99) * 1000:.1f} ms; "
            f"backlog max {max((n for _, n in samples), default=0)}; generator lag p99 "
            f"{percentile(lags, 99) * 1000:.1f} ms",
            f"scheduler CPU {self.cpu_s:.2f} s = {self.cpu_s / max(self.wall_s, 1e-9):.0%} of its core, "
            f"{self.cpu_s / max(1, len(answered)) * 1000:.3f} ms per request",
        ]
        kinds = Counter(s.record.kind for s in answered)
        for kind, count in sorted(kinds.items()):
            values = self.latencies(kind)
            lines.append(
                f"  {kind:8s} {count:7d} requests, latency p50 {percentile(values, 50) * 1000:.1f} ms, "
                f"p99 {percentile(values, 99) * 1000:.1f} ms"
            )
        for error in sorted(set(self.errors()))[:5]:
            lines.append(f"  error: {error}")
        kept, why = self.verdict()
        lines.append(f"verdict: {'KEPT UP' if kept else 'NOT KEPT UP' if kept is False else 'INCONCLUSIVE'} - {why}")
        return "\n".join(lines)


def _request_bytes(host: str, extra_headers: str, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\n{extra_headers}content-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _answer(buffered: bytearray) -> int | None:
    """The status of the whole answer at the start of `buffered`, taken out of it; None while
    it is not all there."""
    end = buffered.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffered[:end]).decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    if len(buffered) < end + 4 + length:
        return None
    del buffered[: end + 4 + length]
    return int(lines[0].split(" ", 2)[1])


def _drive(
    sockets: dict[str, socket.socket],
    per_host: dict[str, list[Sent]],
    requests: dict[str, list[bytes]],
    address: tuple[str, int],
) -> float:
    """Send every host's requests at their times, each once its host's previous one has been
    answered, from one epoll loop; fill in each Sent. Returns the wall time from the start."""
    poller = select.epoll()
    by_fd: dict[int, str] = {}
    buffered: dict[str, bytearray] = {}
    for host_id, sock in sockets.items():
        sock.setblocking(False)
        by_fd[sock.fileno()] = host_id
        buffered[host_id] = bytearray()
        poller.register(sock.fileno(), select.EPOLLIN)
    step = dict.fromkeys(per_host, 0)
    free = dict.fromkeys(per_host, 0.0)
    due = [(sents[0].scheduled_s, host_id) for host_id, sents in per_host.items() if sents]
    heapq.heapify(due)
    left = sum(len(sents) for sents in per_host.values())
    clock = time.perf_counter
    start = clock() + 0.05

    def send(host_id: str, now: float) -> None:
        sent = per_host[host_id][step[host_id]]
        sent.free_s, sent.sent_s = free[host_id], now
        data = memoryview(requests[host_id][step[host_id]])
        sock = sockets[host_id]
        try:
            while data:
                try:
                    data = data[os.write(sock.fileno(), data) :]
                except BlockingIOError:
                    select.select([], [sock], [], 1.0)
        except OSError as exc:
            fail(host_id, f"{type(exc).__name__}: {exc}", now)

    def answered(host_id: str, now: float) -> None:
        nonlocal left
        sent = per_host[host_id][step[host_id]]
        free[host_id] = sent.answered_s = now
        step[host_id] += 1
        left -= 1
        if step[host_id] < len(per_host[host_id]):
            following = per_host[host_id][step[host_id]]
            if following.scheduled_s <= now:
                send(host_id, now)
            else:
                heapq.heappush(due, (following.scheduled_s, host_id))

    def fail(host_id: str, why: str, now: float) -> None:
        # As a daemon would: a new connection for the host's next request.
        sent = per_host[host_id][step[host_id]]
        sent.error = f"{sent.record.kind}: {why}"
        old = sockets[host_id]
        poller.unregister(old.fileno())
        del by_fd[old.fileno()]
        old.close()
        sock = sockets[host_id] = socket.create_connection(address)
        sock.setblocking(False)
        by_fd[sock.fileno()] = host_id
        buffered[host_id].clear()
        poller.register(sock.fileno(), select.EPOLLIN)
        answered(host_id, now)

    try:
        while left:
            now = clock() - start
            while due and due[0][0] <= now:
                send(heapq.heappop(due)[1], now)
            wait = max(0.0, due[0][0] - now) if due else 0.05
            for fd, _ in poller.poll(min(wait, 0.05)):
                host_id = by_fd.get(fd)
                if host_id is None:
                    continue  # closed by fail() earlier in this batch
                now = clock() - start
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(host_id, f"{type(exc).__name__}: {exc}", now)
                    continue
                if not data:
                    fail(host_id, "ConnectionError: the scheduler closed the connection", now)
                    continue
                buffered[host_id] += data
                if (status := _answer(buffered[host_id])) is not None:
                    per_host[host_id][step[host_id]].status = status
                    answered(host_id, now)
        return clock() - start
    finally:
        poller.close()


class _HostConnection:
    """One host's kept-alive connection to the scheduler, as a daemon keeps one."""

    def __init__(self, host: str, port: int, extra_headers: str) -> None:
        self.host, self.port, self.extra = host, port, extra_headers
        self.stream: trio.SocketStream | None = None
        self.buffered = bytearray()

    async def post(self, path: str, body: bytes) -> int:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
        await self.stream.send_all(_request_bytes(self.host, self.extra, path, body))
        while (status := _answer(self.buffered)) is None:
            await self._more()
        return status

    async def _more(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the scheduler closed the connection")
        self.buffered += data

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def _seed_stub(request: Request) -> Response:
    """The simulated seed: accepts a wake-up (its progress comes from the trace)."""
    await request.body(limit=wire.MAX_BODY_BYTES)
    return Response(202, [("content-type", wire.CONTENT_TYPE)], wire.encode(wire.Empty()))


async def send_trace(
    scheduler_url: str, scheduler_pid: int, trace: Path, *, speed: float = 1.0, target_s: float = 0.100
) -> ReplayResult:
    """Announce the trace's hosts, then send its requests at their times; see the module doc."""
    _, records = read_trace(trace)
    parts = urlsplit(scheduler_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = f"content-type: {wire.CONTENT_TYPE}\r\n"
    setup = [r for r in records if r.kind == "announce" and r.time_s <= 0]
    timed = [r for r in records if not (r.kind == "announce" and r.time_s <= 0)]
    result = ReplayResult(trace=trace, hosts=len({r.host_id for r in records}), target_s=target_s)
    per_host: dict[str, list[Sent]] = defaultdict(list)
    for record in timed:
        sent = Sent(record, scheduled_s=record.time_s / speed)
        per_host[record.host_id].append(sent)
        result.requests.append(sent)
    connections = {h: _HostConnection(host, port, extra) for h in {r.host_id for r in records}}
    async with trio.open_nursery() as nursery:
        stub_host, stub_port = await nursery.start(
            lambda task_status: serve_http(_seed_stub, "127.0.0.1", 0, name="seed-stub", task_status=task_status)
        )
        limit = trio.CapacityLimiter(64)

        async def announce(record: TraceRecord) -> None:
            message = wire.decode(wire.AnnounceHost, record.body)
            if message.kind == "seed":
                message = wire.AnnounceHost(
                    host_id=message.host_id,
                    url=f"http://{stub_host}:{stub_port}",
                    kind="seed",
                    upload_slots=message.upload_slots,
                    tasks=message.tasks,
                    site=message.site,
                    location=message.location,
                )
            async with limit:
                status = await connections[record.host_id].post(record.path, wire.encode(message))
            if status != 200:
                raise RuntimeError(f"announce of {record.host_id} answered HTTP {status}")

        async with trio.open_nursery() as setup_nursery:
            for record in setup:
                setup_nursery.start_soon(announce, record)
        result.setup_requests = len(setup)

        # The timed part runs in one thread, one epoll loop over every host's connection (the
        # same kept-alive sockets the announces used): a trio task per host paid a timer, a
        # wake-up and two checkpoints per request, and could not send the 10,000 registers a
        # second of a 2,000-host trace on one core (lag p99 110-140 ms against a server that
        # answers at once). The seed stub stays on this loop.
        sockets = {}
        for host_id, connection in connections.items():
            if connection.stream is None:
                connection.stream = await trio.open_tcp_stream(host, port)
            sockets[host_id] = socket.socket(fileno=os.dup(connection.stream.socket.fileno()))
        requests = {
            host_id: [_request_bytes(host, extra, sent.record.path, sent.record.body) for sent in sents]
            for host_id, sents in per_host.items()
        }
        before = cpu_seconds(scheduler_pid)
        try:
            result.wall_s = await trio.to_thread.run_sync(_drive, sockets, per_host, requests, (host, port))
        finally:
            for sock in sockets.values():
                sock.close()
        result.cpu_s = cpu_seconds(scheduler_pid) - before
        for connection in connections.values():
            await connection.aclose()
        nursery.cancel_scope.cancel()
    return result


def pin_to_core(core: int) -> bool:
    """Run this process on one core when the machine has it; False if it cannot."""
    if not hasattr(os, "sched_setaffinity") or core not in os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(0, {core})
    return True


def replay(trace: Path, workdir: Path, *, speed: float = 1.0, target_s: float = 0.100) -> ReplayResult:
    """Start a scheduler on its own core (allowing the trace's registry, connections for every
    host), pin this process to the other core, and send the trace."""
    _, records = read_trace(trace)
    registries = sorted(
        {urlsplit(wire.decode(wire.Register, r.body).url).netloc for r in records if r.kind == "register"}
    )
    hosts = len({r.host_id for r in records})
    port = free_port()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    pinned = {SCHEDULER_CORE, GENERATOR_CORE} <= cores
    argv = [
        *(["taskset", "-c", str(SCHEDULER_CORE)] if pinned else []),
        str(p2pdist_executable()), "scheduler",
        "--listen", f"127.0.0.1:{port}",
        "--max-connections", str(hosts + 64),
        *[arg for registry in registries for arg in ("--allowed-registry", registry)],
    ]  # fmt: skip
    scheduler = Service("scheduler", argv, workdir / "scheduler.log", f"http://127.0.0.1:{port}")
    affinity = cores
    try:
        scheduler.wait_healthy(30)
        if pinned:
            pin_to_core(GENERATOR_CORE)
        return trio.run(lambda: send_trace(scheduler.url, scheduler.pid, trace, speed=speed, target_s=target_s))
    finally:
        if pinned:
            os.sched_setaffinity(0, affinity)
        scheduler.stop()

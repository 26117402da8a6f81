"""The scheduler service: the msgpack HTTP API (/v1/...) around the in-memory state machine.

It never carries blob bytes; it tells peers whom to fetch from and wakes seeds. With a
cluster secret, every API call must carry it (and the wake-up to a seed carries it too).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import operator
import time
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from p2pdist import wire
from p2pdist.cluster.liveness import LivenessResponder
from p2pdist.config import SchedulerConfig, parse_hostport
from p2pdist.errors import BadRequest, NotFound, UpstreamError
from p2pdist.memory import ShrinkWatch, release_freed_memory
from p2pdist.node.endpoints import health_response, metrics_response
from p2pdist.node.metrics import add_process_metrics
from p2pdist.registry.allowlist import check_seed_url
from p2pdist.transport.piececlient import PieceClient
from p2pdist.transport.server import Request, Response, serve_http, text_response
from p2pdist.transport.trust import (
    client_context,
    refuse_unauthorized,
    server_context,
)
from scheduler.admission import Admission
from scheduler.jobs import JobService
from scheduler.state import Scheduler, WakeSeed
from scheduler.status import STATUS_PATH, cluster_status

log = logging.getLogger("p2pdist.scheduler")
WAKE_TIMEOUT_S = 5.0
EXPIRE_INTERVAL_S = 1.0
# A gap this long between two looks at the clock (the expire loop looks every second) means
# the process did not run: see Scheduler.paused.
PAUSE_S = 2.5
# Wake-ups in flight at once: each takes a seed a few ms to accept, and a burst of tasks
# should queue here rather than open as many connections (and coroutines) at once.
WAKE_CONCURRENCY = 16
# Refused registrations are summed into one log line this often, not one line each.
REFUSALS_LOG_INTERVAL_S = 10.0
# Objects the garbage collector lets pile up before a young collection (CPython's default is
# 700). The scheduler keeps tens of thousands of records and each call leaves a dozen more
# (parents named, bitmaps, encoded forms kept for reuse): at the default a young collection
# ran every ~60 calls and two full ones walked the whole state during the 2,000-host replay's
# 20,196 calls fed in-process, 219-496 ms of collections; at 10,000, 87-120 ms and no full one.
# A young collection then takes ~3 ms instead of ~0.5.
GC_YOUNG_OBJECTS = 10_000


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("p2pdist_scheduler_requests", "API requests", ["endpoint", "status"], registry=r)
        self.decisions = Counter("p2pdist_scheduler_schedule_decisions", "Parent choices made", registry=r)
        self.seeds_woken = Counter("p2pdist_scheduler_seeds_woken", "Times a seed was told to fetch a task", registry=r)
        self.back_to_source = Counter(
            "p2pdist_scheduler_back_to_source", "Replies telling a peer to go to the origin", registry=r
        )
        self.bad_reports = Counter(
            "p2pdist_scheduler_bad_parent_reports", "Parents reported for bad pieces", registry=r
        )
        self.cycle_searches_refused = Counter(
            "p2pdist_scheduler_cycle_searches_refused",
            "Parents passed over because ruling out a cycle through them cost too much",
            registry=r,
        )
        self.children_shed = Counter(
            "p2pdist_scheduler_children_shed",
            "Child-to-parent links dropped so that a peer that fell behind could catch up",
            registry=r,
        )
        self.small_direct = Counter(
            "p2pdist_scheduler_small_blobs_direct",
            "Registrations of blobs under the small-blob threshold, sent straight to the origin",
            registry=r,
        )
        self.latency = Histogram(
            "p2pdist_scheduler_request_duration_seconds",
            "API request handling time",
            ["endpoint"],
            registry=r,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
        )
        self.hosts = Gauge("p2pdist_scheduler_hosts", "Hosts known", ["kind"], registry=r)
        self.site_hosts = Gauge(
            "p2pdist_scheduler_site_hosts",
            "Hosts known per site ('' for hosts in no site)",
            ["site", "kind"],
            registry=r,
        )
        self.tasks = Gauge("p2pdist_scheduler_tasks", "Tasks known", registry=r)
        self.peers = Gauge("p2pdist_scheduler_peers", "Peers (host, task pairs) known", registry=r)
        add_process_metrics(r, "scheduler")
        self.refused = Counter(
            "p2pdist_scheduler_registrations_refused",
            "Registrations refused: host_rate, waiting_cap (429), url (400), registry (403)",
            ["reason"],
            registry=r,
        )


_ENDPOINTS: dict[str, type[Any]] = {
    "/v1/hosts": wire.AnnounceHost,
    "/v1/hosts/leave": wire.LeaveHost,
    "/v1/tasks/register": wire.Register,
    "/v1/tasks/sync": wire.Sync,
    "/v1/tasks/seed": wire.SeedProgress,
    "/v1/tasks/leave": wire.Leave,
    "/v1/sites/members": wire.SiteMembersQuery,
}
# Site members named per answer: enough to find a holder while the scheduler cannot be reached.
SITE_MEMBERS_NAMED = 64


class SchedulerService:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.state = Scheduler(config, started_at=trio.current_time())
        self.admission = Admission(config)
        self._refusals_logged: collections.Counter[str] = collections.Counter()
        self._refusals_counted: collections.Counter[str] = collections.Counter()
        self.metrics = Metrics()
        self._wake_send: trio.MemorySendChannel[WakeSeed]
        self._wake_recv: trio.MemoryReceiveChannel[WakeSeed]
        self._wake_send, self._wake_recv = trio.open_memory_channel(1000)
        # Counters.<field> -> its metric; _count reads the fields in this order.
        m = self.metrics
        counted = {
            "decisions": m.decisions,
            "seeds_woken": m.seeds_woken,
            "back_to_source": m.back_to_source,
            "bad_reports": m.bad_reports,
            "cycle_searches_refused": m.cycle_searches_refused,
            "children_shed": m.children_shed,
            "small_direct": m.small_direct,
        }
        self._read_counters = operator.attrgetter(*counted)
        self._counted_into = tuple(counted.values())
        self._counted: tuple[int, ...] = (0,) * len(counted)
        self.jobs = JobService(config, self.state)
        self._last_tick = trio.current_time()
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.liveness: LivenessResponder | None = None  # set once the API port is bound

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            return health_response()
        if request.path == "/metrics" and request.method in ("GET", "HEAD"):
            self._refresh_gauges()
            return metrics_response(self.metrics.registry)
        # The preheat job API checks its own token (the cluster secret or the preheat token).
        if (response := await self.jobs.handle(request)) is not None:
            return response
        if (refused := self._refuse_unauthorized(request)) is not None:
            return refused
        if request.path == STATUS_PATH:
            if request.method not in ("GET", "HEAD"):
                return text_response(405, f"{STATUS_PATH} is read-only: use GET", [("allow", "GET, HEAD")])
            body = json.dumps(cluster_status(self.state, trio.current_time())).encode()
            return Response(200, [("content-type", "application/json")], body)
        cls = _ENDPOINTS.get(request.path)
        if cls is None:
            raise NotFound(f"no such endpoint {request.path[:100]}")
        if request.method != "POST":
            return text_response(405, f"{request.path} takes POST", [("allow", "POST")])
        return self._call(request, cls, await request.body(limit=wire.MAX_BODY_BYTES))

    def answer_now(self, request: Request) -> Response | None:
        """handle() for an API call whose body came with its head (the lean lane's), with the
        same checks and answers but no coroutine: the HTTP server's quick handler. None for
        anything else (handle() takes it)."""
        cls = _ENDPOINTS.get(request.path)
        if cls is None or request.method != "POST":
            return None
        if (refused := self._refuse_unauthorized(request)) is not None:
            return refused
        body = request.body_now(limit=wire.MAX_BODY_BYTES)
        if body is None:
            return None
        return self._call(request, cls, body)

    def _refuse_unauthorized(self, request: Request) -> Response | None:
        refused = refuse_unauthorized(request, self.config.cluster_secret)
        if refused is not None:
            self.metrics.requests.labels("unauthorized", str(refused.status)).inc()
        return refused

    def _call(self, request: Request, cls: type[Any], body: bytes) -> Response:
        """Decode an API call, act on it, encode the reply."""
        started = time.perf_counter()
        status = 200
        try:
            message = wire.decode(cls, body)
            reply = self._dispatch(message, address=request.client[0])
        except Exception as exc:
            # The status the server answers for it: the error's own, else a 500.
            status = getattr(exc, "status", 500)
            raise
        finally:
            self._observe(request.path, status, time.perf_counter() - started)
        self._count()
        return Response(200, [("content-type", wire.CONTENT_TYPE)], wire.encode(reply))

    def _observe(self, path: str, status: int, seconds: float) -> None:
        """Count one API request and its handling time. The labelled children are looked up
        once per (path, status): prometheus_client's labels() per request cost more than the
        counting (paths here are the few API endpoints, so the cache stays that small)."""
        key = (path, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.metrics.requests.labels(path, str(status)),
                self.metrics.latency.labels(path),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _tick(self, now: float) -> None:
        if self.liveness is not None:
            self.liveness.beat()  # the loop runs: the probe's thread may say so
        gap = now - self._last_tick
        if gap > PAUSE_S:
            self.state.paused(gap - EXPIRE_INTERVAL_S)
        self._last_tick = max(self._last_tick, now)

    def _dispatch(self, message: object, address: str = "") -> object:
        now = trio.current_time()
        self._tick(now)
        state = self.state
        wake: WakeSeed | None = None
        reply: object = wire.Empty()
        if isinstance(message, wire.AnnounceHost):
            state.announce(self._sane_urls(message), now)
        elif isinstance(message, wire.Register):
            self.admission.admit(
                message,
                now,
                new_task=message.task_id not in state.tasks,
                known_host=message.host_id in state.hosts,
                address=address,
            )
            reply, wake = state.register(message, now)
        elif isinstance(message, wire.Sync):
            reply, wake = state.sync(message, now)
        elif isinstance(message, wire.SeedProgress):
            state.seed_progress(message, now)
        elif isinstance(message, wire.Leave):
            state.leave(message, now)
        elif isinstance(message, wire.LeaveHost):
            state.leave_host(message.host_id, now)
        elif isinstance(message, wire.SiteMembersQuery):
            reply = wire.SiteMembers(urls=state.members_of_site(message.host_id, SITE_MEMBERS_NAMED))
        if wake is not None:
            try:
                self._wake_send.send_nowait(wake)
            except trio.WouldBlock:
                log.warning("seed wake-up queue full; %s will be retried", wake.trigger.task_id)
        return reply

    def _sane_urls(self, message: wire.AnnounceHost) -> wire.AnnounceHost:
        """Drop announced task URLs a seed could not be asked to fetch (the holdings stay): a
        task first learnt from an announce takes its URL from it."""
        holdings = []
        for holding in message.tasks:
            if holding.url:
                try:
                    check_seed_url(holding.url, holding.task_id, self.config.allowed_registries)
                except BadRequest:
                    holding = dataclasses.replace(holding, url="")
            holdings.append(holding)
        return dataclasses.replace(message, tasks=holdings)

    def _count(self) -> None:
        now = self._read_counters(self.state.counters)
        before = self._counted
        if now == before:
            return
        # Only the counters that moved: an inc() takes a lock even to add nothing.
        for metric, new, old in zip(self._counted_into, now, before, strict=True):
            if new != old:
                metric.inc(new - old)
        self._counted = now

    def _refresh_gauges(self) -> None:
        for kind in wire.HOST_KINDS:
            self.metrics.hosts.labels(kind).set(sum(1 for h in self.state.hosts.values() if h.kind == kind))
        per_site = collections.Counter((h.site, h.kind) for h in self.state.hosts.values())
        self.metrics.site_hosts.clear()  # a site whose hosts all left is no longer shown
        for (site, kind), count in per_site.items():
            self.metrics.site_hosts.labels(site, kind).set(count)
        self.metrics.tasks.set(len(self.state.tasks))
        self.metrics.peers.set(sum(len(t.peers) for t in self.state.tasks.values()))
        for reason, count in (self.admission.refused - self._refusals_counted).items():
            self.metrics.refused.labels(reason).inc(count)
        self._refusals_counted = self.admission.refused.copy()

    async def wake_seeds(self) -> None:
        client = PieceClient(
            connect_timeout_s=WAKE_TIMEOUT_S,
            secret=self.config.cluster_secret,
            ssl_context=client_context(self.config.tls_ca),
        )
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(WAKE_CONCURRENCY):
                    nursery.start_soon(self._wake_worker, client)
        finally:
            await client.aclose()

    async def _wake_worker(self, client: PieceClient) -> None:
        async for wake in self._wake_recv:
            await self._wake_one(client, wake)

    async def _wake_one(self, client: PieceClient, wake: WakeSeed) -> None:
        try:
            with trio.fail_after(WAKE_TIMEOUT_S):
                async with client.request(
                    "POST",
                    f"{wake.seed_url}/v1/seed/tasks",
                    {"content-type": wire.CONTENT_TYPE},
                    wire.encode(wake.trigger),
                ) as response:
                    text = (await response.read()).decode("utf-8", "replace") if response.length <= 4096 else ""
            if response.status >= 300:
                raise UpstreamError(f"HTTP {response.status}: {text.strip()[:200]}")
        except (UpstreamError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                reason = f"no answer in {WAKE_TIMEOUT_S:g}s"
            else:
                reason = str(exc) or type(exc).__name__
            log.warning("could not wake seed %s for %s: %s", wake.seed_id, wake.trigger.task_id[:19], reason)
            self.state.seed_wake_failed(wake.trigger.task_id, wake.seed_id, trio.current_time())

    async def expire_loop(self) -> None:
        logged_at = trio.current_time()
        tasks = ShrinkWatch()
        while True:
            await trio.sleep(EXPIRE_INTERVAL_S)
            now = trio.current_time()
            self._tick(now)
            self.state.expire(now)
            self.admission.sweep(now, sum(1 for t in self.state.tasks.values() if not t.holders))
            if tasks.shrunk(len(self.state.tasks)):
                # Most tasks went (a flood of bogus registrations expiring): hand the freed
                # heap back to the OS, or the scheduler's RSS keeps its peak for good.
                release_freed_memory()
            if now - logged_at >= REFUSALS_LOG_INTERVAL_S:
                logged_at = now
                self._log_refusals()

    def _log_refusals(self) -> None:
        new = self.admission.refused - self._refusals_logged
        if new:
            log.warning(
                "refused %d registration(s) in the last %.0fs: %s",
                sum(new.values()),
                REFUSALS_LOG_INTERVAL_S,
                ", ".join(f"{n} {reason}" for reason, n in sorted(new.items())),
            )
            self._refusals_logged = self.admission.refused.copy()


async def serve(config: SchedulerConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    thresholds = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_OBJECTS, thresholds[0]), *thresholds[1:])
    try:
        await _serve(config, task_status=task_status)
    finally:
        gc.set_threshold(*thresholds)  # a test process runs other things after this service


async def _serve(config: SchedulerConfig, *, task_status: trio.TaskStatus[Any]) -> None:
    service = SchedulerService(config)
    host, port = parse_hostport(config.listen)
    tls = server_context(config.tls_cert, config.tls_key)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_http(
                service.handle,
                host,
                port,
                name="scheduler",
                ssl_context=tls,
                head_timeout_s=config.head_timeout_s,
                max_connections=config.max_connections,
                lean=True,
                quick_handler=service.answer_now,
                lane=True,
                task_status=task_status,
            )
        )
        # Busy or frozen (p2pdist/cluster/liveness.py): probes answered on UDP at the API port.
        service.liveness = LivenessResponder(host, bound[1])
        service.liveness.start()
        try:
            nursery.start_soon(service.wake_seeds)
            nursery.start_soon(service.expire_loop)
            nursery.start_soon(service.jobs.run)
            log.info("scheduler listening on %s://%s:%d (liveness probe on udp)", "https" if tls else "http", *bound)
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            service.liveness.close()

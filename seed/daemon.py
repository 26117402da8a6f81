"""The seed peer: fetches a blob from the origin once, when the scheduler asks, and serves it.

Each blob being fetched is a SeedFetch (seed/fetch.py); this module is the daemon around them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from p2pdist import wire
from p2pdist.config import SeedConfig, parse_hostport
from p2pdist.content.digest import short
from p2pdist.errors import NotFound, P2PError, UpstreamError
from p2pdist.node.endpoints import health_response, metrics_response
from p2pdist.node.metrics import DaemonMetrics
from p2pdist.node.pieceserver import PieceServer
from p2pdist.registry.client import OriginClient
from p2pdist.storage.quota import CacheQuota, pin_piece_response
from p2pdist.storage.store import open_host
from p2pdist.transport.ratelimit import maybe_bucket
from p2pdist.transport.schedclient import SchedulerClient
from p2pdist.transport.server import Request, Response, serve_http, text_response
from p2pdist.transport.trust import client_context, refuse_unauthorized, server_context
from seed.fetch import SeedFetch

log = logging.getLogger("p2pdist.seed")

ANNOUNCE_INTERVAL_S = 3.0


class SeedDaemon:
    kind = "seed"

    def __init__(self, config: SeedConfig) -> None:
        self.config = config
        self.store, self.host_id = open_host(Path(config.data_dir), self.kind)
        self.metrics = DaemonMetrics(self.kind)
        self.scheduler = SchedulerClient(config.scheduler, secret=config.cluster_secret,
                                         verify=client_context(config.tls_ca))
        self.origin = OriginClient(rate=maybe_bucket(config.origin_rate_bps), timeout_s=config.origin_timeout_s)
        self.upload_bucket = maybe_bucket(config.upload_rate_bps)
        self.pieces = PieceServer(self.store, self.metrics, config.effective_upload_slots(), secret=config.cluster_secret)
        self.fetches: dict[str, SeedFetch] = {}
        self.cache = CacheQuota(self.store, config.cache_quota_bytes, config.cache_high_watermark,
                                config.cache_low_watermark, busy=self._fetching,
                                registry=self.metrics.registry, role=self.kind)
        self.advertise = config.advertise or ""
        self._nursery: trio.Nursery | None = None
        self._last_announce_error = ""

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return health_response()
        if request.path == "/metrics":
            return metrics_response(self.metrics.registry)
        if request.path == "/v1/seed/tasks":
            if (refused := refuse_unauthorized(request, self.config.cluster_secret)) is not None:
                return refused
            if request.method != "POST":
                return text_response(405, "/v1/seed/tasks takes POST", [("allow", "POST")])
            trigger = wire.decode(wire.SeedTrigger, await request.body(limit=wire.MAX_BODY_BYTES))
            self.start(trigger)
            return Response(202, [("content-type", wire.CONTENT_TYPE)], wire.encode(wire.Empty()))
        if self.pieces.match(request):
            return pin_piece_response(self.store, request, await self.pieces.handle(request))
        raise NotFound(f"no such endpoint {request.path[:100]}")

    def start(self, trigger: wire.SeedTrigger) -> None:
        current = self.fetches.get(trigger.task_id)
        if current is not None and not current.error:
            if current.done:
                current.reported = 0  # a restarted scheduler may have forgotten it
                assert self._nursery is not None
                self._nursery.start_soon(current.report_loop)
            return
        fetch = SeedFetch(self, trigger)
        held = self.store.get(trigger.task_id)
        if held is not None and held.complete():
            fetch.store = held
            fetch.digests = held.load_digests()
            fetch.done = True
        else:
            log.info("seeding %s from %s", short(trigger.task_id), trigger.url.split("/v2/")[0])
        self.fetches[trigger.task_id] = fetch
        assert self._nursery is not None
        if not fetch.done:
            self._nursery.start_soon(fetch.run)
        self._nursery.start_soon(fetch.report_loop)

    def holdings(self) -> list[wire.TaskHolding]:
        out = []
        for t in self.store.tasks.values():
            fetch = self.fetches.get(t.task_id)
            digests = fetch.digests if fetch is not None else t.load_digests()
            if len(t.pieces):
                out.append(wire.TaskHolding(task_id=t.task_id, content_length=t.layout.blob_size,
                                            pieces=t.pieces.to_bytes(), url=t.url, piece_digests=list(digests)))
        return out

    def _fetching(self, task_id: str) -> bool:
        fetch = self.fetches.get(task_id)
        return fetch is not None and not fetch.done

    async def enforce_quota(self) -> None:
        """Evict least recently used blobs past the high watermark, and tell the scheduler."""
        for task_id in self.cache.enforce():
            self.fetches.pop(task_id, None)
            try:
                await self.scheduler.call("/v1/tasks/leave", wire.Leave(host_id=self.host_id, task_id=task_id),
                                          wire.Empty)
            except (UpstreamError, P2PError) as exc:
                log.debug("leave for an evicted task not sent: %s", exc)

    async def announce_loop(self) -> None:
        while True:
            await self.enforce_quota()
            try:
                await self.scheduler.call("/v1/hosts", wire.AnnounceHost(
                    host_id=self.host_id, url=self.advertise, kind=self.kind,
                    upload_slots=self.config.effective_upload_slots(), tasks=self.holdings()), wire.Empty)
            except (UpstreamError, P2PError) as exc:
                # Once at warning (a wrong cluster secret shows up here), then at debug.
                said = str(exc) == self._last_announce_error
                (log.debug if said else log.warning)("announce to the scheduler failed: %s", exc)
                self._last_announce_error = str(exc)
            else:
                self._last_announce_error = ""
            await trio.sleep(self.config.announce_interval_s)

    def count_upload(self, n: int) -> None:
        self.metrics.upload_bytes.inc(n)


async def serve(config: SeedConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    tls = server_context(config.tls_cert, config.tls_key)
    seed = SeedDaemon(config)
    host, port = parse_hostport(config.listen)
    try:
        async with trio.open_nursery() as nursery:
            seed._nursery = nursery
            bound = await nursery.start(lambda task_status: serve_http(
                seed.handle, host, port, name="seed", upload_bucket=seed.upload_bucket,
                on_bytes_sent=seed.count_upload, ssl_context=tls, task_status=task_status))
            if not seed.advertise:
                seed.advertise = f"{'https' if tls else 'http'}://{bound[0]}:{bound[1]}"
            nursery.start_soon(seed.announce_loop)
            log.info("seed %s serving pieces on %s", seed.host_id, seed.advertise)
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            await seed.scheduler.say_goodbye(seed.host_id)
            await seed.scheduler.aclose()
            await seed.origin.aclose()

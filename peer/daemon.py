"""The peer daemon: piece server for other peers, proxy for local clients, and its downloads.

`serve(config)` runs both HTTP servers, the announce loop that keeps the scheduler told what
this host holds, and one TaskDownload per blob being fetched.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import trio

from p2pdist import wire
from p2pdist.config import PeerConfig, parse_hostport
from p2pdist.content.digest import parse_digest
from p2pdist.errors import NotFound, P2PError, UpstreamError
from p2pdist.node.endpoints import health_response, metrics_response
from p2pdist.node.metrics import DaemonMetrics
from p2pdist.node.pieceserver import PieceServer
from p2pdist.registry.client import OriginClient
from p2pdist.storage.quota import CacheQuota, pin_piece_response
from p2pdist.storage.store import open_host
from p2pdist.transport.piececlient import PieceClient
from p2pdist.transport.ratelimit import maybe_bucket
from p2pdist.transport.schedclient import SchedulerClient
from p2pdist.transport.server import Request, Response, serve_http
from p2pdist.transport.trust import client_context, server_context
from peer.download import TaskDownload

log = logging.getLogger("p2pdist.peer")

ANNOUNCE_INTERVAL_S = 3.0


class PeerDaemon:
    kind = "peer"

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.store, self.host_id = open_host(Path(config.data_dir), self.kind)
        self.metrics = DaemonMetrics(self.kind)
        tls_client = client_context(config.tls_ca)
        self.scheduler: SchedulerClient | None = SchedulerClient(
            config.scheduler, timeout_s=config.scheduler_timeout_s, secret=config.cluster_secret, verify=tls_client)
        self.origin = OriginClient(rate=maybe_bucket(config.download_rate_bps))
        self.download_bucket = maybe_bucket(config.download_rate_bps)
        self.upload_bucket = maybe_bucket(config.upload_rate_bps)
        self.piece_client = PieceClient(secret=config.cluster_secret, ssl_context=tls_client)
        self.pieces = PieceServer(self.store, self.metrics, config.effective_upload_slots(), secret=config.cluster_secret)
        self.downloads: dict[str, TaskDownload] = {}
        self.cache = CacheQuota(self.store, config.cache_quota_bytes, config.cache_high_watermark,
                                config.cache_low_watermark, busy=self._downloading,
                                registry=self.metrics.registry, role=self.kind)
        self.advertise = config.advertise or ""
        self._nursery: trio.Nursery | None = None
        self._last_announce_error = ""
        self._avoided: dict[str, float] = {}
        # The origin's own bucket already caps back-to-source bytes; don't take them twice.
        self.origin.bucket = None

    def avoid(self, host_id: str) -> None:
        self._avoided[host_id] = time.monotonic()

    # -- downloads ------------------------------------------------------------------------

    def download(self, task_id: str, url: str, headers: dict[str, str]) -> TaskDownload:
        """The running or finished download of a task, started if needed."""
        parse_digest(task_id)
        current = self.downloads.get(task_id)
        if current is not None and current.error is None:
            return current
        held = self.store.get(task_id)
        dl = TaskDownload(self, task_id, url, dict(headers))
        if held is not None and held.complete():
            dl.store = held
            dl.verified = True
            dl.finished.set()
            self.downloads[task_id] = dl
            return dl
        self.downloads[task_id] = dl
        assert self._nursery is not None, "daemon not started"
        self._nursery.start_soon(self._run_download, dl)
        return dl

    async def _run_download(self, dl: TaskDownload) -> None:
        await dl.run()
        if dl.error is not None and self.downloads.get(dl.task_id) is dl:
            # Keep the failure visible to readers already waiting, but let the next request retry.
            del self.downloads[dl.task_id]
        await self.enforce_quota()

    def _downloading(self, task_id: str) -> bool:
        dl = self.downloads.get(task_id)
        return dl is not None and not dl.finished.is_set()

    async def enforce_quota(self) -> None:
        """Evict least recently used blobs past the high watermark, and tell the scheduler."""
        for task_id in self.cache.enforce():
            self.downloads.pop(task_id, None)
            if self.scheduler is not None:
                try:
                    await self.scheduler.call("/v1/tasks/leave", wire.Leave(host_id=self.host_id, task_id=task_id),
                                              wire.Empty)
                except (UpstreamError, P2PError) as exc:
                    log.debug("leave for an evicted task not sent: %s", exc)  # children stop at its 404s

    # -- the scheduler --------------------------------------------------------------------

    def holdings(self) -> list[wire.TaskHolding]:
        return [wire.TaskHolding(task_id=t.task_id, content_length=t.layout.blob_size, pieces=t.pieces.to_bytes(), url=t.url)
                for t in self.store.tasks.values() if len(t.pieces)]

    async def announce_loop(self) -> None:
        assert self.scheduler is not None
        while True:
            await self.enforce_quota()
            try:
                await self.scheduler.call("/v1/hosts", wire.AnnounceHost(
                    host_id=self.host_id, url=self.advertise, kind=self.kind,
                    upload_slots=self.config.effective_upload_slots(), tasks=self.holdings()), wire.Empty)
            except (UpstreamError, P2PError) as exc:
                self.metrics.scheduler_errors.inc()
                # Once at warning (a wrong cluster secret shows up here), then at debug.
                said = str(exc) == self._last_announce_error
                (log.debug if said else log.warning)("announce to the scheduler failed: %s", exc)
                self._last_announce_error = str(exc)
            else:
                self._last_announce_error = ""
            await trio.sleep(ANNOUNCE_INTERVAL_S)

    # -- HTTP -----------------------------------------------------------------------------

    async def handle_peer(self, request: Request) -> Response:
        if request.path == "/healthz":
            return health_response()
        if request.path == "/metrics":
            return metrics_response(self.metrics.registry)
        if self.pieces.match(request):
            return pin_piece_response(self.store, request, await self.pieces.handle(request))
        raise NotFound(f"no such endpoint {request.path[:100]}")

    def count_upload(self, n: int) -> None:
        self.metrics.upload_bytes.inc(n)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self.scheduler is not None:
                await self.scheduler.say_goodbye(self.host_id)
                await self.scheduler.aclose()
            await self.origin.aclose()
            await self.piece_client.aclose()


async def serve(config: PeerConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    from peer.proxy import Proxy

    tls = server_context(config.tls_cert, config.tls_key)
    daemon = PeerDaemon(config)
    proxy = Proxy(daemon)
    host, port = parse_hostport(config.listen)
    proxy_host, proxy_port = parse_hostport(config.proxy_listen)
    try:
        async with trio.open_nursery() as nursery:
            daemon._nursery = nursery
            bound = await nursery.start(lambda task_status: serve_http(
                daemon.handle_peer, host, port, name="peer", upload_bucket=daemon.upload_bucket,
                on_bytes_sent=daemon.count_upload, ssl_context=tls, task_status=task_status))
            if not daemon.advertise:
                daemon.advertise = f"{'https' if tls else 'http'}://{bound[0]}:{bound[1]}"
            proxy_bound = await nursery.start(lambda task_status: serve_http(
                proxy.handle, proxy_host, proxy_port, name="proxy", request_timeout_s=3600.0,
                task_status=task_status))
            nursery.start_soon(daemon.announce_loop)
            log.info("peer %s: pieces on %s, proxy on http://%s:%d", daemon.host_id, daemon.advertise, *proxy_bound)
            task_status.started((bound, proxy_bound))
    finally:
        with trio.CancelScope(shield=True):
            await proxy.aclose()
        await daemon.aclose()

"""The node every host runs: its piece store and host id, metrics, the scheduler client, the
cache quota, the announce loop and the piece server. A peer and a seed are roles of it.

A role subclasses Node, as Dragonfly's seed is its peer daemon in seed mode: code around a
role (a peer's downloads and proxy, a seed's fetches) reads the node's parts straight off it
(`daemon.store`, `seed.scheduler`, `seed.enforce_quota()`), so one object keeps one set of
names rather than forwarding them, and a role differs only in the hooks below it overrides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import trio

from p2pdist import wire
from p2pdist.config import NodeConfig, parse_hostport
from p2pdist.content.pieces import piece_size_sent
from p2pdist.errors import NotFound, P2PError, StartupError, StoreError, UpstreamError
from p2pdist.node.endpoints import open_endpoint
from p2pdist.node.metrics import DaemonMetrics
from p2pdist.node.pieceserver import PieceServer
from p2pdist.node.preheat import held_status, preheat_route
from p2pdist.node.status import STATUS_PATH, node_status
from p2pdist.registry.client import OriginClient
from p2pdist.storage.quota import CacheQuota, pin_piece_response
from p2pdist.storage.store import TaskStore, open_host
from p2pdist.transport.drain import current as current_drain
from p2pdist.transport.ratelimit import maybe_bucket
from p2pdist.transport.schedclient import SchedulerPool
from p2pdist.transport.server import Request, Response, serve_http, text_response
from p2pdist.transport.trust import client_context, refuse_unauthorized, server_context

ConfigT = TypeVar("ConfigT", bound=NodeConfig)


class Node(Generic[ConfigT]):
    """One host of the data plane. `serve()` runs it until cancelled.

    Hooks a role overrides: `busy` (a task the quota must keep), `forget` (a task the quota
    removed), `piece_digests` (announced with a task), `route` (the role's own endpoints),
    `preheat` and `preheat_status` (holding a blob for a preheat job), `start_role` (what runs
    beside the piece server) and `aclose`.
    """

    kind: ClassVar[wire.HostKind]  # each role sets it: in metric names, logs and announces

    def __init__(self, config: ConfigT, *, origin: OriginClient, scheduler_timeout_s: float = 3.0) -> None:
        self.config = config
        self.log = logging.getLogger(f"p2pdist.{self.kind}")
        try:
            self.store, self.host_id = open_host(Path(config.data_dir), self.kind)
        except (StoreError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StartupError(f"--data-dir (data_dir) {config.data_dir} is unusable: {reason}") from None
        self.metrics = DaemonMetrics(self.kind)
        self.tls_client = client_context(config.tls_ca)
        self.scheduler = SchedulerPool(
            config.scheduler,
            timeout_s=scheduler_timeout_s,
            backoff_s=config.scheduler_backoff_s,
            patience_s=config.scheduler_patience_s,
            secret=config.cluster_secret,
            verify=self.tls_client,
            on_wait=lambda outcome: self.metrics.scheduler_probes.labels(outcome).inc(),
        )
        # A scheduler that is new or answers again hears what this host holds at once: it may
        # own tasks now whose holders it would otherwise learn only at the next announce.
        self.scheduler.on_up = self._announce_soon
        self.origin = origin
        self.upload_bucket = maybe_bucket(config.upload_rate_bps)
        self.metrics.upload_slots.set(config.effective_upload_slots())
        self.pieces = PieceServer(
            self.store,
            self.metrics,
            config.effective_upload_slots(),
            secret=config.cluster_secret,
            kind=self.kind,
            digests=self.piece_digests,
        )
        self.cache = CacheQuota(
            self.store,
            config.cache_quota_bytes,
            config.cache_high_watermark,
            config.cache_low_watermark,
            busy=self.busy,
            registry=self.metrics.registry,
            role=self.kind,
        )
        self.advertise = config.advertise or ""  # with port 0, known once bound
        self._nursery: trio.Nursery | None = None
        self._leaving = False  # draining: announce no more
        self._last_announce_error: dict[str, str] = {}  # scheduler -> its last announce failure
        self._announcing: set[str] = set()  # schedulers with an announce in flight

    # -- hooks ----------------------------------------------------------------------------

    def busy(self, task_id: str) -> bool:
        """Whether the role is still writing this task (the quota leaves it alone)."""
        return False

    def forget(self, task_id: str) -> None:
        """The quota removed this task from the store."""

    def back_to_source_log(self) -> list[dict[str, Any]]:
        """Recent downloads that went to the origin themselves, and why (for status)."""
        return []

    def piece_digests(self, task: TaskStore) -> list[bytes]:
        """The digests announced with a task: only a seed's are trusted, so none by default."""
        return []

    async def route(self, request: Request) -> Response | None:
        """The role's own endpoints; None for a path it does not serve."""
        return None

    def preheat(self, message: wire.PreheatBlob) -> None:
        """A preheat job asks this node to hold a blob: start fetching it (the role's way)."""
        raise NotFound(f"a {self.kind} does not preheat")

    def preheat_status(self, task_id: str) -> wire.PreheatStatus:
        """How far this node is with a blob a preheat job asked it to hold."""
        return held_status(task_id, self.store.get(task_id))

    async def start_role(self, nursery: trio.Nursery, bound: tuple[str, int]) -> Any:
        """Start what the role runs beside the piece server; return what `serve` reports."""
        return bound

    async def aclose(self) -> None:
        """Say goodbye to the scheduler and close the clients (the caller shields this)."""
        await self.scheduler.say_goodbye(self.host_id)
        await self.scheduler.aclose()
        await self.origin.aclose()

    # -- running --------------------------------------------------------------------------

    def spawn(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a task in the node's nursery (the node must be serving)."""
        assert self._nursery is not None, f"{self.kind} not started"
        self._nursery.start_soon(async_fn, *args)

    async def serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the piece server, start the role and the announce loop, report what is bound
        (the piece server's (host, port), or what `start_role` returns) and run until cancelled."""
        tls = server_context(self.config.tls_cert, self.config.tls_key)
        host, port = parse_hostport(self.config.listen)
        try:
            await self.scheduler.resolve()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.scheduler.resolve_loop, self.config.scheduler_dns_interval_s)
                bound = await nursery.start(
                    partial(
                        serve_http,
                        self.handle,
                        host,
                        port,
                        name=self.kind,
                        upload_bucket=self.upload_bucket,
                        on_bytes_sent=self.count_upload,
                        ssl_context=tls,
                        head_timeout_s=self.config.head_timeout_s,
                        max_connections=self.config.max_connections,
                        # Piece requests, busy answers and news polls are many small
                        # exchanges: plain ones skip h11 (anything odd still goes to it).
                        lean=True,
                        quick_handler=self.answer_now,
                    )
                )
                if not self.advertise:
                    self.advertise = f"{'https' if tls else 'http'}://{bound[0]}:{bound[1]}"
                self.log.info(
                    "%s %s: pieces on %s%s",
                    self.kind,
                    self.host_id,
                    self.advertise,
                    f", site {self.config.site or '(none)'} at {self.config.location or '(no location)'}"
                    if self.config.site or self.config.location
                    else "",
                )
                report = await self.start_role(nursery, bound)
                if (drain := current_drain()) is not None:
                    drain.on_drain(self.leave_cluster)
                nursery.start_soon(self.announce_loop)
                task_status.started(report)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    # -- HTTP -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The piece server's port: health, metrics, the role's endpoints, then pieces."""
        if (response := open_endpoint(request, self.metrics.registry)) is not None:
            return response
        if request.path == STATUS_PATH:
            if (refused := refuse_unauthorized(request, self.config.cluster_secret)) is not None:
                return refused
            if request.method not in ("GET", "HEAD"):
                return text_response(405, f"{STATUS_PATH} is read-only: use GET", [("allow", "GET, HEAD")])
            return Response(200, [("content-type", "application/json")], json.dumps(node_status(self)).encode())
        if (response := await self.route(request)) is not None:
            return response
        if (response := await preheat_route(self, request)) is not None:
            return response
        if self.pieces.match(request):
            return pin_piece_response(self.store, request, await self.pieces.handle(request))
        raise NotFound(f"no such endpoint {request.path[:100]}")

    def answer_now(self, request: Request) -> Response | None:
        """handle() for a piece request that needs no wait (PieceServer.answer_now), without a
        coroutine; None for everything else, which handle() takes."""
        response = self.pieces.answer_now(request)
        return None if response is None else pin_piece_response(self.store, request, response)

    def count_upload(self, n: int) -> None:
        self.metrics.upload_bytes.inc(n)

    # -- the scheduler --------------------------------------------------------------------

    def holdings(self) -> list[wire.TaskHolding]:
        """Every task with a verified piece, as announced (a restarted scheduler rebuilds from it)."""
        return [
            wire.TaskHolding(
                task_id=t.task_id,
                content_length=t.layout.blob_size,
                pieces=t.pieces.to_bytes(),
                url=t.url,
                piece_digests=self.piece_digests(t),
                piece_size=piece_size_sent(t.layout.blob_size, t.layout.piece_size),
            )
            for t in self.store.tasks.values()
            if len(t.pieces)
        ]

    async def enforce_quota(self) -> None:
        """Evict least recently used blobs past the high watermark, and tell the scheduler."""
        for task_id in self.cache.enforce():
            self.forget(task_id)
            await self.leave(task_id)

    async def leave(self, task_id: str) -> None:
        """Tell the schedulers this host no longer holds any of `task_id` (evicted, or dropped
        because the blob failed its check), so it is no one's parent for it any more. Every
        scheduler learnt the holding from announces, so every one hears of the leave."""
        # A scheduler that misses it: children stop at this host's 404s.
        await self.scheduler.call_all("/v1/tasks/leave", wire.Leave(host_id=self.host_id, task_id=task_id), wire.Empty)

    def _announce_message(self) -> wire.AnnounceHost:
        return wire.AnnounceHost(
            host_id=self.host_id,
            url=self.advertise,
            kind=self.kind,
            upload_slots=self.config.effective_upload_slots(),
            tasks=self.holdings(),
            site=self.config.site,
            location=self.config.location,
            upload_rate_bps=self.config.upload_rate_bps,
        )

    async def announce(self) -> None:
        """Tell every scheduler this host is alive and what it holds, each on its own."""
        async with trio.open_nursery() as nursery:
            for url in self.scheduler.members:
                nursery.start_soon(self.announce_to, url)

    async def announce_to(self, url: str) -> None:
        """Tell one scheduler this host is alive and what it holds (a restarted or new owner
        rebuilds from it; it also probes a scheduler counted dead). A failure is logged, once at
        warning (a wrong cluster secret shows up here), then at debug while it repeats."""
        if url in self._announcing:
            return  # the last one is still waiting on a slow scheduler
        self._announcing.add(url)
        try:
            await self.scheduler.call(url, "/v1/hosts", self._announce_message(), wire.Empty)
        except (UpstreamError, P2PError) as exc:
            self.metrics.scheduler_errors.inc()
            said = str(exc) == self._last_announce_error.get(url)
            (self.log.debug if said else self.log.warning)("announce to the scheduler failed: %s", exc)
            self._last_announce_error[url] = str(exc)
        else:
            self._last_announce_error.pop(url, None)
        finally:
            self._announcing.discard(url)

    def _announce_soon(self, url: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self.announce_to, url)

    async def leave_cluster(self) -> None:
        """Draining: stop announcing and tell the scheduler this host is leaving, so it is
        offered as nobody's parent while its last streams finish."""
        self._leaving = True
        self.log.info("%s %s: leaving: the scheduler is told, no new requests are taken", self.kind, self.host_id)
        await self.scheduler.say_goodbye(self.host_id)

    async def announce_loop(self) -> None:
        assert self._nursery is not None
        while not self._leaving:
            await self.enforce_quota()
            # Not waited for: a scheduler that hangs (SIGSTOP) must not delay the others' announces.
            for url in self.scheduler.members:
                self._nursery.start_soon(self.announce_to, url)
            await trio.sleep(self.config.announce_interval_s)

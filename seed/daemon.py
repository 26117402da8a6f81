"""The seed peer: fetches a blob from the origin once, when the scheduler asks, and serves it.

It cuts the origin's byte stream into pieces, computes their BLAKE3 digests (the list every
peer verifies against) and reports each piece to the scheduler the moment it is stored, so
peers fetch from the seed while its own download is still running.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import trio

from p2pdist import wire
from p2pdist.config import SeedConfig, parse_hostport
from p2pdist.digest import PieceHasher, short
from p2pdist.errors import IntegrityError, NotFound, OriginError, P2PError, UpstreamError
from p2pdist.evict import CacheQuota, pin_piece_response
from p2pdist.http import Request, Response, serve_http, text_response
from p2pdist.metrics import DaemonMetrics
from p2pdist.origin import OriginClient
from p2pdist.pieceserver import PieceServer
from p2pdist.ratelimit import maybe_bucket
from p2pdist.schedclient import SchedulerClient
from p2pdist.service import health_response, metrics_response
from p2pdist.store import PieceWriter, TaskStore, open_host
from p2pdist.trust import client_context, refuse_unauthorized, server_context

log = logging.getLogger("p2pdist.seed")

ANNOUNCE_INTERVAL_S = 3.0
REPORT_INTERVAL_S = 0.05
ORIGIN_ATTEMPTS = 5


class SeedFetch:
    """One blob being fetched from the origin."""

    def __init__(self, seed: SeedDaemon, trigger: wire.SeedTrigger) -> None:
        self.seed = seed
        self.task_id = trigger.task_id
        self.url = trigger.url
        self.headers = dict(trigger.headers)
        self.store: TaskStore | None = None
        self.digests: list[bytes] = []
        self.reported = 0
        self.done = False
        self.error = ""
        self.changed = trio.Event()

    async def run(self) -> None:
        metrics = self.seed.metrics
        started = time.monotonic()
        metrics.tasks_active.inc()
        try:
            await self._fetch()
            metrics.tasks.labels("done").inc()
            metrics.task_seconds.observe(time.monotonic() - started)
            assert self.store is not None
            log.info("seeded %s: %d bytes from the origin in %.2fs", short(self.task_id),
                     self.store.layout.blob_size, time.monotonic() - started)
        except P2PError as exc:
            self.error = str(exc)
            metrics.tasks.labels("failed").inc()
            log.error("seeding %s failed: %s", short(self.task_id), exc)
            self.seed.store.remove(self.task_id)
        finally:
            metrics.tasks_active.dec()
            self.done = True
            self._changed()
        await self.seed.enforce_quota()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _fetch(self) -> None:
        origin = self.seed.origin
        attempts = 0
        # The blob's sha256 over committed pieces only: a piece cut off mid-body is fetched
        # again from its start, and its first, partial bytes must not be hashed twice.
        sha = [hashlib.sha256()]
        rng = random.Random()
        while True:
            start = 0 if self.store is None else len(self.digests) * self.store.layout.piece_size
            if self.store is not None and len(self.digests) == self.store.layout.count:
                break
            try:
                async with origin.open_blob(self.url, self.headers, start=start) as body:
                    if self.store is None:
                        self.store = self.seed.store.open(self.task_id, body.blob_size, self.url)
                        self._changed()
                    elif body.blob_size != self.store.layout.blob_size or body.start != start:
                        raise OriginError("origin changed the blob's size or ignored the range")
                    await self._write(self.store, body.chunks(), sha)
            except OriginError as exc:
                attempts += 1
                if exc.status is not None and 400 <= exc.status < 500 or attempts >= ORIGIN_ATTEMPTS:
                    raise
                delay = min(8.0, 0.25 * 2 ** attempts) * (0.5 + rng.random())
                log.warning("origin failed for %s (%s); resuming at piece %d in %.1fs",
                            short(self.task_id), exc, len(self.digests), delay)
                await trio.sleep(delay)
        actual = "sha256:" + sha[0].hexdigest()
        if actual != self.task_id:
            raise IntegrityError(f"origin sent {short(actual)} for {short(self.task_id)}")
        self.store.save_digests(self.digests)

    async def _write(self, store: TaskStore, chunks: Any, sha: list[Any]) -> None:
        layout = store.layout
        metrics = self.seed.metrics
        number = len(self.digests)
        writer: PieceWriter | None = store.new_piece(number)
        hasher = PieceHasher()
        piece_sha = sha[0].copy()
        try:
            async for chunk in chunks:
                metrics.download_bytes.labels("origin").inc(len(chunk))
                view = memoryview(chunk)
                while view:
                    want = layout.length(number) - hasher.length
                    part, view = view[:want], view[want:]
                    assert writer is not None
                    writer.write(part)
                    hasher.update(part)
                    piece_sha.update(part)
                    if hasher.length == layout.length(number):
                        writer.commit()
                        sha[0] = piece_sha
                        piece_sha = piece_sha.copy()
                        self.digests.append(hasher.digest())
                        metrics.pieces.labels("origin", "verified").inc()
                        self._changed()
                        number += 1
                        if number >= layout.count:
                            writer = None
                            return
                        writer = store.new_piece(number)
                        hasher = PieceHasher()
            if layout.blob_size == 0 and number == 0 and writer is not None:
                writer.commit()
                self.digests.append(hasher.digest())
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    async def report_loop(self) -> None:
        """Tell the scheduler the size and each new piece digest, batched every few ms."""
        sched = self.seed.scheduler
        while True:
            if self.store is not None and (len(self.digests) > self.reported or self.done or self.reported == 0):
                first = self.reported
                digests = self.digests[first:]
                try:
                    await sched.call("/v1/tasks/seed", wire.SeedProgress(
                        host_id=self.seed.host_id, task_id=self.task_id,
                        content_length=self.store.layout.blob_size, first_digest=first,
                        piece_digests=digests, done=self.done and not self.error, error=self.error), wire.Empty)
                    self.reported = first + len(digests)
                except (UpstreamError, P2PError) as exc:
                    log.warning("seed progress for %s not reported: %s", short(self.task_id), exc)
                    await trio.sleep(0.5)
                if self.done and self.reported == len(self.digests):
                    return
            elif self.done:
                if self.error:
                    try:
                        await sched.call("/v1/tasks/seed", wire.SeedProgress(
                            host_id=self.seed.host_id, task_id=self.task_id, content_length=0,
                            first_digest=0, piece_digests=[], error=self.error), wire.Empty)
                    except (UpstreamError, P2PError) as exc:
                        log.warning("seed failure for %s not reported: %s", short(self.task_id), exc)
                return
            with trio.move_on_after(REPORT_INTERVAL_S):
                await self.changed.wait()
            await trio.sleep(REPORT_INTERVAL_S if not self.done else 0)


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

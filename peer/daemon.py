"""The peer daemon: the node of every host in its peer role, with a proxy for local clients.

The node (p2pdist/node/node.py) serves pieces to other peers and announces what this host
holds; the peer adds the proxy port and one TaskDownload per blob being fetched.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import Counter

from p2pdist import wire
from p2pdist.config import PeerConfig, parse_hostport
from p2pdist.content.attest import AttestationCheck
from p2pdist.content.digest import parse_digest
from p2pdist.errors import StoreError
from p2pdist.node.node import Node
from p2pdist.node.preheat import held_status
from p2pdist.registry.client import OriginClient
from p2pdist.transport.piececlient import PieceClient
from p2pdist.transport.ratelimit import maybe_bucket
from p2pdist.transport.server import Request, Response, serve_http
from peer.download import TaskDownload
from peer.sitepeers import SitePeers, site_answer

if TYPE_CHECKING:
    from peer.proxy import Proxy

# Why recent downloads failed, for `p2pdist get` and the status endpoint: this many, newest kept.
FAILURES_KEPT = 256


class PeerDaemon(Node[PeerConfig]):
    kind = "peer"

    def __init__(self, config: PeerConfig) -> None:
        # The origin client has no bucket of its own: back-to-source bytes are taken from
        # download_bucket with the P2P ones, under one cap.
        super().__init__(config, origin=OriginClient(), scheduler_timeout_s=config.scheduler_timeout_s)
        self.download_bucket = maybe_bucket(config.download_rate_bps)
        self.piece_client = PieceClient(secret=config.cluster_secret, ssl_context=self.tls_client)
        self.downloads: dict[str, TaskDownload] = {}
        # Verify once: the seeds' public keys; None means every blob is hashed here too.
        self.attest_check = AttestationCheck.load(config.attest_public_key) if config.attest_public_key else None
        self.blob_checks = Counter(
            "p2pdist_peer_blob_checks",
            "Whole blobs finished, by how their sha256 was checked: hashed here, or attested by a seed "
            "(every piece matched digests the seed signed after checking it)",
            ["how"],
            registry=self.metrics.registry,
        )
        self.proxy: Proxy | None = None
        # task -> (wall time, reason) of its last failed download; a client whose stream was
        # cut after its 200 went out reads the reason here (p2pdist get does).
        self.failures: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # The site's hosts, asked directly when no scheduler answers (the WAN link is down).
        self.site = SitePeers(self)

    # -- downloads ------------------------------------------------------------------------

    def download(
        self, task_id: str, url: str, headers: dict[str, str], *, size_hint: int | None = None
    ) -> TaskDownload:
        """The running or finished download of a task, started if needed. `size_hint`, the
        blob's size if the access check learnt it, lets the scheduler send a small blob straight
        to the origin."""
        parse_digest(task_id)
        current = self.downloads.get(task_id)
        if current is not None and current.error is None:
            return current
        held = self.store.get(task_id)
        dl = TaskDownload(self, task_id, url, dict(headers), size_hint=size_hint)
        self.downloads[task_id] = dl
        if held is not None and held.complete():
            dl.store = held
            dl.verified = True
            dl.finished.set()
        else:
            self.spawn(self._run_download, dl)
        return dl

    def preheat(self, message: wire.PreheatBlob) -> None:
        self.download(message.task_id, message.url, message.headers)

    def preheat_status(self, task_id: str) -> wire.PreheatStatus:
        dl = self.downloads.get(task_id)
        if dl is not None and dl.finished.is_set() and dl.error is not None:
            return wire.PreheatStatus(task_id=task_id, state="failed", error=str(dl.error))
        if dl is not None and not dl.finished.is_set():
            held = held_status(task_id, dl.store)
            # All pieces in is not done: the blob's sha256 is still being checked.
            return wire.PreheatStatus(
                task_id=task_id, state="running", content_length=held.content_length, bytes_done=held.bytes_done
            )
        status = super().preheat_status(task_id)
        failed = self.failures.get(task_id)
        if status.state != "done" and failed is not None:
            return wire.PreheatStatus(task_id=task_id, state="failed", error=failed[1])
        return status

    async def _run_download(self, dl: TaskDownload) -> None:
        await dl.run()
        if dl.error is not None:
            self.failures[dl.task_id] = (time.time(), str(dl.error))
            self.failures.move_to_end(dl.task_id)
            while len(self.failures) > FAILURES_KEPT:
                self.failures.popitem(last=False)
        elif dl.verified:
            self.failures.pop(dl.task_id, None)
            if dl.store is not None:
                try:
                    dl.store.mark_verified()  # offered whole to site hosts that cannot reach the scheduler
                except StoreError as exc:
                    self.log.info("task %s: not offered to the site: %s", dl.task_id[:19], exc)
        if dl.error is not None and self.downloads.get(dl.task_id) is dl:
            # Keep the failure visible to readers already waiting, but let the next request retry.
            del self.downloads[dl.task_id]
        await self.enforce_quota()

    def download_status(self, task_id: str) -> dict[str, object]:
        """What this peer knows of a task's download: its state and, if it failed, why."""
        dl = self.downloads.get(task_id)
        # Verified is as good as done here: a client has its last byte once the blob checked
        # out, and may ask where the bytes came from before the final sync with the scheduler.
        if dl is not None and not dl.finished.is_set() and not dl.verified:
            return {"digest": task_id, "state": "running"}
        held = self.store.get(task_id)
        if held is not None and held.complete():
            # Where this peer's own download of it got the bytes (none: it held them already).
            came = dict(dl.bytes_from) if dl is not None else {"peer": 0, "seed": 0, "origin": 0}
            return {"digest": task_id, "state": "held", "bytes": held.layout.blob_size, "from": came}
        failed = self.failures.get(task_id)
        if failed is not None:
            return {"digest": task_id, "state": "failed", "reason": failed[1], "failed_at": failed[0]}
        return {"digest": task_id, "state": "unknown"}

    # -- the node's hooks -----------------------------------------------------------------

    async def route(self, request: Request) -> Response | None:
        return site_answer(self, request)

    def back_to_source_log(self) -> list[dict[str, Any]]:
        return [
            {"task_id": dl.task_id, "reason": dl.back_to_source_reason, "error": str(dl.error or "")}
            for dl in self.downloads.values()
            if dl.back_to_source_reason
        ]

    def busy(self, task_id: str) -> bool:
        dl = self.downloads.get(task_id)
        return dl is not None and not dl.finished.is_set()

    def forget(self, task_id: str) -> None:
        self.downloads.pop(task_id, None)

    async def start_role(self, nursery: trio.Nursery, bound: tuple[str, int]) -> Any:
        from peer.proxy import Proxy  # peer.proxy imports this module

        self.proxy = Proxy(self)
        host, port = parse_hostport(self.config.proxy_listen)
        proxy_bound = await nursery.start(
            partial(
                serve_http,
                self.proxy.handle,
                host,
                port,
                name="proxy",
                # A blob GET may wait long for its first piece; the head still has head_timeout_s.
                request_timeout_s=3600.0,
                head_timeout_s=self.config.head_timeout_s,
                max_connections=self.config.max_connections,
            )
        )
        self.log.info("peer %s: proxy on http://%s:%d", self.host_id, *proxy_bound)
        nursery.start_soon(self.proxy.offline.save_loop)
        nursery.start_soon(self.site.learn_loop)
        return bound, proxy_bound

    async def aclose(self) -> None:
        if self.proxy is not None:
            await self.proxy.aclose()
        await super().aclose()
        await self.piece_client.aclose()


async def serve(config: PeerConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a peer until cancelled; reports ((pieces host, port), (proxy host, port))."""
    await PeerDaemon(config).serve(task_status=task_status)

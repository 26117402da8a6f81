"""The seed peer: the node in its seed role, fetching a blob from the origin once when the
scheduler asks, and serving it.

The node (p2pdist/node/node.py) serves pieces and announces; the seed adds the trigger
endpoint, one SeedFetch (seed/fetch.py) per blob, and the piece digests in its announces.
"""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import Counter, Gauge

from p2pdist import wire
from p2pdist.config import SeedConfig
from p2pdist.content.attest import Attester
from p2pdist.content.digest import short
from p2pdist.errors import BadRequest, Forbidden
from p2pdist.memory import ShrinkWatch, release_freed_memory
from p2pdist.node.node import Node
from p2pdist.node.preheat import held_status
from p2pdist.registry.allowlist import check_seed_url
from p2pdist.registry.client import OriginClient
from p2pdist.storage.store import TaskStore
from p2pdist.transport.ratelimit import maybe_bucket
from p2pdist.transport.server import Request, Response, text_response
from p2pdist.transport.trust import refuse_unauthorized
from seed.fetch import SeedFetch

TRIGGER_PATH = "/v1/seed/tasks"


class SeedDaemon(Node[SeedConfig]):
    kind = "seed"

    def __init__(self, config: SeedConfig) -> None:
        if config.upstream:
            # Every blob comes over the site's WAN link from the core's mirror: the WAN cap is
            # the only one, and a link that is down is told in seconds, not an origin timeout.
            origin = OriginClient(
                rate=maybe_bucket(config.wan_rate_bps),
                timeout_s=config.origin_timeout_s,
                connect_timeout_s=config.upstream_connect_timeout_s,
            )
        else:
            caps = [r for r in (config.origin_rate_bps, config.wan_rate_bps) if r]
            origin = OriginClient(rate=maybe_bucket(min(caps, default=None)), timeout_s=config.origin_timeout_s)
        super().__init__(config, origin=origin)
        self.fetches: dict[str, SeedFetch] = {}
        self.attester = Attester.load(config.attest_key) if config.attest_key else None
        self.triggers_refused = Counter(
            "p2pdist_seed_triggers_refused",
            "Fetch requests refused before any fetch: url (not this task's blob URL), registry (not allowed)",
            ["reason"],
            registry=self.metrics.registry,
        )
        self.failed_records = Gauge(
            "p2pdist_seed_failed_fetches",
            "Failed fetches still remembered (each is forgotten failed_fetch_ttl_s after it failed)",
            registry=self.metrics.registry,
        )
        self._last_refusal = ""

    def start(self, trigger: wire.SeedTrigger) -> None:
        """Fetch the triggered blob, or report it again if it is already held."""
        current = self.fetches.get(trigger.task_id)
        if current is not None and not current.error:
            if current.done:
                current.reported = 0  # a restarted scheduler may have forgotten it
                self.spawn(current.report_loop)
            return
        fetch = SeedFetch(self, trigger)
        held = self.store.get(trigger.task_id)
        if held is not None and held.complete():
            fetch.store = held
            fetch.digests = held.load_digests()
            fetch.done = True
        else:
            via = f" through {self.config.upstream}" if self.config.upstream else ""
            self.log.info("seeding %s from %s%s", short(trigger.task_id), trigger.url.split("/v2/")[0], via)
        self.fetches[trigger.task_id] = fetch
        if not fetch.done:
            self.spawn(fetch.run)
        self.spawn(fetch.report_loop)

    # -- the node's hooks -----------------------------------------------------------------

    async def route(self, request: Request) -> Response | None:
        if request.path != TRIGGER_PATH:
            return None
        if (refused := refuse_unauthorized(request, self.config.cluster_secret)) is not None:
            return refused
        if request.method != "POST":
            return text_response(405, f"{TRIGGER_PATH} takes POST", [("allow", "POST")])
        trigger = wire.decode(wire.SeedTrigger, await request.body(limit=wire.MAX_BODY_BYTES))
        self.check_trigger(trigger)
        self.start(trigger)
        return Response(202, [("content-type", wire.CONTENT_TYPE)], wire.encode(wire.Empty()))

    def preheat(self, message: wire.PreheatBlob) -> None:
        # The same fetch a wake-up starts, under the same check: one origin fetch per blob
        # whoever asked first, and only of a blob a peer could ask for.
        trigger = wire.SeedTrigger(
            task_id=message.task_id, url=message.url, headers=message.headers, min_piece_size=message.min_piece_size
        )
        self.check_trigger(trigger)
        self.start(trigger)

    def preheat_status(self, task_id: str) -> wire.PreheatStatus:
        fetch = self.fetches.get(task_id)
        if fetch is None:
            return super().preheat_status(task_id)
        if fetch.error:
            return wire.PreheatStatus(task_id=task_id, state="failed", error=fetch.error)
        status = held_status(task_id, fetch.store)
        if status.state == "done" and not fetch.done:
            # Every piece is stored but the sha256 of the whole is still being checked.
            return wire.PreheatStatus(task_id=task_id, state="running", content_length=status.content_length)
        return status

    def check_trigger(self, trigger: wire.SeedTrigger) -> None:
        """Fetch only what a peer may ask for, whoever sent the trigger: the scheduler checked
        the same at registration, this holds also against a forged or misrouted trigger."""
        try:
            check_seed_url(trigger.url, trigger.task_id, self.config.allowed_registries)
        except BadRequest as exc:
            self.triggers_refused.labels("registry" if isinstance(exc, Forbidden) else "url").inc()
            # Once per distinct reason, not once per request: a flood must not flood the log.
            said = str(exc) == self._last_refusal
            (self.log.debug if said else self.log.warning)("refused to fetch %s: %s", short(trigger.task_id), exc)
            self._last_refusal = str(exc)
            raise

    async def start_role(self, nursery: trio.Nursery, bound: tuple[str, int]) -> Any:
        nursery.start_soon(self.expire_failed_loop)
        return await super().start_role(nursery, bound)

    def expire_failed(self, now: float) -> int:
        """Forget fetches that failed more than failed_fetch_ttl_s ago; return how many."""
        ttl = self.config.failed_fetch_ttl_s
        gone = [t for t, f in self.fetches.items() if f.error and f.failed_at is not None and now - f.failed_at > ttl]
        for task_id in gone:
            del self.fetches[task_id]
        return len(gone)

    async def expire_failed_loop(self) -> None:
        fetches = ShrinkWatch()
        while True:
            await trio.sleep(min(1.0, max(0.1, self.config.failed_fetch_ttl_s / 4)))
            self.expire_failed(trio.current_time())
            self.failed_records.set(sum(1 for f in self.fetches.values() if f.error))
            self.origin.forget_expired_tokens()
            if fetches.shrunk(len(self.fetches)):
                # Most of what a burst of failed fetches held went: give the heap back to the OS.
                release_freed_memory()

    def busy(self, task_id: str) -> bool:
        fetch = self.fetches.get(task_id)
        return fetch is not None and not fetch.done

    def forget(self, task_id: str) -> None:
        self.fetches.pop(task_id, None)

    def piece_digests(self, task: TaskStore) -> list[bytes]:
        fetch = self.fetches.get(task.task_id)
        return list(fetch.digests) if fetch is not None else task.load_digests()


async def serve(config: SeedConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a seed until cancelled; reports the piece server's (host, port)."""
    await SeedDaemon(config).serve(task_status=task_status)

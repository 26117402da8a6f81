"""The seed peer: the node in its seed role, fetching a blob from the origin once when the
scheduler asks, and serving it.

The node (p2pdist/node/node.py) serves pieces and announces; the seed adds the trigger
endpoint, one SeedFetch (seed/fetch.py) per blob, and the piece digests in its announces.
"""

from __future__ import annotations

from typing import Any

import trio

from p2pdist import wire
from p2pdist.config import SeedConfig
from p2pdist.content.digest import short
from p2pdist.node.node import Node
from p2pdist.node.preheat import held_status
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
        super().__init__(
            config, origin=OriginClient(rate=maybe_bucket(config.origin_rate_bps), timeout_s=config.origin_timeout_s)
        )
        self.fetches: dict[str, SeedFetch] = {}

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
            self.log.info("seeding %s from %s", short(trigger.task_id), trigger.url.split("/v2/")[0])
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
        self.start(trigger)
        return Response(202, [("content-type", wire.CONTENT_TYPE)], wire.encode(wire.Empty()))

    def preheat(self, message: wire.PreheatBlob) -> None:
        # The same fetch a wake-up starts: one origin fetch per blob whoever asked first.
        self.start(wire.SeedTrigger(task_id=message.task_id, url=message.url, headers=message.headers))

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

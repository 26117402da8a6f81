"""The cache quota of a peer's or seed's piece store: high and low watermarks, LRU order.

When the pieces held pass `high × quota` bytes, whole tasks are removed, least recently used
first, until at most `low × quota` remain. A task in use (downloading, or a piece or blob of
it being sent) is never removed. `choose_evictions` is the pure rule; `CacheQuota` applies it
to a Store.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from p2pdist.content.digest import parse_digest, short
from p2pdist.node.pieceserver import PIECE_PATH
from p2pdist.storage.store import Store, TaskStore
from p2pdist.transport.server import FileBody, Request, Response

log = logging.getLogger("p2pdist.evict")


@dataclass(frozen=True)
class CachedTask:
    task_id: str
    size: int  # bytes of verified pieces held
    last_used: float
    in_use: bool


def choose_evictions(tasks: Iterable[CachedTask], quota: int | None, high: float, low: float) -> list[str]:
    """The tasks to remove, oldest use first, or [] when usage is at or under the high mark.

    Tasks in use are skipped, so the result may leave usage above the low mark (or even the
    quota): the store then stays over until they are released.
    """
    tasks = list(tasks)
    used = sum(t.size for t in tasks)
    if quota is None or used <= high * quota:
        return []
    target = low * quota
    chosen = []
    for task in sorted(tasks, key=lambda t: (t.last_used, t.task_id)):
        if used <= target:
            break
        if task.in_use:
            continue
        chosen.append(task.task_id)
        used -= task.size
    return chosen


def held_bytes(task: TaskStore) -> int:
    return sum(task.layout.length(n) for n in task.pieces)


class CacheQuota:
    """Applies the quota to `store`; `busy(task_id)` says whether the owner is using a task."""

    def __init__(
        self,
        store: Store,
        quota_bytes: int | None,
        high: float,
        low: float,
        *,
        busy: Callable[[str], bool] = lambda task_id: False,
        registry: CollectorRegistry | None = None,
        role: str = "peer",
    ) -> None:
        self.store = store
        self.quota_bytes = quota_bytes
        self.high = high
        self.low = low
        self.busy = busy
        registry = registry or CollectorRegistry()
        self.evictions = Counter(
            f"p2pdist_{role}_cache_evictions", "Blobs removed to keep the cache quota", registry=registry
        )
        self.held = Gauge(f"p2pdist_{role}_cache_bytes", "Bytes of verified pieces held", registry=registry)
        Gauge(f"p2pdist_{role}_cache_quota_bytes", "The cache quota (+Inf: none)", registry=registry).set(
            float("inf") if quota_bytes is None else quota_bytes
        )
        Gauge(
            f"p2pdist_{role}_disk_free_bytes", "Free bytes on the data dir's file system", registry=registry
        ).set_function(self.free_bytes)

    def free_bytes(self) -> float:
        try:
            return float(shutil.disk_usage(self.store.root).free)
        except OSError:
            return float("nan")  # the data dir is gone: say so rather than 0 bytes

    def used_bytes(self) -> int:
        return sum(held_bytes(t) for t in self.store.tasks.values())

    def enforce(self) -> list[str]:
        """Remove what the quota says must go; return the task ids removed."""
        store = self.store
        self.held.set(self.used_bytes())
        if self.quota_bytes is None:
            return []
        tasks = [
            CachedTask(t.task_id, held_bytes(t), t.last_used, store.in_use(t.task_id) or self.busy(t.task_id))
            for t in store.tasks.values()
        ]
        chosen = choose_evictions(tasks, self.quota_bytes, self.high, self.low)
        for task_id in chosen:
            task = store.tasks[task_id]
            log.info(
                "evicting %s (%d bytes, last used %.0fs ago): cache over %.0f%% of %d bytes",
                short(task_id),
                held_bytes(task),
                time.time() - task.last_used,
                self.high * 100,
                self.quota_bytes,
            )
            store.remove(task_id)
            self.evictions.inc()
        if chosen:
            self.held.set(self.used_bytes())
        return chosen


def pin_piece_response(store: Store, request: Request, response: Response) -> Response:
    """Keep the task of a piece being sent out of the quota's reach until the send ends."""
    body = response.body
    m = PIECE_PATH.fullmatch(request.path)
    if not isinstance(body, FileBody) or m is None:
        return response
    task_id = parse_digest(m.group("task"))
    store.pin(task_id)
    done = body.on_done

    def release() -> None:
        store.unpin(task_id)
        if done is not None:
            done()

    body.on_done = release
    return response

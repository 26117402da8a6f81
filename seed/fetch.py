"""One blob fetched by the seed from the origin: cut into pieces, digested, reported as it goes.

The seed cuts the origin's byte stream into pieces, computes their BLAKE3 digests (the list
every peer verifies against) and reports each piece to the scheduler the moment it is stored,
so peers fetch from the seed while its own download is still running.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import trio

from p2pdist import wire
from p2pdist.content.digest import PieceHasher, short
from p2pdist.errors import IntegrityError, OriginError, P2PError, UpstreamError
from p2pdist.storage.store import PieceWriter, TaskStore

if TYPE_CHECKING:
    from seed.daemon import SeedDaemon

log = logging.getLogger("p2pdist.seed")

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

"""One task's download on a peer: pieces from parents the scheduler names, verified, stored.

Pieces are requested rarest-first (earliest first among equals) from the least busy parent
that holds them, a few at a time per parent, each under a timeout. Every piece is checked
against the seed's BLAKE3 digest before it is renamed into the store, and the whole blob
against its sha256 digest. When P2P cannot deliver, the download goes back to the origin.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from p2pdist import wire
from p2pdist.content.digest import PIECE_DIGEST_BYTES, PieceHasher, short
from p2pdist.content.pieces import Bitmap
from p2pdist.errors import IntegrityError, OriginError, P2PError, StoreError, UpstreamError
from p2pdist.storage.store import PieceWriter, TaskStore
from peer.selection import ParentView, bitmap_bits, choose_requests, per_parent_limit, piece_set

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

log = logging.getLogger("p2pdist.peer")

SYNC_INTERVAL_S = 0.2
BUSY_S = 0.5  # a parent that answered 503 (after its queue wait) is left alone this long
IDLE_SYNC_INTERVAL_S = 1.0
STALL_S = 30.0
PARENT_FAILURES = 2
PARENT_ABSENT = 3  # 404s for pieces a parent claims before it is treated as failing
BLOCK_S = 30.0


class BackToSource(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ParentState:
    host_id: str
    url: str
    pieces: Bitmap
    inflight: int = 0
    failures: int = 0
    busy_until: float = 0.0
    absent: int = 0  # pieces it was said to hold but answered 404 for


@dataclass
class TaskDownload:
    daemon: PeerDaemon
    task_id: str
    url: str
    headers: dict[str, str]
    store: TaskStore | None = None
    digests: list[bytes] = field(default_factory=list)
    parents: dict[str, ParentState] = field(default_factory=dict)
    blocked: dict[str, float] = field(default_factory=dict)
    inflight: set[int] = field(default_factory=set)
    error: P2PError | None = None
    back_to_source_reason: str = ""
    registered: bool = False

    def __post_init__(self) -> None:
        self.finished = trio.Event()
        self._changed = trio.Event()
        self._to_report: list[int] = []
        self._bad: set[str] = set()
        self._failed: set[str] = set()
        self._last_progress = time.monotonic()
        self._waiting_since: float | None = None
        self._sha = hashlib.sha256()
        self._sha_next = 0
        self.verified = False
        self.rng = random.Random()
        self._fatal: P2PError | None = None  # ends the download: nothing to retry elsewhere

    # -- what readers use -----------------------------------------------------------------

    @property
    def content_length(self) -> int | None:
        return None if self.store is None else self.store.layout.blob_size

    async def wait_sized(self) -> TaskStore:
        while self.store is None:
            if self.error is not None:
                raise self.error
            await self._wait_change()
        return self.store

    async def wait_piece(self, number: int) -> None:
        """Return once piece `number` is in the store; raise if the download failed."""
        while True:
            if self.store is not None and self.store.has(number) and (self.error is None):
                return
            if self.error is not None:
                raise self.error
            await self._wait_change()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the download ---------------------------------------------------------------------

    async def run(self) -> None:
        metrics = self.daemon.metrics
        started = time.monotonic()
        metrics.tasks_active.inc()
        try:
            try:
                await self._p2p()
            except BackToSource as b2s:
                self.back_to_source_reason = b2s.reason
                metrics.back_to_source.labels(_reason_label(b2s.reason)).inc()
                log.warning("task %s: going back to source: %s", short(self.task_id), b2s.reason)
                await self._back_to_source()
            await self._finish_sha()
            assert self.store is not None
            self.store.save_digests(self.digests)
            self.verified = True
            metrics.tasks.labels("done").inc()
            metrics.task_seconds.observe(time.monotonic() - started)
            log.info("task %s: done, %d bytes in %.2fs%s", short(self.task_id), self.store.layout.blob_size,
                     time.monotonic() - started, " (back to source)" if self.back_to_source_reason else "")
            await self._final_sync()
        except P2PError as exc:
            self.error = exc
            metrics.tasks.labels("failed").inc()
            log.error("task %s: failed: %s", short(self.task_id), exc)
            if isinstance(exc, IntegrityError | StoreError) and self.store is not None:
                self.daemon.store.remove(self.task_id)
        finally:
            metrics.tasks_active.dec()
            self.finished.set()
            self._notify()

    async def _p2p(self) -> None:
        sched = self.daemon.scheduler
        if sched is None:
            raise BackToSource("no scheduler configured")
        try:
            reply = await sched.call("/v1/tasks/register", wire.Register(
                host_id=self.daemon.host_id, task_id=self.task_id, url=self.url, headers=self.headers), wire.SyncReply)
        except (UpstreamError, P2PError) as exc:
            self.daemon.metrics.scheduler_errors.inc()
            raise BackToSource(f"scheduler unreachable ({exc})") from None
        self.registered = True
        self._apply(reply)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._sha_loop)
            await self._fetch_loop(nursery)
            nursery.cancel_scope.cancel()
        if self._fatal is not None:
            raise self._fatal
        if self.back_to_source_reason:
            raise BackToSource(self.back_to_source_reason)

    def _apply(self, reply: wire.SyncReply) -> None:
        if reply.state == "back_to_source":
            self.back_to_source_reason = reply.reason or "scheduler said so"
        elif reply.state == "failed":
            self.back_to_source_reason = reply.reason or "task failed on the seed"
        elif reply.state == "unknown":
            self.registered = False
        elif reply.state == "waiting":
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
        elif reply.state == "running" and reply.content_length is not None:
            store = self.store if self.store is not None else self._open_store(reply.content_length)
            if reply.first_digest <= len(self.digests):
                known = len(self.digests)
                self.digests.extend(reply.piece_digests[len(self.digests) - reply.first_digest:])
                if len(self.digests) > known:
                    self._save_digests()
            count = store.layout.count
            fresh: dict[str, ParentState] = {}
            for p in reply.parents:
                if p.host_id == self.daemon.host_id or self.blocked.get(p.host_id, 0) > time.monotonic():
                    continue
                try:
                    bitmap = Bitmap(count, p.pieces)
                except ValueError:
                    continue
                old = self.parents.get(p.host_id)
                if old is not None:
                    old.pieces = bitmap
                    old.url = p.url
                    fresh[p.host_id] = old
                else:
                    fresh[p.host_id] = ParentState(p.host_id, p.url, bitmap)
            # Parents with pieces in flight stay until those finish.
            for host_id, old in self.parents.items():
                if host_id not in fresh and old.inflight:
                    fresh[host_id] = old
            self.parents = fresh
            self._notify()

    async def _sync_loop(self) -> None:
        sched = self.daemon.scheduler
        assert sched is not None
        failures = 0
        while True:
            interval = SYNC_INTERVAL_S if (self._to_report or not self._complete()) else IDLE_SYNC_INTERVAL_S
            await trio.sleep(min(2.0, interval * (2 ** failures)))
            new, self._to_report = self._to_report, []
            bad, failed = set(self._bad), set(self._failed)
            try:
                if not self.registered:
                    reply = await sched.call("/v1/tasks/register", wire.Register(
                        host_id=self.daemon.host_id, task_id=self.task_id, url=self.url, headers=self.headers), wire.SyncReply)
                    self.registered = True
                    if self.store is not None:
                        new = list(self.store.pieces)
                reply = await sched.call("/v1/tasks/sync", wire.Sync(
                    host_id=self.daemon.host_id, task_id=self.task_id, new_pieces=new,
                    have_digests=len(self.digests), bad_parents=sorted(bad), failed_parents=sorted(failed),
                    content_length=self.content_length), wire.SyncReply)
            except (UpstreamError, P2PError) as exc:
                self._to_report = new + self._to_report
                failures += 1
                self.daemon.metrics.scheduler_errors.inc()
                log.warning("task %s: scheduler sync failed (%d in a row): %s", short(self.task_id), failures, exc)
                if failures >= self.daemon.config.schedule_rounds and not self._parents_with_work():
                    self.back_to_source_reason = f"scheduler unreachable after {failures} tries"
                    self._notify()
                continue
            failures = 0
            self._bad -= bad
            self._failed -= failed
            self._apply(reply)

    def _open_store(self, content_length: int) -> TaskStore:
        store = self.store = self.daemon.store.open(self.task_id, content_length, self.url)
        if not self.digests and len(store.pieces):
            # Pieces kept from an earlier run were verified against these when the store loaded.
            self.digests = store.load_digests()[: store.layout.count]
        self._notify()
        return store

    def _save_digests(self) -> None:
        """Keep the known digests beside the pieces as they arrive, so that after a crash the
        verified pieces of an unfinished download can be checked and reused, not refetched."""
        if self.store is None:
            return
        known = []
        for digest in self.digests:
            if len(digest) != PIECE_DIGEST_BYTES:
                break  # a gap: later digests would be read against the wrong pieces
            known.append(digest)
        try:
            self.store.save_digests(known)
        except StoreError as exc:
            log.info("task %s: piece digests not saved: %s", short(self.task_id), exc)

    def _complete(self) -> bool:
        return self.store is not None and self.store.complete()

    def _parents_with_work(self) -> bool:
        """True if some known parent still holds a piece we need and is not failing."""
        if self.store is None:
            return False
        for p in self.parents.values():
            if p.failures < PARENT_FAILURES and any(
                    n not in self.store.pieces and n < len(self.digests) for n in p.pieces):
                return True
        return False

    async def _fetch_loop(self, nursery: trio.Nursery) -> None:
        config = self.daemon.config
        while True:
            if self.back_to_source_reason or self._fatal is not None:
                return
            if self.store is not None and self.store.complete():
                return
            now = time.monotonic()
            if self.store is None:
                if self._waiting_since is not None and now - self._waiting_since > config.wait_for_seed_s:
                    self.back_to_source_reason = f"blob size unknown after {config.wait_for_seed_s:.0f}s"
                    return
            else:
                self._launch(nursery)
                if not self.inflight and now - self._last_progress > STALL_S:
                    self.back_to_source_reason = f"no piece arrived in {STALL_S:.0f}s"
                    return
            with trio.move_on_after(0.5):
                await self._wait_change()

    def _launch(self, nursery: trio.Nursery) -> None:
        store = self.store
        assert store is not None
        config = self.daemon.config
        room = config.concurrent_pieces - len(self.inflight)
        if room <= 0 or not self.parents:
            return
        now = time.monotonic()
        known = min(len(self.digests), store.layout.count)  # only pieces we can verify
        need = ((1 << known) - 1) & ~bitmap_bits(store.pieces) & ~piece_set(self.inflight)
        views = [ParentView(p.host_id, bitmap_bits(p.pieces), p.inflight,
                            usable=p.busy_until <= now and self.blocked.get(p.host_id, 0) <= now)
                 for p in self.parents.values()]
        whole = (1 << store.layout.count) - 1
        in_order = all(v.pieces == whole for v in views)
        per_parent = per_parent_limit(views, config.per_parent_pieces)
        for number, host_id in choose_requests(need, views, room=room, per_parent=per_parent,
                                               rng=self.rng, in_order=in_order):
            parent = self.parents[host_id]
            parent.inflight += 1
            self.inflight.add(number)
            nursery.start_soon(self._fetch_piece, number, parent)

    async def _fetch_piece(self, number: int, parent: ParentState) -> None:
        store = self.store
        assert store is not None
        config = self.daemon.config
        metrics = self.daemon.metrics
        length = store.layout.length(number)
        timeout = config.piece_timeout_s + config.piece_timeout_per_mib_s * length / (1 << 20)
        started = time.monotonic()
        outcome = "failed"
        writer = None
        try:
            with trio.move_on_after(timeout) as scope:
                url = f"{parent.url}/v1/tasks/{self.task_id}/pieces/{number}"
                async with self.daemon.piece_client.get(url, {"x-p2pdist": "1"}) as response:
                    if response.status == 404:
                        parent.pieces.discard(number)  # the scheduler's view was ahead of the parent's
                        outcome = "absent"
                        parent.absent += 1
                        if parent.absent >= PARENT_ABSENT:
                            # Its claims keep coming back with the next sync: a liar, or a parent
                            # that lost its store. Either way, stop asking it.
                            log.warning("task %s: %s answered 404 for %d pieces it claims; avoiding it",
                                        short(self.task_id), parent.host_id, parent.absent)
                            self._block(parent, bad=False)
                        return
                    if response.status == 503:
                        parent.busy_until = time.monotonic() + BUSY_S
                        outcome = "busy"
                        return
                    if response.status != 200:
                        raise UpstreamError(f"parent answered HTTP {response.status}")
                    if response.length != length:
                        raise IntegrityError(f"parent offered {response.length} bytes for a {length}-byte piece")
                    writer = store.new_piece(number)
                    hasher = PieceHasher()
                    bucket = self.daemon.download_bucket
                    if bucket is None and response.can_drain_in_thread:
                        await response.drain_in_thread(_verify_and_write(hasher, writer))
                    else:
                        async for chunk in response.chunks():
                            if bucket is not None:
                                await bucket.take(len(chunk))
                            hasher.update(chunk)
                            writer.write(chunk)
                    metrics.download_bytes.labels("peer").inc(hasher.length)
                    if hasher.digest() != self.digests[number]:
                        raise IntegrityError(f"piece {number} from {parent.host_id} failed verification")
                    writer.commit()
                    writer = None
                    outcome = "verified"
            if scope.cancelled_caught:
                raise UpstreamError(f"piece {number} from {parent.host_id} timed out after {timeout:.1f}s")
        except IntegrityError as exc:
            outcome = "corrupt"
            log.warning("task %s: %s; avoiding %s", short(self.task_id), exc, parent.host_id)
            self._block(parent, bad=True)
        except UpstreamError as exc:
            parent.failures += 1
            log.info("task %s: piece %d from %s failed: %s", short(self.task_id), number, parent.host_id,
                     exc)
            if parent.failures >= PARENT_FAILURES:
                self._block(parent, bad=False)
        except StoreError as exc:
            self._fatal = exc
        finally:
            if writer is not None:
                writer.abort()
            parent.inflight -= 1
            self.inflight.discard(number)
            metrics.pieces.labels("peer", outcome).inc()
            if outcome == "verified":
                parent.failures = 0
                self._to_report.append(number)
                self._last_progress = time.monotonic()
                metrics.piece_seconds.labels("peer").observe(time.monotonic() - started)
            self._notify()

    def _block(self, parent: ParentState, *, bad: bool) -> None:
        self.blocked[parent.host_id] = time.monotonic() + BLOCK_S
        (self._bad if bad else self._failed).add(parent.host_id)
        self.parents.pop(parent.host_id, None)
        self.daemon.avoid(parent.host_id)

    async def _sha_loop(self) -> None:
        """Hash the blob's contiguous prefix as it grows, off the event loop."""
        while True:
            store = self.store
            if store is not None:
                while self._sha_next < store.layout.count and self._sha_next in store.pieces:
                    number = self._sha_next
                    await trio.to_thread.run_sync(self._hash_piece, store, number)
                    self._sha_next += 1
                if self._sha_next >= store.layout.count:
                    return
            await self._wait_change()

    def _hash_piece(self, store: TaskStore, number: int) -> None:
        store.feed(number, self._sha.update)

    async def _finish_sha(self) -> None:
        store = self.store
        assert store is not None and store.complete()
        while self._sha_next < store.layout.count:
            await trio.to_thread.run_sync(self._hash_piece, store, self._sha_next)
            self._sha_next += 1
        actual = "sha256:" + self._sha.hexdigest()
        if actual != self.task_id:
            raise IntegrityError(f"assembled blob is {short(actual)}, not {short(self.task_id)}")

    async def _final_sync(self) -> None:
        sched = self.daemon.scheduler
        if sched is None or not self.registered:
            return
        assert self.store is not None
        try:
            # Bad parents found in the last moments are reported too, not lost with the sync loop.
            await sched.call("/v1/tasks/sync", wire.Sync(
                host_id=self.daemon.host_id, task_id=self.task_id, new_pieces=list(self.store.pieces),
                have_digests=len(self.digests), bad_parents=sorted(self._bad),
                failed_parents=sorted(self._failed), done=True, content_length=self.content_length), wire.SyncReply)
            self._bad.clear()
            self._failed.clear()
        except (UpstreamError, P2PError):
            pass  # the periodic announce will tell it

    # -- back to source -------------------------------------------------------------------

    async def _back_to_source(self) -> None:
        """Fetch every missing piece from the origin, resuming at the first missing byte."""
        origin = self.daemon.origin
        metrics = self.daemon.metrics
        attempts = 0
        while True:
            store = self.store
            missing = [] if store is None else [n for n in range(store.layout.count) if n not in store.pieces]
            if store is not None and not missing:
                return
            start = 0 if store is None else store.layout.start(missing[0])
            try:
                async with origin.open_blob(self.url, self.headers, start=start) as body:
                    if store is None:
                        store = self._open_store(body.blob_size)
                    elif body.blob_size != store.layout.blob_size:
                        raise IntegrityError(f"origin says the blob has {body.blob_size} bytes, "
                                             f"expected {store.layout.blob_size}")
                    await self._write_stream(store, body.start, body.chunks())
            except OriginError as exc:
                attempts += 1
                status = exc.status
                if status is not None and 400 <= status < 500 or attempts >= 4:
                    raise
                metrics.pieces.labels("origin", "failed").inc()
                delay = min(8.0, 0.5 * 2 ** attempts) * (0.5 + self.rng.random())
                log.warning("task %s: origin failed (%s); retrying in %.1fs", short(self.task_id), exc, delay)
                await trio.sleep(delay)

    async def _write_stream(self, store: TaskStore, offset: int, chunks: object) -> None:
        """Cut an in-order byte stream starting at `offset` into pieces and store the missing ones."""
        layout = store.layout
        metrics = self.daemon.metrics
        number = offset // layout.piece_size
        if layout.start(number) != offset:
            raise OriginError("origin range did not start on a piece boundary")
        writer = None if store.has(number) else store.new_piece(number)
        hasher = PieceHasher()
        filled = 0
        bucket = self.daemon.download_bucket
        try:
            async for chunk in chunks:  # type: ignore[attr-defined]
                if bucket is not None:
                    await bucket.take(len(chunk))
                metrics.download_bytes.labels("origin").inc(len(chunk))
                view = memoryview(chunk)
                while view:
                    want = layout.length(number) - filled
                    part, view = view[:want], view[want:]
                    if writer is not None:
                        writer.write(part)
                        hasher.update(part)
                    filled += len(part)
                    if filled == layout.length(number):
                        if writer is not None:
                            digest = hasher.digest()
                            if number < len(self.digests) and self.digests[number] != digest:
                                log.warning("task %s: origin's piece %d differs from the seed's digest",
                                            short(self.task_id), number)
                            writer.commit()
                            if number >= len(self.digests):
                                self.digests.extend([b""] * (number - len(self.digests) + 1))
                            self.digests[number] = digest
                            self._save_digests()
                            metrics.pieces.labels("origin", "verified").inc()
                            self._to_report.append(number)
                            self._notify()
                        number += 1
                        filled = 0
                        hasher = PieceHasher()
                        if number >= layout.count:
                            return
                        writer = None if store.has(number) else store.new_piece(number)
        finally:
            if writer is not None:
                writer.abort()


def _verify_and_write(hasher: PieceHasher, writer: PieceWriter) -> Callable[[memoryview], None]:
    def sink(chunk: memoryview) -> None:
        hasher.update(chunk)
        writer.write(chunk)
    return sink


def _reason_label(reason: str) -> str:
    for label in ("scheduler", "seed", "size", "no piece"):
        if label in reason:
            return label.replace(" ", "_")
    return "other"

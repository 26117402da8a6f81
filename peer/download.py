"""One task's download on a peer: the trio shell around peer/machine.py's TaskMachine.

The machine decides which pieces to ask which parent for, whom to avoid, when to ask the
scheduler and when to go back to the origin. This class moves the bytes and the time: piece
transfers from parents, one news poll per parent (peer/parentnews.py), scheduler calls when
the machine says, store writes, the blob's sha256. Every piece is checked against the seed's
BLAKE3 digest before it is renamed into the store, and the whole blob against its sha256.
When P2P cannot deliver, the download goes back to the origin.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from p2pdist import wire
from p2pdist.content.digest import PIECE_DIGEST_BYTES, PieceHasher, short
from p2pdist.content.pieces import Bitmap, bits_from_bytes, piece_size_sent
from p2pdist.errors import IntegrityError, OriginError, P2PError, StoreError, UpstreamError
from p2pdist.node.intake import PieceIntake
from p2pdist.node.pieceserver import KIND_HEADER, PIECES_HEADER, parse_pieces_header
from p2pdist.registry.retry import ORIGIN_RETRY
from p2pdist.storage.store import PieceWriter, TaskStore
from p2pdist.transport.piececlient import PieceResponse
from peer.machine import Limits, PieceOutcome, PieceRequest, Report, TaskMachine
from peer.parentnews import NewsEnd, follow_news
from peer.sitepeers import agreeing

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

log = logging.getLogger("p2pdist.peer")

# With peer news, a parent (not a seed: its news also carries digests) is polled for news only
# when nothing is in flight to it and none of its piece answers came for this long: until then
# those answers tell its news (see peer/parentnews.py).
NEWS_QUIET_S = 1.0


class TaskDownload:
    def __init__(
        self,
        daemon: PeerDaemon,
        task_id: str,
        url: str,
        headers: dict[str, str],
        store: TaskStore | None = None,
        *,
        size_hint: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.size_hint = size_hint
        self.task_id = task_id
        self.url = url
        self.headers = headers
        self.store = store
        self.error: P2PError | None = None
        self.back_to_source_reason = ""
        self.parent_kinds: dict[str, str] = {}  # host id → "seed" or "peer", as its pieces said
        self.bytes_from = {"peer": 0, "seed": 0, "origin": 0}  # verified bytes, by where they came from
        self.verified = False
        self.finished = trio.Event()
        self._changed = trio.Event()
        self.rng = random.Random()
        self.machine = TaskMachine(
            daemon.host_id, Limits.from_config(daemon.config), self.rng, time.monotonic(), label=short(task_id)
        )
        self._sha = hashlib.sha256()
        self._sha_next = 0
        self.attestation = b""  # a seed's signature over the digests, once the scheduler relays one
        self._held_at_open = False  # pieces from an earlier run: verified against saved digests
        self._digests_saved = 0  # digests in the store's file: every held piece's is among them
        self._fatal: P2PError | None = None  # ends the download: nothing to retry elsewhere
        self._owner: str | None = None  # the scheduler this download is registered with
        # host id -> (when, version): the last piece answer from that parent that said what it holds
        self._heard: dict[str, tuple[float, int]] = {}
        # host id -> set when a transfer from that parent ends: its news poll, if waiting, looks
        # again; `_failed_from` holds those whose transfer failed (the poll then checks at once)
        self._transfer_ended: dict[str, trio.Event] = {}
        self._failed_from: set[str] = set()

    # -- what readers use -----------------------------------------------------------------

    @property
    def content_length(self) -> int | None:
        return None if self.store is None else self.store.layout.blob_size

    @property
    def registered(self) -> bool:
        return self.machine.registered

    @property
    def digests(self) -> list[bytes]:
        return self.machine.digests

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

    async def wait_verified(self) -> None:
        """Return once the whole blob checked out (its sha256, or a seed's attestation); raise
        if the download failed. The final sync with the scheduler is not waited for."""
        while not self.verified:
            if self.finished.is_set():
                raise self.error or P2PError("download did not verify")
            await self._wait_change()

    def want_first(self, start: int, end: int) -> None:
        """A client's Range request waits for bytes [start, end): fetch their pieces first."""
        if self.store is not None and not self.finished.is_set() and start < end:
            pieces = self.store.layout.pieces_for_range(start, end)
            if pieces:
                self.machine.want_first(pieces[0], pieces[-1])
            self._notify()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the download ---------------------------------------------------------------------

    async def run(self) -> None:
        metrics = self.daemon.metrics
        try:
            with metrics.task_run(lambda: self.store.layout.blob_size if self.store else None) as elapsed:
                await self._p2p()
                decision = self.machine.back_to_source
                if decision is not None:
                    self.back_to_source_reason = decision.detail
                    metrics.back_to_source.labels(decision.reason.value).inc()
                    log.warning("task %s: going back to source: %s", short(self.task_id), decision.detail)
                    await self._back_to_source()
                await self._finish_sha()
                assert self.store is not None
                self.store.save_digests(self.digests)
                self.verified = True
                self._notify()  # clients waiting for the last piece go now, not after the final sync
            log.info(
                "task %s: done, %d bytes in %.2fs%s",
                short(self.task_id),
                self.store.layout.blob_size,
                elapsed(),
                " (back to source)" if self.back_to_source_reason else "",
            )
            await self._final_sync()
        except P2PError as exc:
            self.error = exc
            log.error("task %s: failed: %s", short(self.task_id), exc)
            if isinstance(exc, IntegrityError | StoreError) and self.store is not None:
                self.daemon.store.remove(self.task_id)
                self.daemon.spawn(self.daemon.leave, self.task_id)  # or the scheduler keeps it as a holder
        finally:
            self.finished.set()
            self._notify()

    async def _p2p(self) -> None:
        """Fetch from parents until every piece is held or the machine gives up on P2P."""
        machine = self.machine
        pool = self.daemon.scheduler
        site_reply: wire.SyncReply | None = None  # the site's holders, asked when no scheduler answers
        try:
            reply, self._owner = await pool.call_task(
                self.task_id, "/v1/tasks/register", self._register_message(), wire.SyncReply
            )
        except (UpstreamError, P2PError) as exc:
            self.daemon.metrics.scheduler_errors.inc()
            status = getattr(exc, "upstream_status", None)
            refused = status is not None and 400 <= status < 500
            site_reply = None if refused else await self._site_reply()
            if site_reply is None:
                machine.register_failed(str(exc), refused=refused)
                return
            log.warning(
                "task %s: no scheduler answered (%s); fetching from %d host(s) of the site that hold it",
                short(self.task_id),
                exc,
                len(site_reply.parents),
            )
            reply = site_reply
        self._answered(None, reply)
        if site_reply is not None:
            # No scheduler knows of this download: the sync loop registers it with the first
            # one that answers again, and until then nothing waits on a scheduler call.
            self.machine.scheduler_changed()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync_loop)
            if machine.limits.peer_news:
                nursery.start_soon(self._follow_parents)
            if self.daemon.attest_check is None:
                # Hash as pieces arrive. With seeds' keys configured the blob is hashed only
                # if no seed attests it by the end (see _finish_sha).
                nursery.start_soon(self._sha_loop)
            await self._fetch_loop(nursery)
            nursery.cancel_scope.cancel()
        if self._fatal is not None:
            raise self._fatal

    async def _fetch_loop(self, nursery: trio.Nursery) -> None:
        machine = self.machine
        while self._fatal is None:
            now = time.monotonic()
            for request in machine.poll(now):
                nursery.start_soon(self._fetch_piece, request)
            if machine.finished:
                return
            with trio.move_on_after(max(0.0, machine.wake_at(now) - now)):
                await self._wait_change()

    # -- the scheduler --------------------------------------------------------------------

    async def _site_reply(self) -> wire.SyncReply | None:
        """No scheduler answers: the hosts of this site that hold the blob whole, asked directly
        (peer/sitepeers.py), as the answer a scheduler would have given; None if none does.
        Their pieces are checked against their BLAKE3 digests and the blob against its sha256,
        as any parent's."""
        holders = agreeing(await self.daemon.site.find(self.task_id))
        if not holders:
            return None
        digests = list(holders[0].piece_digests)
        whole = Bitmap(len(digests))
        for number in range(len(digests)):
            whole.add(number)
        return wire.SyncReply(
            task_id=self.task_id,
            state="running",
            content_length=holders[0].size,
            piece_size=holders[0].piece_size,
            piece_digests=digests,
            parents=[wire.Parent(host_id=h.host_id, url=h.url, pieces=whole.to_bytes()) for h in holders],
        )

    def _register_message(self) -> wire.Register:
        return wire.Register(
            host_id=self.daemon.host_id,
            task_id=self.task_id,
            url=self.url,
            headers=self.headers,
            content_length=self.size_hint,
        )

    def _answered(self, report: Report | None, reply: wire.SyncReply) -> None:
        """Feed a scheduler's reply to the machine; open the store once the size is known."""
        machine = self.machine
        if report is None:
            machine.register_answered(reply, time.monotonic())
        else:
            machine.sync_answered(report, reply, time.monotonic())
        if machine.wants_store:
            assert machine.content_length is not None and machine.piece_size is not None
            self._open_store(machine.content_length, machine.piece_size)
        if reply.attestation:
            self.attestation = reply.attestation
        self._notify()

    def _follow_owner(self) -> str | None:
        """The scheduler that owns this task now. When that is not the one this download is
        registered with (it stopped answering, or came back), the machine registers again with
        everything it holds; the parents it has keep serving meanwhile."""
        owner = self.daemon.scheduler.owner(self.task_id)
        if owner is not None and owner != self._owner:
            log.info("task %s: scheduler %s owns it now (was %s)", short(self.task_id), owner, self._owner)
            self._owner = owner
            self.machine.scheduler_changed()
        return owner

    async def _sync_loop(self) -> None:
        """Sync when the machine says (see TaskMachine.next_sync_at for when, and the bound);
        any event may bring that forward, so the time is asked again after each."""
        pool = self.daemon.scheduler
        machine = self.machine
        while True:
            # A new owner (its scheduler stopped answering, or came back) makes a sync due.
            owner = self._follow_owner()
            now = time.monotonic()
            due = machine.next_sync_at(now)
            if now < due:
                if machine.limits.peer_news:
                    with trio.move_on_after(due - now):
                        await self._wait_change()
                else:
                    await trio.sleep(due - now)  # a fixed clock: events change nothing
                continue
            report = machine.take_report(now)
            try:
                if owner is None:
                    raise UpstreamError("no scheduler configured")
                if report.register:
                    await pool.call(owner, "/v1/tasks/register", self._register_message(), wire.SyncReply)
                reply = await pool.call(
                    owner,
                    "/v1/tasks/sync",
                    wire.Sync(
                        host_id=self.daemon.host_id,
                        task_id=self.task_id,
                        new_pieces=report.new_pieces,
                        have_digests=report.have_digests,
                        bad_parents=report.bad_parents,
                        failed_parents=report.failed_parents,
                        content_length=report.content_length,
                        piece_size=None
                        if report.content_length is None or report.piece_size is None
                        else piece_size_sent(report.content_length, report.piece_size),
                    ),
                    wire.SyncReply,
                )
            except (UpstreamError, P2PError) as exc:
                machine.sync_failed(report, time.monotonic())
                self.daemon.metrics.scheduler_errors.inc()
                log.warning(
                    "task %s: scheduler sync failed (%d in a row): %s", short(self.task_id), machine.sync_failures, exc
                )
                self._notify()
                continue
            self._answered(report, reply)

    # -- parents' news ---------------------------------------------------------------------

    async def _follow_parents(self) -> None:
        """One news poll per parent the machine holds; a parent it drops has its poll cancelled."""
        polls: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                parents = self.machine.parents
                for host_id in [h for h in polls if h not in parents]:
                    polls.pop(host_id).cancel()
                for host_id, parent in parents.items():
                    if host_id not in polls:
                        polls[host_id] = scope = trio.CancelScope()
                        nursery.start_soon(self._follow_parent, host_id, parent.url, scope)
                await self._wait_change()

    async def _follow_parent(self, host_id: str, url: str, scope: trio.CancelScope) -> None:
        with scope:
            end, why = await follow_news(
                self.daemon.piece_client,
                url,
                self.task_id,
                known_digests=lambda: len(self.machine.digests),
                on_news=lambda news: self._parent_news(host_id, news),
                heard=lambda: self._heard.get(host_id, (0.0, 0))[1],
                quiet=lambda: self._out_of_touch(host_id),
            )
            if end is NewsEnd.LOST:
                log.warning("task %s: parent %s lost: %s", short(self.task_id), host_id, why)
                self.machine.parent_lost(host_id, time.monotonic())
                self._notify()
            else:
                log.info("task %s: no news from %s (%s)", short(self.task_id), host_id, why)

    async def _out_of_touch(self, host_id: str) -> None:
        """Return once a news poll of this parent is worth its answers: it is a seed (its news
        brings digests), or nothing is in flight to it and no piece answer of its came for
        NEWS_QUIET_S, or a transfer from it failed (the poll then finds out whether it is gone)."""
        while True:
            parent = self.machine.parents.get(host_id)
            if parent is None or parent.seed:
                return
            if host_id in self._failed_from:
                self._failed_from.discard(host_id)
                return
            if parent.inflight:
                # No timer: a timer per parent and child firing costs what a piece request does.
                ended = self._transfer_ended.setdefault(host_id, trio.Event())
                await ended.wait()
                continue
            quiet_at = self._heard.get(host_id, (0.0, 0))[0] + NEWS_QUIET_S
            if time.monotonic() >= quiet_at:
                return
            await trio.sleep_until(quiet_at - time.monotonic() + trio.current_time())

    def _parent_said(self, host_id: str, value: str | None) -> None:
        """A parent's piece answer said what it holds (PIECES_HEADER): news, without a poll."""
        machine = self.machine
        if value is None or not machine.count:
            return
        said = parse_pieces_header(value, machine.count)
        if said is None:
            return
        version, bitmap = said
        now = time.monotonic()
        self._heard[host_id] = (now, version)
        machine.parent_news(host_id, bits_from_bytes(bitmap), now)

    def _parent_news(self, host_id: str, news: wire.PieceNews) -> None:
        machine = self.machine
        if news.pieces and len(news.pieces) != (machine.count + 7) // 8:
            return  # not a bitmap of this blob as we know it
        machine.parent_news(
            host_id,
            bits_from_bytes(news.pieces) if news.pieces else 0,
            time.monotonic(),
            first_digest=news.first_digest,
            digests=news.piece_digests,
        )
        self._notify()

    async def _final_sync(self) -> None:
        if not self.registered:
            return
        assert self.store is not None
        # Bad parents found in the last moments are reported too, not lost with the sync loop.
        report = self.machine.take_report()
        try:
            await self.daemon.scheduler.call_task(
                self.task_id,
                "/v1/tasks/sync",
                wire.Sync(
                    host_id=self.daemon.host_id,
                    task_id=self.task_id,
                    new_pieces=list(self.store.pieces),
                    have_digests=len(self.digests),
                    bad_parents=report.bad_parents,
                    failed_parents=report.failed_parents,
                    done=True,
                    content_length=self.content_length,
                    piece_size=self._piece_size_sent(),
                ),
                wire.SyncReply,
            )
        except (UpstreamError, P2PError):
            pass  # the periodic announce will tell it

    # -- the store ------------------------------------------------------------------------

    def _open_store(self, content_length: int, piece_size: int | None) -> TaskStore:
        """The task's store, cut at `piece_size` (the scheduler's; None: the rule's, for a
        download that went to the origin before any scheduler answered)."""
        store = self.store = self.daemon.store.open(self.task_id, content_length, self.url, piece_size)
        held = store.pieces.to_int()
        self._held_at_open = held != 0
        self.machine.store_opened(content_length, held, store.load_digests() if held else [], store.layout.piece_size)
        self._notify()
        return store

    def _piece_size_sent(self) -> int | None:
        """The store's piece size as a Sync carries it beside the size."""
        if self.store is None:
            return None
        return piece_size_sent(self.store.layout.blob_size, self.store.layout.piece_size)

    def _save_digests(self) -> None:
        """Keep the known digests beside the pieces, so that after a crash the verified pieces
        of an unfinished download can be checked and reused, not refetched. Called when a
        stored piece's digest is not in the file yet (see _piece_stored), not on every reply
        that brings digests: a file written per sync was a tenth of a peer's event loop in
        the 16-host rollout. A piece whose digest did not make it into the file before a
        crash is dropped at the restart and fetched again."""
        if self.store is None:
            return
        known = []
        for digest in self.digests:
            if len(digest) != PIECE_DIGEST_BYTES:
                break  # a gap: later digests would be read against the wrong pieces
            known.append(digest)
        try:
            self.store.save_digests(known)
            self._digests_saved = len(known)
        except StoreError as exc:
            log.info("task %s: piece digests not saved: %s", short(self.task_id), exc)

    # -- pieces from parents --------------------------------------------------------------

    async def _fetch_piece(self, request: PieceRequest) -> None:
        """One request the machine asked for: transfer it, then tell the machine how it went."""
        metrics = self.daemon.metrics
        started = time.monotonic()
        try:
            outcome = await self._transfer(request)
        except StoreError as exc:
            self._fatal = exc
            self.machine.piece_abandoned(request.number)
            metrics.pieces.labels("peer", PieceOutcome.FAILED.value).inc()
            self._notify()
            return
        self.machine.piece_done(request.number, outcome, time.monotonic())
        if outcome is PieceOutcome.FAILED:
            self._failed_from.add(request.host_id)
        if (ended := self._transfer_ended.pop(request.host_id, None)) is not None:
            ended.set()
        if outcome is PieceOutcome.VERIFIED and request.number >= self._digests_saved:
            self._save_digests()
        source = self.parent_kinds.get(request.host_id, "peer")
        metrics.pieces.labels(source, outcome.value).inc()
        if outcome is PieceOutcome.VERIFIED:
            metrics.piece_seconds.labels(source).observe(time.monotonic() - started)
        self._notify()

    async def _transfer(self, request: PieceRequest) -> PieceOutcome:
        """Fetch one piece into the store under its timeout; say what happened, decide nothing.
        A StoreError (our disk) propagates."""
        store = self.store
        assert store is not None
        config = self.daemon.config
        length = store.layout.length(request.number)
        timeout = config.piece_timeout_s + config.piece_timeout_per_mib_s * length / (1 << 20)
        try:
            with trio.fail_after(timeout):
                return await self._receive(request, store, length)
        except trio.TooSlowError:
            log.info(
                "task %s: piece %d from %s timed out after %.1fs",
                short(self.task_id),
                request.number,
                request.host_id,
                timeout,
            )
            return PieceOutcome.FAILED
        except IntegrityError as exc:
            log.warning("task %s: %s", short(self.task_id), exc)
            return PieceOutcome.CORRUPT
        except UpstreamError as exc:
            log.info("task %s: piece %d from %s failed: %s", short(self.task_id), request.number, request.host_id, exc)
            return PieceOutcome.FAILED

    async def _receive(self, request: PieceRequest, store: TaskStore, length: int) -> PieceOutcome:
        number = request.number
        url = f"{request.url}/v1/tasks/{self.task_id}/pieces/{number}"
        async with self.daemon.piece_client.get(url, {"x-p2pdist": "1"}) as response:
            self._parent_said(request.host_id, response.headers.get(PIECES_HEADER))
            if response.status == 404:
                return PieceOutcome.ABSENT
            if response.status == 503:
                return PieceOutcome.BUSY
            if response.status != 200:
                raise UpstreamError(f"parent answered HTTP {response.status}")
            # Seed or peer, as the parent says: only the metrics' source label depends on it.
            source = "seed" if response.headers.get(KIND_HEADER) == "seed" else "peer"
            self.parent_kinds[request.host_id] = source
            if response.length != length:
                raise IntegrityError(f"{request.host_id} offered {response.length} bytes for a {length}-byte piece")
            writer = store.new_piece(number)
            expected = self.digests[number]  # known: the machine asks only for pieces it can verify
            try:
                hasher = await self._receive_body(response, writer, source, expected)
                if hasher.digest() != expected:
                    raise IntegrityError(f"piece {number} from {request.host_id} failed verification")
            except BaseException:
                writer.abort()
                raise
            writer.commit()
            return PieceOutcome.VERIFIED

    async def _receive_body(
        self, response: PieceResponse, writer: PieceWriter, source: str, expected: bytes
    ) -> PieceHasher:
        """The body hashed and written; received in a worker thread, the piece is also renamed
        into place there if its digest is `expected` (the caller checks it again, and counts it
        held or removes it)."""
        hasher = PieceHasher()
        bucket = self.daemon.download_bucket
        if bucket is None and response.can_drain_in_thread:
            await response.drain_in_thread(
                _verify_and_write(hasher, writer), then=partial(_place_if_verified, hasher, writer, expected)
            )
        else:
            async for chunk in response.chunks():
                if bucket is not None:
                    await bucket.take(len(chunk))
                hasher.update(chunk)
                writer.write(chunk)
        self.daemon.metrics.download_bytes.labels(source).inc(hasher.length)
        self.bytes_from[source] += hasher.length
        return hasher

    # -- the blob's sha256 ----------------------------------------------------------------

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
        if await self._attested(store):
            self.daemon.blob_checks.labels("attested").inc()
            log.info("task %s: sha256 not hashed again: a seed attested these piece digests", short(self.task_id))
            return
        self.daemon.blob_checks.labels("hashed").inc()
        while self._sha_next < store.layout.count:
            await trio.to_thread.run_sync(self._hash_piece, store, self._sha_next)
            self._sha_next += 1
        actual = "sha256:" + self._sha.hexdigest()
        if actual != self.task_id:
            raise IntegrityError(
                f"digest mismatch: the blob's bytes hash to {short(actual)}, not {short(self.task_id)} "
                "(the registry or a seed served corrupt data); nothing was kept"
            )

    async def _attested(self, store: TaskStore) -> bool:
        """Verify once: whether a seed whose public key this peer holds signed, after checking the
        blob's sha256, exactly the piece digests every piece here was checked against. Not for
        bytes that entered the swarm here (back to source), nor pieces kept from an earlier
        run (checked against saved digests, not this list)."""
        check = self.daemon.attest_check
        if check is None or self.bytes_from["origin"] or self._held_at_open:
            return False
        if not self.attestation and self.registered:
            await self._ask_for_attestation(store)
        return bool(self.attestation) and check.verify(
            self.attestation, self.task_id, store.layout.blob_size, self.digests
        )

    async def _ask_for_attestation(self, store: TaskStore) -> None:
        """One sync for the attestation a seed may have sent since the last one: seeds finish
        their sha256 before the last piece reaches anyone, so it is usually there."""
        try:
            reply, _ = await self.daemon.scheduler.call_task(
                self.task_id,
                "/v1/tasks/sync",
                wire.Sync(
                    host_id=self.daemon.host_id,
                    task_id=self.task_id,
                    new_pieces=[],
                    have_digests=len(self.digests),
                    content_length=store.layout.blob_size,
                    piece_size=self._piece_size_sent(),
                ),
                wire.SyncReply,
            )
        except (UpstreamError, P2PError):
            return  # hashed, as without attestations
        self.attestation = reply.attestation or self.attestation

    # -- back to source -------------------------------------------------------------------

    def _origin_bytes(self, n: int) -> None:
        self.daemon.metrics.download_bytes.labels("origin").inc(n)
        self.bytes_from["origin"] += n

    async def _back_to_source(self) -> None:
        """Fetch every missing piece from the origin, resuming at the first missing byte."""
        metrics = self.daemon.metrics
        intake: PieceIntake | None = None
        failures = 0
        while True:
            store = self.store
            start = 0
            if store is not None:
                missing = next((n for n in range(store.layout.count) if n not in store.pieces), None)
                if missing is None:
                    return
                start = store.layout.start(missing)
            try:
                async with self.daemon.origin.open_blob(self.url, self.headers, start=start) as body:
                    if store is None:
                        machine = self.machine
                        same = machine.content_length == body.blob_size
                        store = self._open_store(body.blob_size, machine.piece_size if same else None)
                    elif body.blob_size != store.layout.blob_size:
                        raise IntegrityError(
                            f"origin says the blob has {body.blob_size} bytes, expected {store.layout.blob_size}"
                        )
                    if intake is None:
                        intake = PieceIntake(
                            store,
                            bucket=self.daemon.download_bucket,
                            on_bytes=self._origin_bytes,
                            on_piece=self._from_origin,
                        )
                    await intake.write(body.start, body.chunks())
            except OriginError as exc:
                failures += 1
                delay = ORIGIN_RETRY.retry_after(failures, exc, self.rng)
                if delay is None:
                    raise
                metrics.pieces.labels("origin", "failed").inc()
                log.warning("task %s: origin failed (%s); retrying in %.1fs", short(self.task_id), exc, delay)
                await trio.sleep(delay)

    def _from_origin(self, number: int, digest: bytes) -> None:
        if self.machine.piece_from_origin(number, digest):
            log.warning("task %s: origin's piece %d differs from the seed's digest", short(self.task_id), number)
        self._save_digests()
        self.daemon.metrics.pieces.labels("origin", "verified").inc()
        self._notify()


def _place_if_verified(hasher: PieceHasher, writer: PieceWriter, expected: bytes) -> None:
    """In the receiving thread, after the last byte: a piece whose digest matches is renamed
    into place there, off the event loop."""
    if hasher.digest() == expected:
        writer.place()


def _verify_and_write(hasher: PieceHasher, writer: PieceWriter) -> Callable[[memoryview], None]:
    def sink(chunk: memoryview) -> None:
        hasher.update(chunk)
        writer.write(chunk)

    return sink

"""One blob fetched by the seed from the origin: cut into pieces, digested, reported as it goes.

The seed cuts the origin's byte stream into pieces, computes their BLAKE3 digests (the list
every peer verifies against) and reports each piece to the scheduler the moment it is stored,
so peers fetch from the seed while its own download is still running. A seed taking over from
one that died part-way first takes the pieces that one already digested from the peers holding
them, so the origin sends only the rest. A site's seed in the tiered shape (`upstream`) takes
the same bytes from the core cluster's mirror instead, resuming by Range after a cut.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

import trio

from p2pdist import wire
from p2pdist.content.digest import PieceHasher, short
from p2pdist.content.pieces import OLD_MIN_PIECE_SIZE, bits_from_bytes, piece_size_for, piece_size_read, piece_size_sent
from p2pdist.errors import IntegrityError, OriginError, P2PError, UpstreamError
from p2pdist.node.intake import PieceIntake, RunningHash
from p2pdist.registry.retry import ORIGIN_RETRY
from p2pdist.storage.store import TaskStore
from p2pdist.transport.piececlient import PieceClient

if TYPE_CHECKING:
    from seed.daemon import SeedDaemon

log = logging.getLogger("p2pdist.seed")

REPORT_INTERVAL_S = 0.05
# Time allowed for one piece from a peer while resuming: as a peer's piece timeout.
RESUME_PIECE_TIMEOUT_S = 4.0
RESUME_PIECE_TIMEOUT_PER_MIB_S = 2.0


def upstream_url(url: str, upstream: str | None) -> tuple[str, str | None]:
    """Where a seed fetches the origin's blob `url`, and the origin's scheme when that is
    through `upstream` (a p2pdist mirror, asked as containerd asks one: `?ns=<registry>`)."""
    if not upstream:
        return url, None
    parts = urlsplit(url)
    return f"{upstream.rstrip('/')}{parts.path}?{urlencode({'ns': parts.netloc})}", parts.scheme


class SeedFetch:
    """One blob being fetched from the origin."""

    def __init__(self, seed: SeedDaemon, trigger: wire.SeedTrigger) -> None:
        self.seed = seed
        self.task_id = trigger.task_id
        self.url = trigger.url
        self.headers = dict(trigger.headers)
        self.trigger = trigger
        self.store: TaskStore | None = None
        self.digests: list[bytes] = []
        self.reported = 0
        self.reported_to: str | None = None  # the scheduler `reported` digests went to
        self.done = False
        self.end_reported = False  # a report sent after `done` reached the scheduler
        self.error = ""
        self.failed_at: float | None = None  # trio time the fetch failed; the record expires after it
        self.changed = trio.Event()

    def _blob_size(self) -> int | None:
        return self.store.layout.blob_size if self.store is not None else None

    async def run(self) -> None:
        try:
            with self.seed.metrics.task_run(self._blob_size) as elapsed:
                await self._fetch()
            assert self.store is not None
            log.info(
                "seeded %s: %d bytes from the %s in %.2fs",
                short(self.task_id),
                self.store.layout.blob_size,
                "upstream" if self.seed.config.upstream else "origin",
                elapsed(),
            )
        except P2PError as exc:
            self.error = str(exc)
            self.failed_at = trio.current_time()
            log.error("seeding %s failed: %s", short(self.task_id), exc)
            self.seed.store.remove(self.task_id)
        finally:
            self.done = True
            self._changed()
        await self.seed.enforce_quota()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _fetch(self) -> None:
        rng = random.Random()
        intake: PieceIntake | None = None
        resumed = await self._from_peers()
        if resumed is not None:
            assert self.store is not None
            intake = self._intake(self.store, resumed)
            intake.sha_pieces = len(self.digests)
        failures = 0
        url, through_mirror = upstream_url(self.url, self.seed.config.upstream)
        while True:
            store = self.store
            if store is not None and len(self.digests) == store.layout.count:
                break
            start = 0 if store is None else len(self.digests) * store.layout.piece_size
            held = len(self.digests)
            opened = False
            try:
                async with self.seed.origin.open_blob(
                    url, self.headers, start=start, through_mirror=through_mirror
                ) as body:
                    opened = True
                    if store is None:
                        store = self._open_store(body.blob_size)
                    elif body.blob_size != store.layout.blob_size or body.start > start:
                        raise OriginError("origin changed the blob's size or skipped bytes")
                    if intake is None:
                        # The sha256 the seed vouches for: of the origin's bytes as they pass.
                        intake = self._intake(store, hashlib.sha256())
                    await intake.write(body.start, body.chunks())
            except OriginError as exc:
                if through_mirror is not None and not opened and exc.upstream_status is None:
                    # The core's mirror cannot be reached: the WAN link is down. Fail now, so
                    # the site's peers hear it in seconds; the next pull tries again.
                    raise OriginError(f"upstream {str(exc).removeprefix('origin ')}") from None
                # A slow link is cut now and then: each try that stored pieces earns the
                # next its full set of retries, so a long transfer is not lost to old cuts.
                failures = 1 if len(self.digests) > held else failures + 1
                delay = ORIGIN_RETRY.retry_after(failures, exc, rng)
                if delay is None:
                    raise
                log.warning(
                    "origin failed for %s (%s); resuming at piece %d in %.1fs",
                    short(self.task_id),
                    exc,
                    len(self.digests),
                    delay,
                )
                await trio.sleep(delay)
        assert intake is not None and intake.sha is not None
        actual = "sha256:" + intake.sha.hexdigest()
        if actual != self.task_id:
            raise IntegrityError(f"origin sent {short(actual)} for {short(self.task_id)}")
        store.save_digests(self.digests)

    def _intake(self, store: TaskStore, sha: RunningHash) -> PieceIntake:
        return PieceIntake(
            store, sha=sha, on_bytes=self.seed.metrics.download_bytes.labels("origin").inc, on_piece=self._piece_stored
        )

    async def _from_peers(self) -> RunningHash | None:
        """Take over from a seed that died part-way: fetch the pieces it digested from the peers
        the trigger names, in order, each checked against its digest and hashed into the blob's
        sha256, up to the first piece none of them can give. Returns that sha256 (None if there
        was nothing to resume); the origin is asked for the rest."""
        trigger = self.trigger
        if trigger.content_length is None or not trigger.piece_digests or not trigger.parents:
            return None
        store = self._open_store(trigger.content_length)
        known = trigger.piece_digests[: store.layout.count]
        parents = [(p.url, p.host_id, bits_from_bytes(p.pieces)) for p in trigger.parents]
        sha: RunningHash = hashlib.sha256()
        client = PieceClient(secret=self.seed.config.cluster_secret, ssl_context=self.seed.tls_client)
        try:
            for number, digest in enumerate(known):
                for url, host_id, bits in parents:
                    if bits >> number & 1:
                        piece_sha = sha.copy()
                        if await self._piece_from(client, url, host_id, number, digest, store, piece_sha):
                            sha = piece_sha
                            break
                else:
                    break  # nobody could give it: the origin sends it and the rest
        finally:
            await client.aclose()
        log.info(
            "seeding %s: resumed with %d of %d pieces from peers; the origin sends the rest",
            short(self.task_id),
            len(self.digests),
            store.layout.count,
        )
        return sha

    async def _piece_from(
        self,
        client: PieceClient,
        url: str,
        host_id: str,
        number: int,
        digest: bytes,
        store: TaskStore,
        sha: RunningHash,
    ) -> bool:
        """One piece from one peer into the store and `sha`; False (nothing stored) if it failed."""
        length = store.layout.length(number)
        writer = store.new_piece(number)
        hasher = PieceHasher()
        try:
            with trio.fail_after(RESUME_PIECE_TIMEOUT_S + RESUME_PIECE_TIMEOUT_PER_MIB_S * length / (1 << 20)):
                async with client.get(f"{url}/v1/tasks/{self.task_id}/pieces/{number}", {"x-p2pdist": "1"}) as got:
                    if got.status != 200 or got.length != length:
                        raise UpstreamError(f"answered HTTP {got.status} with {got.length} bytes")
                    async for chunk in got.chunks():
                        hasher.update(chunk)
                        writer.write(chunk)
                        sha.update(chunk)
            if hasher.digest() != digest:
                raise IntegrityError("failed verification")
        except (UpstreamError, IntegrityError, trio.TooSlowError) as exc:
            writer.abort()
            log.info("seeding %s: piece %d from %s: %s", short(self.task_id), number, host_id, exc or "timed out")
            return False
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        self.seed.metrics.download_bytes.labels("peer").inc(length)
        self.seed.metrics.pieces.labels("peer", "verified").inc()
        self.digests.append(digest)
        self._changed()
        return True

    def _piece_size(self, blob_size: int) -> int:
        """The piece size to cut the blob at: the task's, when the trigger gives its size (a
        resumed fetch), else the scheduler's rule with the floor it sent. A trigger leaving
        them out comes from a scheduler that cut every blob by the old rule."""
        trigger = self.trigger
        if trigger.content_length == blob_size:
            return piece_size_read(blob_size, trigger.piece_size)
        return piece_size_for(blob_size, trigger.min_piece_size or OLD_MIN_PIECE_SIZE)

    def _open_store(self, blob_size: int) -> TaskStore:
        store = self.store = self.seed.store.open(self.task_id, blob_size, self.url, self._piece_size(blob_size))
        # Pieces left by an earlier, unfinished fetch have no digests this fetch computed, nor
        # a place in its sha256: fetch them again.
        for number in list(store.pieces):
            store.drop(number)
        self._changed()
        return store

    def _piece_stored(self, number: int, digest: bytes) -> None:
        assert number == len(self.digests), "the seed stores pieces in order"
        self.digests.append(digest)
        self.seed.metrics.pieces.labels("origin", "verified").inc()
        self._changed()

    async def report_loop(self) -> None:
        """Tell the task's scheduler the size and each new piece digest, batched every few ms.
        A new owner (the last one stopped answering, or came back) is told everything at once."""
        while True:
            if self.seed.scheduler.owner(self.task_id) not in (self.reported_to, None):
                self.reported = 0
            if self.store is not None and (len(self.digests) > self.reported or self.done or self.reported == 0):
                first = self.reported
                digests = self.digests[first:]
                if await self._report(self.store.layout.blob_size, first, digests, self.store.layout.piece_size):
                    self.reported = first + len(digests)
                else:
                    await trio.sleep(0.5)
                # Not before the end itself (done, or the error) went out: a report sent just
                # before the fetch failed carried neither, and the scheduler must hear the failure.
                if self.done and self.reported == len(self.digests) and self.end_reported:
                    return
            elif self.done:
                if self.error:
                    await self._report(0, 0, [], None)  # failed before the size was known
                return
            with trio.move_on_after(REPORT_INTERVAL_S):
                await self.changed.wait()
            await trio.sleep(REPORT_INTERVAL_S if not self.done else 0)

    def _attestation(self) -> bytes:
        """The seed's signature over the digests, once the whole blob's sha256 checked out: a
        fetch is done without an error only then (a blob held whole was checked when fetched;
        its digests are saved only after that)."""
        attester = self.seed.attester
        if attester is None or not self.done or self.error or self.store is None:
            return b""
        if len(self.digests) != self.store.layout.count:
            return b""
        return attester.sign(self.task_id, self.store.layout.blob_size, self.digests)

    async def _report(self, content_length: int, first: int, digests: list[bytes], piece_size: int | None) -> bool:
        """One SeedProgress to the scheduler; False (logged) if it did not take it."""
        ending = self.done
        progress = wire.SeedProgress(
            host_id=self.seed.host_id,
            task_id=self.task_id,
            content_length=content_length,
            first_digest=first,
            piece_digests=digests,
            done=self.done and not self.error,
            error=self.error,
            attestation=self._attestation(),
            piece_size=None if piece_size is None else piece_size_sent(content_length, piece_size),
        )
        try:
            _, answered = await self.seed.scheduler.call_task(self.task_id, "/v1/tasks/seed", progress, wire.Empty)
        except (UpstreamError, P2PError) as exc:
            log.warning("seed progress for %s not reported: %s", short(self.task_id), exc)
            return False
        if answered != self.reported_to and first > 0:
            # Another scheduler took it mid-report: it has not seen the earlier digests.
            self.reported_to = answered
            self.reported = 0
            return False
        self.reported_to = answered
        self.end_reported = ending
        return True

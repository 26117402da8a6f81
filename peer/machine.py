"""One task's download on a peer as a pure state machine: events in, decisions out.

No trio, no sockets, no clock: every event that needs the time is given `now`, and the random
generator is injected. peer/download.py feeds it from real transfers and scheduler calls;
benchmarks/simulate.py feeds it from a model network, so both run the same rules.

    events in                                 decisions out
    register_answered / sync_answered(reply)  poll(now) -> pieces to request, from which parent
    register_failed / sync_failed             take_report(now) -> what the next sync tells, incl.
    store_opened(size, held, digests)            parents to report as bad or failed
    piece_done(number, outcome, now)          back_to_source: a BackToSource with a typed reason
    piece_from_origin(number, digest)         next_sync_at(now), wake_at(now): when to come back
    scheduler_changed() (the task's owner)
    parent_news(host_id, pieces, now)  a parent's own word on what it holds (peer news)
    parent_lost(host_id, now)          its news connection failed: it is gone

With `Limits.peer_news`, a child hears what its parents hold from the parents themselves (a
long-poll per parent, p2pdist/node/news.py) and asks the scheduler only to get or replace
parents, to report bad ones, for digests it lacks and, rarely, to tell what it holds (see
`next_sync_at` for the rules and the bound). Without it, it syncs every SYNC_INTERVAL_S and
learns everything from the scheduler's answers.

Piece sets are ints with bit n set for piece n (as in peer/selection.py), which keeps a
decision cheap at thousands of simulated hosts.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from p2pdist.content.pieces import PieceLayout, bits_from_bytes, piece_size_for, piece_size_problem, piece_size_read
from peer.selection import ParentView, choose_requests, per_parent_limit

if TYPE_CHECKING:
    from p2pdist import wire
    from p2pdist.config import PeerConfig

log = logging.getLogger("p2pdist.peer")

SYNC_INTERVAL_S = 0.2
IDLE_SYNC_INTERVAL_S = 1.0
MAX_SYNC_INTERVAL_S = 2.0  # the back-off after failed syncs stops growing here
BUSY_S = 0.5  # a parent that answered 503 (after its queue wait) is left alone this long
STALL_S = 30.0  # nothing in flight and no piece for this long: back to source
PARENT_FAILURES = 2  # failed transfers in a row before a parent is blocked
PARENT_ABSENT = 3  # 404s for pieces a parent claims before it is treated as failing
BLOCK_S = 30.0  # a blocked parent is not asked again, nor taken from the scheduler, this long
# With peer news, the scheduler's request rate per task is bounded by a token bucket: at most
# SYNC_BURST syncs at once, refilled at SYNC_RATE_PER_S, never two within SYNC_INTERVAL_S.
# Syncs while the blob's size is unknown are not charged: until the seed's first answer from the
# origin a child has no parent to hear news from, and asks every SYNC_INTERVAL_S as without news
# (a bucket emptied there held a pull's first byte back by up to a second under load).
SYNC_BURST = 3
SYNC_RATE_PER_S = 1.0
STEADY_SYNC_INTERVAL_S = 5.0  # nothing to ask: tell the scheduler what we hold this often
# ...and as soon as this share of the blob's pieces is new since the last report, so that the
# scheduler offers others parents by what they hold now: about REPORT_SHARES syncs per download.
REPORT_SHARES = 8
SHORT_S = 1.0  # on average under half the concurrent pieces in flight this long: ask for parents
# ...give or take this share of it, drawn at each answer: hosts that registered together (a
# rollout) are all short of pieces together at first, and asked the scheduler for parents in
# the same tenth of a second (850 of 1,000 hosts in 0.3 s, a second after the registrations).
SHORT_JITTER = 0.25


class BackToSourceReason(StrEnum):
    """Why a download went to the origin itself; the values are the metric's labels."""

    NO_SCHEDULER = "no_scheduler"
    SCHEDULER_UNREACHABLE = "scheduler_unreachable"
    SCHEDULER_SAID = "scheduler_said"
    SIZE_UNKNOWN = "size_unknown"
    STALLED = "stalled"
    BAD_REPLY = "bad_reply"  # the scheduler's layout is unusable, or not the one the store is cut at


@dataclass(frozen=True)
class BackToSource:
    reason: BackToSourceReason
    detail: str  # for people: logs, TaskDownload.back_to_source_reason


class PieceOutcome(StrEnum):
    """What one request to a parent came to; the values are the pieces metric's labels."""

    VERIFIED = "verified"
    CORRUPT = "corrupt"  # bytes that failed their digest, or the wrong length: a bad parent
    ABSENT = "absent"  # 404 for a piece the scheduler said it holds
    BUSY = "busy"  # 503: its upload slots and line were full
    FAILED = "failed"  # connection failed, timed out, any other answer


class PieceRequest(NamedTuple):
    number: int
    host_id: str
    url: str


@dataclass(frozen=True)
class Report:
    """What the next sync tells the scheduler."""

    register: bool  # the scheduler forgot this task: register again before syncing
    new_pieces: list[int]
    bad_parents: list[str]
    failed_parents: list[str]
    have_digests: int
    content_length: int | None
    piece_size: int | None  # with content_length: the store's


# Pieces in flight per task when not configured: at least this many, and more on a fast link.
MIN_CONCURRENT_PIECES = 8


def concurrent_pieces_for(upload_slots: int) -> int:
    """Pieces in flight for a host whose parents, like itself, split their upload over
    `upload_slots` uploads: as many as it takes to fill its own download from parents that
    share their links that way, and half again for the requests waiting in a busy parent's line
    (benchmarks/README.md, issue 17: at 100 MiB/s, 8 slots and 12 pieces kept 92-93% of the
    swarm's upload busy where 4 and 8 kept 87-89%)."""
    return max(MIN_CONCURRENT_PIECES, upload_slots + upload_slots // 2)


@dataclass(frozen=True)
class Limits:
    concurrent_pieces: int = 8
    per_parent_pieces: int = 1
    schedule_rounds: int = 4
    wait_for_seed_s: float = 60.0
    peer_news: bool = False  # parents' bitmaps come from their news, not from every sync reply

    @classmethod
    def from_config(cls, config: PeerConfig) -> Limits:
        return cls(
            concurrent_pieces=config.concurrent_pieces or concurrent_pieces_for(config.effective_upload_slots()),
            per_parent_pieces=config.per_parent_pieces,
            schedule_rounds=config.schedule_rounds,
            wait_for_seed_s=config.wait_for_seed_s,
            peer_news=config.peer_news,  # the daemon then follows each parent's news (peer/parentnews.py)
        )


class Parent:
    """What this download knows of one parent."""

    __slots__ = ("host_id", "url", "pieces", "seed", "inflight", "failures", "busy_until", "absent")

    def __init__(self, host_id: str, url: str, pieces: int, *, seed: bool = False) -> None:
        self.host_id = host_id
        self.url = url
        self.pieces = pieces  # bit n: holds piece n, as of the scheduler's last answer or its news
        self.seed = seed  # the scheduler says it is a seed: its news may carry piece digests
        self.inflight = 0
        self.failures = 0  # failed transfers since its last verified piece
        self.busy_until = 0.0
        self.absent = 0  # pieces it was said to hold but answered 404 for


class TaskMachine:
    """The rules of one task's download: which pieces to ask whom for, whom to avoid, when to
    give up on P2P. `label` names the task in logs."""

    def __init__(self, host_id: str, limits: Limits, rng: random.Random, now: float, *, label: str = "") -> None:
        self.host_id = host_id
        self.limits = limits
        self.rng = rng
        self.label = label
        self.content_length: int | None = None
        self.piece_size: int | None = None  # the task's, with content_length
        self.count = 0  # pieces, once the size is known
        self.store_open = False
        self.have = 0
        self.digests: list[bytes] = []  # the seed's, piece n's at n; pieces past the end can't be verified yet
        self.parents: dict[str, Parent] = {}
        self.blocked: dict[str, float] = {}  # host id -> until when
        self.inflight: dict[int, Parent] = {}  # piece -> the parent asked for it
        self.inflight_bits = 0
        self.wanted = 0  # pieces a client's Range request waits for: asked for before the rest
        self.registered = False
        self.back_to_source: BackToSource | None = None
        self._whole = 0
        self._to_report: list[int] = []
        self._bad: set[str] = set()
        self._failed: set[str] = set()
        self._sync_failures = 0
        self._last_progress = now
        self._waiting_since: float | None = None
        self._answered_at = now  # the last sync's answer (or failure)
        self._tokens = float(SYNC_BURST)  # the sync bucket, as of _tokens_at
        self._tokens_at = now
        self._flight_area = 0.0  # integral of pieces in flight over time since _answered_at
        self._flight_at = now
        self.short_s = SHORT_S  # SHORT_S with its jitter, drawn at each answer

    # -- state ----------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.store_open and self.have == self._whole

    @property
    def finished(self) -> bool:
        """Nothing more to do over P2P: every piece held, or going back to source."""
        return self.back_to_source is not None or self.complete

    @property
    def wants_store(self) -> bool:
        """The size is known and the store not opened yet: answer with `store_opened`."""
        return self.content_length is not None and not self.store_open

    @property
    def sync_failures(self) -> int:
        """Syncs failed in a row."""
        return self._sync_failures

    def sync_delay(self) -> float:
        interval = SYNC_INTERVAL_S if (self._to_report or not self.complete) else IDLE_SYNC_INTERVAL_S
        return min(MAX_SYNC_INTERVAL_S, interval * 2.0**self._sync_failures)

    def next_sync_at(self, now: float) -> float:
        """When to send the next sync (`take_report(now)`), if no event comes first: events can
        only bring it forward, so a caller re-asks after each.

        Without peer news: SYNC_INTERVAL_S after the last answer (backing off after failures).
        With it, the scheduler is asked only when there is something to ask:
        - at once: to register again; while the blob's size is unknown; to report a bad or
          failed parent (and get another); when no parent is left, or every parent holds the
          whole blob yet nothing we lack; when a parent holds pieces whose digests we lack;
        - when, at least SHORT_S (± SHORT_JITTER) after the last answer, fewer than half of `concurrent_pieces`
          were in flight on average since it, and pieces not in flight are left (its parents
          are busy, or hold nothing we lack; news from parents still downloading comes first);
        - else every STEADY_SYNC_INTERVAL_S, to tell what we hold.
        "At once" is still at least SYNC_INTERVAL_S after the last answer and within the token
        bucket, so a task sends at most SYNC_BURST + SYNC_RATE_PER_S·T syncs in any T seconds,
        besides its first register, its last `done` sync, and one every SYNC_INTERVAL_S while
        the blob's size is unknown (until the seed's first answer from the origin)."""
        if self.finished:
            return float("inf")
        base = self._answered_at
        if not self.limits.peer_news or self._sizing():
            return base + self.sync_delay()
        soonest = max(base + self.sync_delay(), self._tokens_ready_at())
        if self._sync_failures or self._urgent():
            return soonest
        return max(min(base + STEADY_SYNC_INTERVAL_S, self._short_at()), soonest)

    def _sizing(self) -> bool:
        """Registered, and waiting for the scheduler to learn the blob's size."""
        return self.registered and self.content_length is None

    def _short_at(self) -> float:
        """When the average of pieces in flight since the last answer falls under half the
        limit, if the number in flight stays as it is (a change makes the caller ask again)."""
        if not self.store_open or self._whole & ~self.have & ~self.inflight_bits == 0:
            return float("inf")
        half = self.limits.concurrent_pieces / 2
        flying = len(self.inflight)
        if flying >= half:
            return float("inf")
        # area + flying·(t - at) < half·(t - since)  <=>  t > (area - flying·at + half·since) / (half - flying)
        start = self._answered_at
        t = (self._flight_area - flying * self._flight_at + half * start) / (half - flying)
        return max(start + self.short_s, t)

    def _account(self, now: float) -> None:
        """Add the pieces in flight since the last call to the average's area."""
        if now > self._flight_at:
            self._flight_area += len(self.inflight) * (now - self._flight_at)
            self._flight_at = now

    def _reset_average(self, now: float) -> None:
        """A new answer (or failure): the average of pieces in flight starts again, and so does
        SHORT_S, with a new jitter."""
        self._flight_area = 0.0
        self._flight_at = now
        self.short_s = SHORT_S * (1.0 - SHORT_JITTER + 2.0 * SHORT_JITTER * self.rng.random())

    def _tokens_ready_at(self) -> float:
        return self._tokens_at + max(0.0, (1.0 - self._tokens) / SYNC_RATE_PER_S)

    def _urgent(self) -> bool:
        if not self.registered or not self.store_open or self._bad or self._failed:
            return True
        if len(self._to_report) * REPORT_SHARES >= self.count:
            return True
        if self.complete:
            return False
        lacking = 0
        for p in self.parents.values():
            lacking |= p.pieces
        lacking &= ~self.have
        if not lacking:
            whole = self._whole
            # Nobody left, or only parents that finished and have nothing for us: ask for others.
            return all(p.pieces == whole for p in self.parents.values())
        return lacking >> len(self.digests) != 0  # pieces on offer that we cannot verify yet

    def wake_at(self, now: float) -> float:
        """The latest time to call `poll` again if no other event comes first."""
        if self.finished:
            return float("inf")
        if not self.store_open:
            if self._waiting_since is None:
                return float("inf")
            return self._waiting_since + self.limits.wait_for_seed_s
        wake = float("inf") if self.inflight else self._last_progress + STALL_S
        for p in self.parents.values():
            if now < p.busy_until < wake:
                wake = p.busy_until
        return wake

    # -- events from the scheduler --------------------------------------------------------

    def no_scheduler(self) -> None:
        self._give_up(BackToSourceReason.NO_SCHEDULER, "no scheduler configured")

    def register_failed(self, error: str, *, refused: bool = False) -> None:
        """Registering failed: the scheduler could not be reached, or (`refused`) it answered
        a 4xx (a registry it does not allow, over a rate): either way the origin serves it."""
        if refused:
            self._give_up(BackToSourceReason.SCHEDULER_SAID, f"scheduler refused the task ({error})")
        else:
            self._give_up(BackToSourceReason.SCHEDULER_UNREACHABLE, f"scheduler unreachable ({error})")

    def scheduler_changed(self) -> None:
        """The task has another owner now (its scheduler stopped answering, or came back): the
        next report registers there with every piece held. Parents and pieces in flight stay."""
        self.registered = False

    def register_answered(self, reply: wire.SyncReply, now: float) -> None:
        self.registered = True
        self._answered_at = now
        self._reset_average(now)
        self._apply(reply, now)

    def take_report(self, now: float | None = None) -> Report:
        """The next sync's contents; answer with `sync_answered` or `sync_failed`. `now` counts
        it against the sync bucket (the last `done` sync, sent without, is not counted)."""
        if now is not None and not self._sizing():
            tokens = min(float(SYNC_BURST), self._tokens + (now - self._tokens_at) * SYNC_RATE_PER_S)
            self._tokens = tokens - 1.0
            self._tokens_at = now
        new, self._to_report = self._to_report, []
        if not self.registered:
            new = [n for n in range(self.count) if self.have >> n & 1]  # all of it, to a fresh registration
        return Report(
            register=not self.registered,
            new_pieces=new,
            bad_parents=sorted(self._bad),
            failed_parents=sorted(self._failed),
            have_digests=len(self.digests),
            content_length=self.content_length if self.store_open else None,
            piece_size=self.piece_size if self.store_open else None,
        )

    def sync_answered(self, report: Report, reply: wire.SyncReply, now: float) -> None:
        self._sync_failures = 0
        self.registered = True
        self._answered_at = now
        self._reset_average(now)  # new parents get SHORT_S to show what they bring
        self._bad.difference_update(report.bad_parents)
        self._failed.difference_update(report.failed_parents)
        self._apply(reply, now)

    def sync_failed(self, report: Report, now: float) -> None:
        self._answered_at = now
        self._reset_average(now)
        if not report.register:
            self._to_report = report.new_pieces + self._to_report
        self._sync_failures += 1
        if self._sync_failures >= self.limits.schedule_rounds and not self._parents_with_work():
            self._give_up(
                BackToSourceReason.SCHEDULER_UNREACHABLE, f"scheduler unreachable after {self._sync_failures} tries"
            )

    def _apply(self, reply: wire.SyncReply, now: float) -> None:
        state = reply.state
        if state == "back_to_source":
            self._give_up(BackToSourceReason.SCHEDULER_SAID, reply.reason or "scheduler said so")
        elif state == "unknown":
            self.registered = False
        elif state == "waiting":
            if self._waiting_since is None:
                self._waiting_since = now
        elif state == "running" and reply.content_length is not None:
            problem = self._layout_problem(reply)
            if problem is not None:
                log.warning("task %s: refused the scheduler's answer: %s", self.label, problem)
                self._give_up(BackToSourceReason.BAD_REPLY, f"scheduler's answer refused: {problem}")
                return
            if self.content_length is None:
                self._sized(reply.content_length, piece_size_read(reply.content_length, reply.piece_size))
            if reply.first_digest <= len(self.digests):
                self.digests.extend(reply.piece_digests[len(self.digests) - reply.first_digest :])
            self._refresh_parents(reply.parents, now)

    def _refresh_parents(self, offered: list[wire.Parent], now: float) -> None:
        count = self.count
        nbytes = (count + 7) // 8
        fresh: dict[str, Parent] = {}
        for p in offered:
            if p.host_id == self.host_id or self.blocked and self.blocked.get(p.host_id, 0.0) > now:
                continue
            if len(p.pieces) != nbytes:
                continue
            bits = bits_from_bytes(p.pieces)
            if bits >> count:
                continue  # pieces past the blob's end: not a bitmap of this blob
            old = self.parents.get(p.host_id)
            if old is not None:
                # With news the parent's own word is usually newer than the scheduler's; pieces
                # are only ever added, so the union is the best view of both.
                old.pieces = old.pieces | bits if self.limits.peer_news else bits
                old.url = p.url
                old.seed = p.seed
                fresh[p.host_id] = old
            else:
                fresh[p.host_id] = Parent(p.host_id, p.url, bits, seed=p.seed)
        # Parents with pieces in flight stay until those finish.
        for host_id, old in self.parents.items():
            if host_id not in fresh and old.inflight:
                fresh[host_id] = old
        self.parents = fresh

    def _layout_problem(self, reply: wire.SyncReply) -> str | None:
        """Why a running reply's layout cannot be used (None: it can). The scheduler decides the
        piece size; this download takes it only if it is one, its digests fit it, and it is the
        layout the store was opened with (pieces cut otherwise would fail at every parent)."""
        size = reply.content_length
        assert size is not None
        piece_size = piece_size_read(size, reply.piece_size)
        if (problem := piece_size_problem(piece_size)) is not None:
            return problem
        count = PieceLayout(size, piece_size).count
        if reply.first_digest + len(reply.piece_digests) > count:
            return f"{reply.first_digest + len(reply.piece_digests)} piece digests for {count} pieces of {piece_size}"
        if self.content_length is not None and (self.content_length, self.piece_size) != (size, piece_size):
            return (
                f"{size} bytes in pieces of {piece_size}, but this download is cut as "
                f"{self.content_length} bytes in pieces of {self.piece_size}"
            )
        return None

    def _sized(self, content_length: int, piece_size: int) -> None:
        self.content_length = content_length
        self.piece_size = piece_size
        self.count = PieceLayout(content_length, piece_size).count
        self._whole = (1 << self.count) - 1

    # -- events from parents (peer news) --------------------------------------------------

    def parent_news(
        self, host_id: str, pieces: int, now: float, *, first_digest: int = 0, digests: list[bytes] | None = None
    ) -> None:
        """A parent said what it holds (`pieces`, bits), and, if the scheduler marked it as a
        seed, the digests of its pieces from `first_digest` on. News of a host that is no
        longer a parent, or a bitmap that is not this blob's, is ignored."""
        parent = self.parents.get(host_id)
        if parent is None or not self.count or pieces >> self.count:
            return
        parent.pieces = pieces
        if digests and parent.seed and first_digest <= len(self.digests):
            self.digests.extend(digests[len(self.digests) - first_digest :])

    def parent_lost(self, host_id: str, now: float) -> None:
        """The parent's news connection failed: it died or left. Stop asking it; the next sync
        reports it and gets another."""
        parent = self.parents.get(host_id)
        if parent is not None:
            self._block(parent, now, bad=False, why="dropped its news connection")

    # -- events from the store ------------------------------------------------------------

    def store_opened(self, content_length: int, held: int, digests: list[bytes], piece_size: int | None = None) -> None:
        """The store is open: `held` its pieces (bits), `digests` those saved beside them. A
        store opened before any scheduler's answer (back to source) is cut at `piece_size`, by
        default the rule's; else it is cut as the answer said."""
        if self.content_length is None:
            self._sized(content_length, piece_size or piece_size_for(content_length))
        self.store_open = True
        self.have |= held & self._whole
        if held and digests:
            # Pieces kept from an earlier run were verified against these when the store loaded.
            self.digests = digests[: self.count] + self.digests[len(digests) :]

    def piece_from_origin(self, number: int, digest: bytes) -> bool:
        """A piece fetched from the origin is stored; returns True if it contradicts the
        seed's digest (the origin's bytes win: the blob's sha256 decides in the end)."""
        contradicts = number < len(self.digests) and self.digests[number] != digest
        if number >= len(self.digests):
            self.digests.extend([b""] * (number - len(self.digests) + 1))
        self.digests[number] = digest
        self.have |= 1 << number
        self._to_report.append(number)
        return contradicts

    # -- the download ---------------------------------------------------------------------

    def poll(self, now: float) -> list[PieceRequest]:
        """The pieces to request now, each counted in flight until its `piece_done`. Also the
        clock's rules: a size still unknown, or nothing arriving, sends it back to source."""
        if self.finished:
            return []
        if not self.store_open:
            wait = self.limits.wait_for_seed_s
            if self._waiting_since is not None and now - self._waiting_since > wait:
                self._give_up(BackToSourceReason.SIZE_UNKNOWN, f"blob size unknown after {wait:.0f}s")
            return []
        self._account(now)
        requests = self._launch(now)
        if not self.inflight and now - self._last_progress > STALL_S:
            self._give_up(BackToSourceReason.STALLED, f"no piece arrived in {STALL_S:.0f}s")
        return requests

    def _launch(self, now: float) -> list[PieceRequest]:
        limits = self.limits
        room = limits.concurrent_pieces - len(self.inflight)
        if room <= 0 or not self.parents:
            return []
        known = min(len(self.digests), self.count)  # only pieces we can verify
        need = ((1 << known) - 1) & ~self.have & ~self.inflight_bits
        if not need:
            return []
        blocked = self.blocked
        views = [
            ParentView(
                p.host_id,
                p.pieces,
                p.inflight,
                p.busy_until <= now and (not blocked or blocked.get(p.host_id, 0.0) <= now),
            )
            for p in self.parents.values()
        ]
        whole = self._whole
        # Every parent holds the whole blob: rarity protects nobody, and a client streaming the
        # blob gets its bytes as they arrive instead of after the last piece.
        in_order = all(v.pieces == whole for v in views)
        per_parent = per_parent_limit(views, limits.per_parent_pieces)
        chosen = []
        if urgent := need & self.wanted:
            # A client's Range waits for these: first, in order, whatever their rarity.
            chosen = choose_requests(urgent, views, room=room, per_parent=per_parent, rng=self.rng, in_order=True)
            for _, host_id in chosen:
                views = [replace(v, inflight=v.inflight + 1) if v.host_id == host_id else v for v in views]
            need &= ~urgent
        chosen += choose_requests(
            need, views, room=room - len(chosen), per_parent=per_parent, rng=self.rng, in_order=in_order
        )
        requests = []
        for number, host_id in chosen:
            parent = self.parents[host_id]
            parent.inflight += 1
            self.inflight[number] = parent
            self.inflight_bits |= 1 << number
            requests.append(PieceRequest(number, host_id, parent.url))
        return requests

    def want_first(self, first: int, last: int) -> None:
        """A client waits for pieces first..last (a Range request): ask for them before others."""
        if self.store_open:
            self.wanted |= ((1 << (last + 1)) - 1) & ~((1 << first) - 1) & self._whole

    def piece_done(self, number: int, outcome: PieceOutcome, now: float) -> None:
        """A request from `poll` ended with `outcome` (verified means stored)."""
        self._account(now)
        parent = self._release(number)
        if outcome is PieceOutcome.VERIFIED:
            parent.failures = 0
            self.have |= 1 << number
            self._to_report.append(number)
            self._last_progress = now
        elif outcome is PieceOutcome.BUSY:
            parent.busy_until = now + BUSY_S
        elif outcome is PieceOutcome.CORRUPT:
            self._block(parent, now, bad=True, why=f"piece {number} failed verification")
        elif outcome is PieceOutcome.ABSENT:
            parent.pieces &= ~(1 << number)  # the scheduler's view was ahead of the parent's
            parent.absent += 1
            if parent.absent >= PARENT_ABSENT:
                # Its claims keep coming back with the next sync: a liar, or a parent that lost
                # its store. Either way, stop asking it.
                self._block(parent, now, bad=False, why=f"answered 404 for {parent.absent} pieces it claims")
        else:
            parent.failures += 1
            if parent.failures >= PARENT_FAILURES:
                self._block(parent, now, bad=False, why=f"failed {parent.failures} pieces in a row")

    def piece_abandoned(self, number: int) -> None:
        """A request ended for a reason of ours (the local store failed): no verdict on the parent."""
        self._release(number)

    def _release(self, number: int) -> Parent:
        parent = self.inflight.pop(number)
        self.inflight_bits &= ~(1 << number)
        parent.inflight -= 1
        return parent

    def _block(self, parent: Parent, now: float, *, bad: bool, why: str) -> None:
        log.warning("task %s: %s %s; avoiding it for %.0fs", self.label, parent.host_id, why, BLOCK_S)
        self.blocked[parent.host_id] = now + BLOCK_S
        (self._bad if bad else self._failed).add(parent.host_id)
        self.parents.pop(parent.host_id, None)

    def _parents_with_work(self) -> bool:
        """True if some known parent still holds a piece we need and is not failing."""
        need = ((1 << min(len(self.digests), self.count)) - 1) & ~self.have
        return any(p.failures < PARENT_FAILURES and p.pieces & need for p in self.parents.values())

    def _give_up(self, reason: BackToSourceReason, detail: str) -> None:
        if self.back_to_source is None:  # the first reason is the one that counts
            self.back_to_source = BackToSource(reason, detail)

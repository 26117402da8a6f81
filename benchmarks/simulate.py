"""Thousands of hosts pulling one blob, simulated: the real scheduler and piece selection over a model network.

    .venv/bin/python -m benchmarks.simulate --peers 5000 --blob-size 1GiB \\
        --peer-rate 100MiB --origin-rate 1GiB --out benchmarks/results/simulate

The control plane is the real code: `scheduler.state.Scheduler` receives the wire messages a
daemon sends (AnnounceHost, Register, Sync when the peer's machine says one is due, SeedProgress
every 50 ms) at simulated times, and each peer is the daemon's own state machine
(`peer.machine.TaskMachine`: rarest-first requests, per-parent limits, busy back-off, the
back-to-source rules, the sync schedule) under PeerConfig's limits, fed the outcomes of its simulated requests; the
piece server's limits are modelled (p2pdist/node/pieceserver.py): past its upload slots a parent keeps a line as long as its
slots, a finished upload hands its slot to the first in line, and a request that waited
QUEUE_WAIT_S, or found the line full, is a 503 that keeps the child off that parent for BUSY_S. Only the data plane is modelled: every piece transfer is a flow between two hosts,
rates shared max-min fairly (approximated by a few rounds of progressive filling) over each
host's upload and download capacity, recomputed every tick. The seed fetches from the origin
at the origin rate and uploads at that rate too (seed and origin together are the server).
Direct pull is the same start times against the origin alone, shared fairly, each capped at d.

With `--sites S`, hosts are split into S sites of peers/S (the seed is in the core), each behind
one shared WAN uplink of `--site-uplink-rate` each way: a transfer between a site and anything
outside it also shares that link's capacity, in the same max-min filling. The report adds the
bytes that entered each site and the site-aware lower bound (benchmarks.report.site_lower_bound_s);
`--no-site-aware` runs the same topology with the scheduler's site rule off. Direct pull then
shares the origin fairly between sites, each site's share capped by its uplink.

With `--scheduler-service-ms MS`, the scheduler is a server with one core: every request (a
peer's register and syncs, the seed's progress reports) waits its turn in one FIFO line and
takes MS of service, and its answer (and its effect on the scheduler's state) comes when that
service ends; a peer sends its next sync only after the answer, as the daemon does. The report
adds the scheduler's utilisation over time and the requests' latency. A peer stops waiting
after PeerConfig.scheduler_timeout_s, as the daemon does, unless it has patience
(PeerConfig.scheduler_patience_s, `--scheduler-patience-s`): the modelled scheduler is busy,
never frozen, so it answers the daemon's liveness probe (p2pdist/cluster/liveness.py) and the
peer waits on up to its patience. A register answered later than that sends it back to source
(counted, and the host stops there: origin pulls are not modelled), a sync answered later is
a failed sync; the scheduler still handles either in its turn. Without it (the default,
0) the scheduler answers at once, for free. Per request type, as `benchmarks.load --by-type`
measures it: `--scheduler-service-ms register=0.4,sync=0.25,seed=0.2`.

`--trace-out FILE` writes down every request the scheduler receives (benchmarks/trace.py), for
`benchmarks.load --replay FILE` to send to a real scheduler process at the same times.

Piece news (peer.machine's `peer_news`, on unless `--no-peer-news`): each child watches every
parent its machine holds, as the daemon keeps a long-poll per parent; when a host verifies a
piece (a peer's transfer ends, the seed's origin stream passes a piece's end) each child
watching it hears its whole bitmap NEWS_LATENCY_S later, and a child that starts watching hears
the parent's bitmap NEWS_LATENCY_S after it starts (the first poll answers at once). The seed's
news carries its piece digests. Syncs go out when the machine's `next_sync_at` says, so the
request counts are the daemon's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import json
import logging
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import (
    lower_bound_s,
    percentile,
    site_lower_bound_s,
    site_staged_bound_s,
    step_cdf,
    summarize,
    write_results,
)
from benchmarks.trace import TraceWriter, TracingScheduler
from p2pdist.config import PeerConfig, SchedulerConfig, SeedConfig, parse_size
from p2pdist.content.pieces import PieceLayout, piece_floor_for_upload, piece_size_sent
from p2pdist.node.pieceserver import QUEUE_WAIT_S
from p2pdist.wire import AnnounceHost, Register, SeedProgress, Sync
from peer.machine import Limits, PieceOutcome, Report, TaskMachine
from scheduler.state import Scheduler
from seed.fetch import REPORT_INTERVAL_S

TASK = "sha256:" + "5e" * 32
URL = "http://origin.sim/v2/sim/blob/blobs/" + TASK
log = logging.getLogger("p2pdist.simulate")

FILL_ROUNDS = 3  # progressive-filling rounds per tick: enough to hand out nearly all spare capacity
# The answer event of each request type in the server model, and the types a service time
# can be given for (the simulated daemons send no leave yet; the flag takes it for later).
ANSWER_TYPES = {"registered": "register", "synced": "sync", "seed_reported": "seed"}
SERVICE_TYPES = ("register", "sync", "seed", "leave")
SCHED_BIN_S = 0.25  # the scheduler's utilisation is reported per this much simulated time
# A verified piece's news reaches a watching child this much later: the long-poll's answer on an
# open keep-alive connection in one data centre, plus the child's event loop. One tick.
NEWS_LATENCY_S = 0.005


@dataclass(frozen=True)
class SimConfig:
    peers: int
    blob_bytes: int
    peer_upload_bps: float
    peer_download_bps: float
    origin_bps: float
    start_spread_s: float = 0.2  # hosts start uniformly within this window
    tick_s: float = 0.005
    seed: int = 1
    max_time_s: float = 3600.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    seed_upload_slots: int = 0  # 0: what a seed whose upload is capped at the origin rate uses
    sites: int = 0  # 0: no sites, one flat network
    site_uplink_bps: float = float("inf")  # each site's WAN link, each way
    site_aware: bool = True  # the scheduler's site rule (SchedulerConfig.site_aware)
    scheduler_service_s: float = 0.0  # each request's service time at a one-core scheduler (0: free)
    peer_news: bool = True  # children hear parents' pieces from the parents (peer.machine Limits.peer_news)
    # Service time per request type (register, sync, seed, leave); a type not named takes
    # scheduler_service_s. Any value above 0 here models the server too.
    scheduler_service_s_by_type: dict[str, float] = field(default_factory=dict)
    trace_out: Path | None = None  # write every request the scheduler receives here (benchmarks.trace)

    def service_s(self, request_type: str) -> float:
        return self.scheduler_service_s_by_type.get(request_type, self.scheduler_service_s)

    def peer_waits_s(self) -> float:
        """How long a peer waits for a scheduler answer: its timeout, or its patience where that
        is longer (the modelled scheduler is busy, never frozen, so the probe is answered)."""
        return max(self.peer.scheduler_timeout_s, self.peer.scheduler_patience_s)

    def server_modelled(self) -> bool:
        return self.scheduler_service_s > 0 or any(v > 0 for v in self.scheduler_service_s_by_type.values())

    def site_hosts(self) -> int:
        return -(-self.peers // self.sites) if self.sites else self.peers

    def peer_slots(self) -> int:
        """The upload slots a real peer with this upload cap would use."""
        return dataclasses.replace(self.peer, upload_rate_bps=int(self.peer_upload_bps)).effective_upload_slots()

    def seed_slots(self) -> int:
        return self.seed_upload_slots or SeedConfig(upload_rate_bps=int(self.origin_bps)).effective_upload_slots()


class SimPeer:
    """One simulated host: the daemon's state machine, and when it started and finished."""

    __slots__ = ("index", "host_id", "start_s", "machine", "done_s", "gone", "sync_at", "asking", "watching")

    def __init__(self, index: int, start_s: float, rng: random.Random, limits: Limits) -> None:
        self.index = index
        self.host_id = f"peer-{index:05d}"
        self.start_s = start_s
        self.machine = TaskMachine(self.host_id, limits, rng, start_s, label=self.host_id)
        self.done_s: float | None = None
        self.gone = False  # went back to source: the model has no origin pulls, so it stops here
        self.sync_at = float("inf")  # when its next sync is planned
        self.asking = True  # a register or sync is on its way: no other until its answer
        self.watching: set[int] = set()  # hosts (by index) whose news it follows

    @property
    def have(self) -> int:
        """Pieces stored, bit n for piece n."""
        return self.machine.have


class Simulation:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        rng = random.Random(config.seed)
        sched_config = dataclasses.replace(config.scheduler, site_aware=config.site_aware)
        if config.trace_out is not None:
            self.trace = TraceWriter(config.trace_out, {"peers": config.peers, "blob_bytes": config.blob_bytes})
            self.sched: Scheduler = TracingScheduler(sched_config, rng=random.Random(rng.random()), writer=self.trace)
        else:
            self.sched = Scheduler(sched_config, rng=random.Random(rng.random()))
        # Cut as the scheduler decides for a task its peers ask for first (its rule, with the
        # floor their upload cap asks for: they announce it), as a real seed is told.
        floor = piece_floor_for_upload(int(config.peer_upload_bps), sched_config.min_piece_bytes)
        self.layout = PieceLayout.for_blob(config.blob_bytes, floor)
        self.lengths = [self.layout.length(n) for n in range(self.layout.count)]
        self.all_pieces = (1 << self.layout.count) - 1
        self.piece_size_sent = piece_size_sent(self.layout.blob_size, self.layout.piece_size)
        n = config.peers
        # The daemon's limits at the simulated upload rate (its slots set its pieces in flight).
        peer = dataclasses.replace(config.peer, upload_rate_bps=int(config.peer_upload_bps))
        limits = self.limits = dataclasses.replace(Limits.from_config(peer), peer_news=config.peer_news)
        self.peers = [
            SimPeer(i + 1, rng.uniform(0, config.start_spread_s), random.Random(rng.random()), limits) for i in range(n)
        ]
        self.seed_id = "seed-0"
        self.index = {self.seed_id: 0} | {p.host_id: p.index for p in self.peers}
        hosts = n + 1
        self.up_cap = np.full(hosts, float(config.peer_upload_bps))
        self.up_cap[0] = config.origin_bps
        self.down_cap = np.full(hosts, float(config.peer_download_bps))
        self.down_cap[0] = np.inf  # the seed's download is its origin stream, modelled apart
        self.slots = [config.seed_slots()] + [config.peer_slots()] * n
        self.uploads = [0] * hosts
        # The piece server's line: requests waiting for a slot (at most `slots` per host), each
        # answered busy if no upload ends within QUEUE_WAIT_S. Entries: [deadline, child, parent
        # host, piece, live]; `expiring` holds every entry in deadline order.
        self.queues: list[collections.deque[list[Any]]] = [collections.deque() for _ in range(hosts)]
        self.expiring: collections.deque[list[Any]] = collections.deque()
        # Flows: fixed-size arrays indexed by slot; a free list hands slots out.
        cap = n * limits.concurrent_pieces + 16
        self.f_parent = np.zeros(cap, dtype=np.int64)
        self.f_child = np.zeros(cap, dtype=np.int64)
        self.f_left = np.zeros(cap)
        self.f_live = np.zeros(cap, dtype=bool)
        self.f_piece = [0] * cap
        self.free = list(range(cap - 1, -1, -1))
        # Events at simulated times: (time, order, kind, peer index).
        self.events: list[tuple[float, int, str, int]] = []
        self.order = 0
        self.seed_woken_s: float | None = None
        self.seed_reported = 0
        self.seed_next_report = float("inf")
        self.origin_bytes = 0
        self.waiting = n  # hosts neither done nor gone back to source
        self.stats = {
            "requests": 0,
            "busy": 0,
            "syncs": 0,
            "registers": 0,
            "back_to_source": 0,
            "scheduler_timeouts": 0,
        }
        self.utilization: list[tuple[float, float]] = []
        # Where the idle upload is, sampled with `utilization` (see _idle_upload): the share of all
        # hosts' upload idle for each reason, and what the downloading hosts' requests are doing.
        self.idle: list[dict[str, float]] = []
        self.origin_start = 0.0
        # Sites: host index -> site number (-1: the core, where the seed is); the WAN links'
        # capacities with one more entry of unlimited capacity for transfers that cross none.
        self.sites = config.sites
        self.site_of = np.full(hosts, -1, dtype=np.int64)
        if self.sites:
            self.site_of[1:] = np.arange(n) // config.site_hosts()
        self.wan_cap = np.append(np.full(self.sites, float(config.site_uplink_bps)), np.inf)
        self.site_in_bytes = np.zeros(self.sites + 1)
        # The scheduler as a server (scheduler_service_s > 0): when it is next free, what each
        # queued request carries (by event order), its busy time per SCHED_BIN_S, latencies.
        self.sched_free_s = 0.0
        self.pending: dict[int, tuple[Any, ...]] = {}
        self.late: set[int] = set()  # answers that come after the peer stopped waiting (by event order)
        self.sched_busy: collections.Counter[int] = collections.Counter()
        self.sched_latency: list[float] = []
        self.sched_latency_by_type: dict[str, list[float]] = collections.defaultdict(list)
        # Piece news: who watches each host (by index), and answers on their way, in delivery
        # order (one fixed latency): (when, child index, parent host id, its bitmap).
        self.watchers: list[set[int]] = [set() for _ in range(hosts)]
        self.news: collections.deque[tuple[float, int, str, int]] = collections.deque()
        self.seed_told = 0  # pieces of the seed its watchers have been told of
        self.seed_digests = [n.to_bytes(32, "big") for n in range(self.layout.count)]

    # -- control plane: the real scheduler --------------------------------------------------

    def _at(self, when: float, kind: str, peer: int) -> int:
        self.order += 1
        heapq.heappush(self.events, (when, self.order, kind, peer))
        return self.order

    def _queue(self, when: float, kind: str, index: int, *payload: Any) -> bool:
        """Send one request to the scheduler modelled as a server: it is answered by a `kind`
        event when its service ends, with `payload`. False: no server modelled, answer now."""
        if not self.config.server_modelled():
            return False
        request_type = ANSWER_TYPES.get(kind, kind)
        service = self.config.service_s(request_type)
        start = max(when, self.sched_free_s)
        end = self.sched_free_s = start + service
        self.sched_latency.append(end - when)
        self.sched_latency_by_type[request_type].append(end - when)
        # Busy time per bin, split where the service crosses a bin's edge.
        t = start
        while t < end:
            b = int(t / SCHED_BIN_S)
            edge = min(end, (b + 1) * SCHED_BIN_S)
            self.sched_busy[b] += edge - t
            t = edge
        waits = self.config.peer_waits_s()
        if index and kind in ("registered", "synced") and end - when > waits:
            # The daemon stops waiting after its timeout (or its patience: the probe is answered)
            # and takes it as a failure; the scheduler still handles the request in its turn.
            answer = self._at(end, kind, index)
            self.late.add(answer)
            self.pending[answer] = payload
            self.pending[self._at(when + waits, "timed_out", index)] = (kind, *payload)
            return True
        self.pending[self._at(end, kind, index)] = payload
        return True

    def site_name(self, index: int) -> str:
        site = int(self.site_of[index])
        if not self.sites:
            return ""
        return "core" if site < 0 else f"site-{site:03d}"

    def start(self) -> None:
        seed_slots = self.config.seed_slots()
        self.sched.announce(
            AnnounceHost(
                host_id=self.seed_id,
                url="http://seed-0.sim:4010",
                kind="seed",
                upload_slots=seed_slots,
                site=self.site_name(0),
            ),
            0.0,
        )
        for p in self.peers:
            self.sched.announce(
                AnnounceHost(
                    host_id=p.host_id,
                    url=f"http://{p.host_id}.sim:4000",
                    kind="peer",
                    upload_slots=self.config.peer_slots(),
                    site=self.site_name(p.index),
                    upload_rate_bps=int(self.config.peer_upload_bps),
                ),
                0.0,
            )
            self._at(p.start_s, "register", p.index)

    def _register(self, p: SimPeer, now: float) -> None:
        self.stats["registers"] += 1
        p.asking = True
        if not self._queue(now, "registered", p.index):
            self._registered(p, now)

    def _registered(self, p: SimPeer, now: float, *, deliver: bool = True) -> None:
        reply, wake = self.sched.register(Register(host_id=p.host_id, task_id=TASK, url=URL), now)
        if wake is not None:
            self._wake_seed(now)
        if not deliver:
            return
        p.asking = False
        p.machine.register_answered(reply, now)
        self._after_reply(p, now)

    def _sync(self, p: SimPeer, now: float, *, done: bool = False) -> None:
        self.stats["syncs"] += 1
        p.sync_at = float("inf")
        p.asking = True
        report = p.machine.take_report() if done else p.machine.take_report(now)
        if report.register:
            self._register(p, now)
            return
        if not self._queue(now, "synced", p.index, report, done):
            self._synced(p, now, report, done)

    def _synced(self, p: SimPeer, now: float, report: Report, done: bool, *, deliver: bool = True) -> None:
        machine = p.machine
        reply, wake = self.sched.sync(
            Sync(
                host_id=p.host_id,
                task_id=TASK,
                new_pieces=list(range(self.layout.count)) if done else report.new_pieces,
                have_digests=report.have_digests,
                bad_parents=report.bad_parents,
                failed_parents=report.failed_parents,
                done=done,
                content_length=report.content_length,
                piece_size=None if report.piece_size is None else self.piece_size_sent,
            ),
            now,
        )
        if wake is not None:
            self._wake_seed(now)
        if not done and deliver:
            p.asking = False
            machine.sync_answered(report, reply, now)
            self._after_reply(p, now)

    def _timed_out(self, p: SimPeer, now: float, kind: str, *payload: Any) -> None:
        """What TaskDownload does when a scheduler call times out: a register sends the
        download back to source (the model has no origin pulls: the host stops there), a
        sync is a failed sync, retried by the machine's rules."""
        self.stats["scheduler_timeouts"] += 1
        if kind == "registered":
            p.machine.register_failed(f"timed out after {self.config.peer_waits_s():g} s")
            self._gone(p)
            return
        report, done = payload
        if done:
            return
        p.asking = False
        p.machine.sync_failed(report, now)
        self._plan_sync(p, now)

    def _after_reply(self, p: SimPeer, now: float) -> None:
        """What TaskDownload does after a reply: open the store (empty) once the size is known."""
        machine = p.machine
        if machine.wants_store:
            machine.store_opened(self.config.blob_bytes, 0, [], self.layout.piece_size)
        if machine.back_to_source is not None:
            self._gone(p)
        else:
            self._plan_sync(p, now)
            self._watch(p, now)

    def _plan_sync(self, p: SimPeer, now: float) -> None:
        """What TaskDownload._sync_loop does: the next sync when the machine says, one at a
        time; an event can only bring it forward."""
        if p.asking or p.done_s is not None or p.gone:
            return
        due = max(now, p.machine.next_sync_at(now))
        if due < p.sync_at:
            p.sync_at = due
            self._at(due, "sync", p.index)

    def _watch(self, p: SimPeer, now: float) -> None:
        """What TaskDownload's news polls do: follow each parent the machine holds, the first
        answer (the parent's bitmap then) arriving NEWS_LATENCY_S later."""
        if not self.config.peer_news:
            return
        index = self.index
        now_watching = {index[h] for h in p.machine.parents} if p.done_s is None and not p.gone else set()
        if now_watching == p.watching:
            return
        for host in p.watching - now_watching:
            self.watchers[host].discard(p.index)
        for host in now_watching - p.watching:
            self.watchers[host].add(p.index)
            self.news.append((now + NEWS_LATENCY_S, p.index, self._host_id(host), self._bits_of(host, now)))
        p.watching = now_watching

    def _host_id(self, host: int) -> str:
        return self.seed_id if host == 0 else self.peers[host - 1].host_id

    def _bits_of(self, host: int, now: float) -> int:
        if host == 0:
            return (1 << self._seed_pieces_at(now)) - 1
        return self.peers[host - 1].have

    def _tell_watchers(self, host: int, now: float) -> None:
        """`host` verified a piece: each child watching it hears its bitmap NEWS_LATENCY_S later."""
        watchers = self.watchers[host]
        if watchers:
            host_id = self._host_id(host)
            bits = self._bits_of(host, now)
            at = now + NEWS_LATENCY_S
            for child in watchers:
                self.news.append((at, child, host_id, bits))

    def _deliver_news(self, now: float, touched: set[int]) -> None:
        news = self.news
        while news and news[0][0] <= now:
            when, child, host_id, bits = news.popleft()
            p = self.peers[child - 1]
            if p.done_s is not None or p.gone:
                continue
            if host_id == self.seed_id:
                have = bits.bit_length()
                p.machine.parent_news(host_id, bits, when, first_digest=0, digests=self.seed_digests[:have])
            else:
                p.machine.parent_news(host_id, bits, when)
            touched.add(child)

    def _gone(self, p: SimPeer) -> None:
        if not p.gone:
            p.gone = True
            self.stats["back_to_source"] += 1
            self.waiting -= 1
            self._watch(p, 0.0)

    def _wake_seed(self, now: float) -> None:
        if self.seed_woken_s is not None:
            return
        self.seed_woken_s = now
        self.origin_start = now
        self.origin_bytes += self.config.blob_bytes
        self.seed_next_report = now  # the first report (size only) goes out as the stream opens

    def _seed_pieces_at(self, now: float) -> int:
        """Pieces the seed has stored from the origin stream by `now`."""
        if self.seed_woken_s is None:
            return 0
        fetched = (now - self.origin_start) * self.config.origin_bps
        return (
            min(self.layout.count, int(fetched // self.layout.piece_size))
            if fetched < self.config.blob_bytes
            else self.layout.count
        )

    def _seed_report(self, now: float) -> None:
        have = self._seed_pieces_at(now)
        done = have == self.layout.count
        digests = [n.to_bytes(32, "big") for n in range(self.seed_reported, have)]
        progress = SeedProgress(
            host_id=self.seed_id,
            task_id=TASK,
            content_length=self.config.blob_bytes,
            first_digest=self.seed_reported,
            piece_digests=digests,
            done=done,
            piece_size=self.piece_size_sent,
        )
        self.seed_reported = have
        self.seed_next_report = float("inf")  # the seed waits for the answer before the next
        if not self._queue(now, "seed_reported", 0, progress):
            self._seed_reported(now, progress)

    def _seed_reported(self, now: float, progress: SeedProgress) -> None:
        self.sched.seed_progress(progress, now)
        if not progress.done:
            self.seed_next_report = now + REPORT_INTERVAL_S

    # -- peers: the daemon's piece selection ------------------------------------------------

    def _launch(self, p: SimPeer, now: float) -> None:
        """What TaskDownload._fetch_loop does, a 503 from a full parent answered at once."""
        machine = p.machine
        for _ in range(4):
            if p.done_s is not None or p.gone:
                return
            requests = machine.poll(now)
            if machine.back_to_source is not None:
                self._gone(p)
                return
            refused = False
            for number, host_id, _ in requests:
                host = self.index[host_id]
                self.stats["requests"] += 1
                if self.uploads[host] < self.slots[host]:
                    self._start_flow(p, host, number)
                elif len(self.queues[host]) < self.slots[host]:
                    entry = [now + QUEUE_WAIT_S, p, host, number, True]
                    self.queues[host].append(entry)
                    self.expiring.append(entry)
                else:
                    self.stats["busy"] += 1
                    machine.piece_done(number, PieceOutcome.BUSY, now)
                    refused = True
            if not refused:
                return

    def _expire_queued(self, now: float, touched: set[int]) -> None:
        """Requests that waited QUEUE_WAIT_S in a parent's line get their 503."""
        while self.expiring and self.expiring[0][0] <= now:
            entry = self.expiring.popleft()
            if not entry[4]:
                continue  # started meanwhile
            deadline, p, host, number, _ = entry
            entry[4] = False
            self.queues[host].remove(entry)
            self.stats["busy"] += 1
            p.machine.piece_done(number, PieceOutcome.BUSY, deadline)
            touched.add(p.index)

    def _start_flow(self, p: SimPeer, host: int, number: int) -> None:
        slot = self.free.pop()
        self.f_parent[slot] = host
        self.f_child[slot] = p.index
        self.f_left[slot] = self.lengths[number]
        self.f_live[slot] = True
        self.f_piece[slot] = number
        self.uploads[host] += 1

    def _finish_flow(self, slot: int, now: float) -> SimPeer:
        p = self.peers[int(self.f_child[slot]) - 1]
        host = int(self.f_parent[slot])
        number = self.f_piece[slot]
        self.f_live[slot] = False
        self.free.append(slot)
        self.uploads[host] -= 1
        queue = self.queues[host]
        if queue:  # the finishing upload hands its slot to the next in line
            _, child, _, piece, _ = entry = queue.popleft()
            entry[4] = False
            self._start_flow(child, host, piece)
        p.machine.piece_done(number, PieceOutcome.VERIFIED, now)
        self._tell_watchers(p.index, now)
        if p.machine.complete:
            p.done_s = now
            self.waiting -= 1
            self._watch(p, now)  # its download and its news polls end; it still serves
            self._sync(p, now, done=True)
        return p

    # -- data plane: flows sharing capacity --------------------------------------------------

    def _wan_links(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each live transfer, the site whose uplink it enters and the one it leaves by
        (`self.sites`, the unlimited entry, where it crosses none)."""
        child_site = self.site_of[self.f_child[live]]
        parent_site = self.site_of[self.f_parent[live]]
        cross = child_site != parent_site
        none = self.sites
        return (
            np.where(cross & (child_site >= 0), child_site, none),
            np.where(cross & (parent_site >= 0), parent_site, none),
        )

    def _rates(self, live: np.ndarray, wan: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Max-min fair rates, approximated by progressive filling over upload and download
        links, and each site's WAN link (in and out) when there are sites."""
        parent = self.f_parent[live]
        child = self.f_child[live]
        hosts = len(self.up_cap)
        up = self.up_cap.copy()
        down = self.down_cap.copy()
        links = self.sites + 1
        into, out_of = wan if wan is not None else (None, None)
        wan_in = self.wan_cap.copy()
        wan_out = self.wan_cap.copy()
        rate = np.zeros(len(live))
        open_ = np.ones(len(live), dtype=bool)
        for _ in range(FILL_ROUNDS):
            n_up = np.bincount(parent[open_], minlength=hosts)
            n_down = np.bincount(child[open_], minlength=hosts)
            share = np.minimum(up[parent] / np.maximum(n_up[parent], 1), down[child] / np.maximum(n_down[child], 1))
            if into is not None and out_of is not None:
                n_in = np.bincount(into[open_], minlength=links)
                n_out = np.bincount(out_of[open_], minlength=links)
                share = np.minimum(share, wan_in[into] / np.maximum(n_in[into], 1))
                share = np.minimum(share, wan_out[out_of] / np.maximum(n_out[out_of], 1))
            share[~open_] = 0.0
            rate += share
            up -= np.bincount(parent, share, minlength=hosts)
            down -= np.bincount(child, share, minlength=hosts)
            open_ &= (up[parent] > 1.0) & (down[child] > 1.0)
            if into is not None and out_of is not None:
                wan_in -= np.bincount(into, share, minlength=links)
                wan_out -= np.bincount(out_of, share, minlength=links)
                open_ &= (wan_in[into] > 1.0) & (wan_out[out_of] > 1.0)
            if not open_.any():
                break
        return rate

    # -- where the upload goes idle ----------------------------------------------------------

    def _idle_upload(self, now: float, live: np.ndarray, rate: np.ndarray, up_total: float) -> dict[str, float]:
        """Each host's unused upload, as a share of all hosts' upload, by the first reason that
        holds for it, and what the downloading hosts' requests are doing:
        - not_started / holds_nothing: it has not started, or holds no piece yet;
        - slots_full: every upload slot busy, and its children's download is the limit;
        - no_children: no downloading host has it as a parent;
        - nothing_wanted: its children hold every piece it holds (or have them in flight);
        - children_full: a child lacks one of its pieces but has concurrent_pieces in flight;
        - child_avoids: such a child has it marked busy, or does not know it holds the piece;
        - no_digests: such a child lacks the seed's digests of the pieces (it cannot verify them);
        - per_parent: such a child has per_parent_pieces in flight to it already;
        - other: a child could ask it and has not (yet: the next poll).
        """
        hosts = len(self.up_cap)
        up = np.bincount(self.f_parent[live], rate, minlength=hosts)
        spare = np.maximum(self.up_cap - up, 0.0) / up_total
        children: list[list[SimPeer]] = [[] for _ in range(hosts)]
        index = self.index
        flights = queued = downloading = 0
        for p in self.peers:
            if p.done_s is not None or p.gone or p.start_s > now:
                continue
            downloading += 1
            flights += len(p.machine.inflight)
            for h in p.machine.parents:
                children[index[h]].append(p)
        for q in self.queues:
            queued += len(q)
        out = dict.fromkeys(IDLE_REASONS, 0.0)
        limit = self.limits.concurrent_pieces
        per_parent = self.limits.per_parent_pieces
        for host in range(hosts):
            idle = float(spare[host])
            if idle < 1e-6:
                continue
            if host and self.peers[host - 1].start_s > now:
                out["not_started"] += idle
                continue
            held = self._bits_of(host, now)
            if not held:
                reason = "holds_nothing"
            elif self.uploads[host] >= self.slots[host]:
                reason = "slots_full"
            elif not children[host]:
                reason = "no_children"
            else:
                host_id = self._host_id(host)
                wanting = [c for c in children[host] if held & ~c.machine.have & ~c.machine.inflight_bits]
                if not wanting:
                    reason = "nothing_wanted"
                elif all(len(c.machine.inflight) >= limit for c in wanting):
                    reason = "children_full"
                else:
                    reason = "other"
                    for c in wanting:
                        machine = c.machine
                        view = machine.parents.get(host_id)
                        if len(machine.inflight) >= limit:
                            continue
                        if view is None or view.busy_until > now or not view.pieces & ~machine.have & held:
                            reason = "child_avoids"
                        elif not held & ~machine.have & ~machine.inflight_bits & ((1 << len(machine.digests)) - 1):
                            reason = "no_digests"
                        elif view.inflight >= per_parent:
                            reason = "per_parent"
                        else:
                            continue
                        break
            out[reason] += idle
        out = {k: round(v, 4) for k, v in out.items()}
        out["t"] = round(now, 3)
        out["downloading"] = downloading
        out["in_flight_per_host"] = round(flights / max(1, downloading), 2)
        out["queued_per_host"] = round(queued / max(1, downloading), 2)
        return out

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        self.start()
        dt = self.config.tick_s
        now = 0.0
        self.waiting = len(self.peers)
        touched: set[int] = set()
        next_sample = 0.0
        up_total = float(self.up_cap.sum())
        next_expire = 1.0
        while self.waiting and now < self.config.max_time_s:
            while self.events and self.events[0][0] <= now:
                when, order, kind, index = heapq.heappop(self.events)
                payload = self.pending.pop(order, ())
                if kind == "seed_reported":
                    self._seed_reported(when, *payload)
                    continue
                p = self.peers[index - 1]
                if order in self.late:
                    self.late.discard(order)
                    if kind == "registered":
                        self._registered(p, when, deliver=False)
                    else:
                        self._synced(p, when, *payload, deliver=False)
                    continue
                if kind == "timed_out":
                    if p.done_s is None and not p.gone:
                        self._timed_out(p, when, *payload)
                        touched.add(index)
                    continue
                if kind == "synced" and payload[1]:
                    self._synced(p, when, *payload)  # a done peer's last sync: the scheduler still hears it
                    continue
                if p.done_s is not None or p.gone:
                    continue
                if kind == "register":
                    self._register(p, when)
                elif kind == "registered":
                    self._registered(p, when)
                elif kind == "synced":
                    self._synced(p, when, *payload)
                elif p.sync_at == when and not p.asking:
                    if p.machine.next_sync_at(when) <= when:
                        self._sync(p, when)
                    else:
                        p.sync_at = float("inf")  # what made it due has passed
                touched.add(index)
            if self.seed_next_report <= now:
                self._seed_report(now)
            if self.config.peer_news:
                seed_have = self._seed_pieces_at(now)
                if seed_have > self.seed_told:
                    self.seed_told = seed_have
                    self._tell_watchers(0, now)
                self._deliver_news(now, touched)
            if now >= next_expire:
                self.sched.expire(now)
                next_expire += 1.0
                log.info(
                    "t=%.0fs: %d of %d hosts still pulling, %d transfers, %.0fs of CPU",
                    now,
                    self.waiting,
                    len(self.peers),
                    int(self.f_live.sum()),
                    time.process_time(),
                )
            self._expire_queued(now, touched)
            for index in sorted(touched):
                p = self.peers[index - 1]
                self._launch(p, now)
                self._watch(p, now)
                self._plan_sync(p, now)
            touched.clear()
            live = np.flatnonzero(self.f_live)
            if len(live):
                wan = self._wan_links(live) if self.sites else None
                rate = self._rates(live, wan)
                left = self.f_left[live]
                moved = rate * dt
                if wan is not None:
                    self.site_in_bytes += np.bincount(wan[0], np.minimum(moved, left), minlength=self.sites + 1)
                over = moved >= left
                self.f_left[live] = left - moved
                if now >= next_sample:
                    self.utilization.append((round(now, 3), float(rate.sum()) / up_total))
                    self.idle.append(self._idle_upload(now, live, rate, up_total))
                    next_sample += 0.25
                if over.any():
                    done = live[over]
                    ends = now + left[over] / rate[over]
                    for k in np.argsort(ends, kind="stable"):
                        p = self._finish_flow(int(done[k]), float(ends[k]))
                        if p.done_s is None:
                            touched.add(p.index)
            now = round(now + dt, 9)
        self.end_s = now

    def result(self, runtime_s: float) -> dict[str, Any]:
        cfg = self.config
        done = [p for p in self.peers if p.done_s is not None]
        p2p_times = [p.done_s - p.start_s for p in done if p.done_s is not None]
        direct_times = direct_pull(
            [p.start_s for p in self.peers], cfg.blob_bytes, cfg.origin_bps, cfg.peer_download_bps
        )
        bound = lower_bound_s(cfg.peers, cfg.blob_bytes, cfg.origin_bps, cfg.peer_upload_bps, cfg.peer_download_bps)
        p2p = summarize(p2p_times or [float("inf")], self.origin_bytes)
        p2p["hosts_complete"] = len(done)
        p2p["hosts_with_all_pieces"] = sum(1 for p in self.peers if p.have == self.all_pieces)
        p2p["back_to_source"] = self.stats["back_to_source"]
        counters = asdict(self.sched.counters)
        if self.sites:
            direct_times = self._direct_with_sites()
        result = {
            "title": "Simulated swarm: real scheduler and piece selection, flow-level network",
            "peers": cfg.peers,
            "blob_bytes": cfg.blob_bytes,
            "piece_bytes": self.layout.piece_size,
            "pieces": self.layout.count,
            "peer_upload_bps": cfg.peer_upload_bps,
            "peer_download_bps": cfg.peer_download_bps,
            "origin_bps": cfg.origin_bps,
            "start_spread_s": cfg.start_spread_s,
            "tick_s": cfg.tick_s,
            "rng_seed": cfg.seed,
            "lower_bound_s": bound,
            "direct_bound_s": max(cfg.peers * cfg.blob_bytes / cfg.origin_bps, cfg.blob_bytes / cfg.peer_download_bps),
            "p2p": p2p,
            "direct": summarize(direct_times, cfg.peers * cfg.blob_bytes),
            "scheduler": {
                "candidate_parents": cfg.scheduler.candidate_parents,
                "parent_sample": cfg.scheduler.parent_sample,
                **counters,
            },
            "peer_limits": {
                "concurrent_pieces": self.limits.concurrent_pieces,
                "per_parent_pieces": self.limits.per_parent_pieces,
                "upload_slots": cfg.peer_slots(),
                "seed_upload_slots": cfg.seed_slots(),
            },
            "requests": self.stats["requests"],
            "busy_answers": self.stats["busy"],
            "syncs": self.stats["syncs"],
            "registers": self.stats["registers"],
            "scheduler_timeouts": self.stats["scheduler_timeouts"],
            "peer_news": cfg.peer_news,
            "scheduler_patience_s": cfg.peer.scheduler_patience_s,
            "news_latency_s": NEWS_LATENCY_S if cfg.peer_news else None,
            "upload_utilization": self.utilization,
            "idle_upload": self.idle,
            "runtime_s": round(runtime_s, 1),
            "machine": machine(),
        }
        if self.sites:
            result["sites"] = self._site_result()
        if cfg.server_modelled():
            result["scheduler_server"] = self._server_result()
        return result

    def _server_result(self) -> dict[str, Any]:
        """The scheduler modelled as a one-core server: its load and its requests' latency."""
        latency = self.sched_latency
        bins = range(max(self.sched_busy, default=-1) + 1)
        series = [(round(b * SCHED_BIN_S, 3), round(self.sched_busy[b] / SCHED_BIN_S, 4)) for b in bins]
        span = max(self.end_s, self.sched_free_s, 1e-9)  # requests queued at the end are served after it
        return {
            "service_ms": self.config.scheduler_service_s * 1000,
            "service_ms_by_type": {k: v * 1000 for k, v in sorted(self.config.scheduler_service_s_by_type.items())},
            "by_type": {
                kind: {
                    "requests": len(values),
                    "latency_p50_ms": round(percentile(values, 50) * 1000, 2),
                    "latency_p99_ms": round(percentile(values, 99) * 1000, 2),
                }
                for kind, values in sorted(self.sched_latency_by_type.items())
            },
            "requests": len(latency),
            "requests_per_s": round(len(latency) / span, 1),
            "utilisation_mean": round(sum(self.sched_busy.values()) / span, 4),
            "utilisation_peak": max((u for _, u in series), default=0.0),
            "latency_p50_ms": round(percentile(latency, 50) * 1000, 2),
            "latency_p99_ms": round(percentile(latency, 99) * 1000, 2),
            "latency_max_ms": round(max(latency, default=0.0) * 1000, 2),
            "utilisation": series,
        }

    def _site_result(self) -> dict[str, Any]:
        cfg = self.config
        bound = site_lower_bound_s(
            sites=self.sites,
            site_hosts=cfg.site_hosts(),
            blob_bytes=cfg.blob_bytes,
            piece_bytes=self.layout.piece_size,
            origin_bps=cfg.origin_bps,
            uplink_bps=cfg.site_uplink_bps,
            upload_bps=cfg.peer_upload_bps,
            download_bps=cfg.peer_download_bps,
        )
        staged = site_staged_bound_s(
            site_hosts=cfg.site_hosts(),
            blob_bytes=cfg.blob_bytes,
            origin_bps=cfg.origin_bps,
            uplink_bps=cfg.site_uplink_bps,
            upload_bps=cfg.peer_upload_bps,
            download_bps=cfg.peer_download_bps,
        )
        into = self.site_in_bytes[: self.sites] / cfg.blob_bytes
        per_site = []
        for site in range(self.sites):
            times = [p.done_s - p.start_s for p in self.peers if p.done_s is not None and self.site_of[p.index] == site]
            per_site.append(
                {
                    "site": f"site-{site:03d}",
                    "bytes_in": int(self.site_in_bytes[site]),
                    "p99_s": round(percentile(times, 99), 4) if times else None,
                }
            )
        done = [p.done_s - p.start_s for p in self.peers if p.done_s is not None]
        p99 = percentile(done, 99) if done else float("inf")
        return {
            "sites": self.sites,
            "hosts_per_site": cfg.site_hosts(),
            "site_uplink_bps": cfg.site_uplink_bps,
            "site_aware": cfg.site_aware,
            "site_wan_fetchers": cfg.scheduler.site_wan_fetchers,
            "site_lower_bound_s": bound,
            "p99_over_site_bound": p99 / bound,
            "site_staged_bound_s": staged,
            "p99_over_staged_bound": p99 / staged,
            "bytes_in_max_F": float(into.max()),
            "bytes_in_mean_F": float(into.mean()),
            "bytes_in_min_F": float(into.min()),
            "per_site": per_site,
        }

    def _direct_with_sites(self) -> list[float]:
        """Direct pulls with sites: the origin shared fairly between sites, each site's share
        capped by its uplink, then shared fairly between the site's hosts."""
        cfg = self.config
        share = min(cfg.origin_bps / self.sites, cfg.site_uplink_bps)
        times = [0.0] * len(self.peers)
        for site in range(self.sites):
            members = [p for p in self.peers if self.site_of[p.index] == site]
            for p, t in zip(
                members,
                direct_pull([p.start_s for p in members], cfg.blob_bytes, share, cfg.peer_download_bps),
                strict=True,
            ):
                times[p.index - 1] = t
        return times


def direct_pull(starts: list[float], blob_bytes: int, origin_bps: float, download_bps: float) -> list[float]:
    """Completion times of hosts pulling straight from the origin: u_s shared fairly, each capped at d.

    Every active transfer runs at the same rate, so they finish in arrival order; the loop walks
    arrivals and departures in time order.
    """
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    left: dict[int, float] = {}
    times = [0.0] * len(starts)
    now = 0.0
    k = 0
    while k < len(order) or left:
        rate = min(download_bps, origin_bps / len(left)) if left else 0.0
        next_arrival = starts[order[k]] if k < len(order) else float("inf")
        first = next(iter(left)) if left else -1
        next_departure = now + left[first] / rate if left else float("inf")
        step_to = min(next_arrival, next_departure)
        if left:
            sent = rate * (step_to - now)
            for i in left:
                left[i] -= sent
        now = step_to
        if next_departure <= next_arrival:
            del left[first]
            times[first] = now - starts[first]
        else:
            left[order[k]] = float(blob_bytes)
            k += 1
    return times


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def plot_utilisation(path: Path, series: list[tuple[float, float]], service: str) -> None:
    """The scheduler's busy share of its one core over simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([t for t, _ in series], [u * 100 for _, u in series], drawstyle="steps-post")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("scheduler busy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"scheduler utilisation, {service} per request")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


IDLE_REASONS = (
    "slots_full",
    "children_full",
    "per_parent",
    "nothing_wanted",
    "no_children",
    "holds_nothing",
    "not_started",
    "child_avoids",
    "no_digests",
    "other",
)


def plot_idle(path: Path, idle: list[dict[str, float]], title: str) -> None:
    """The swarm's upload over time: in use, and idle by reason (Simulation._idle_upload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not idle:
        return
    times = [row["t"] for row in idle]
    reasons = [r for r in IDLE_REASONS if any(row.get(r, 0.0) for row in idle)]
    used = [max(0.0, 1.0 - sum(row.get(r, 0.0) for r in IDLE_REASONS)) for row in idle]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.stackplot(
        times,
        [used, *[[row.get(r, 0.0) for row in idle] for r in reasons]],
        labels=["in use", *[r.replace("_", " ") for r in reasons]],
        step="post",
    )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("share of all hosts' upload")
    ax.set_ylim(0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_before_after(path: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Completion-time CDFs of two runs' P2P pulls, in units of their T_min."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, result, style in (("before", before, "--"), ("after", after, "-")):
        bound = result["lower_bound_s"]
        times = sorted(t / bound for t in result["p2p"]["completion_s"])
        p99 = result["p2p"]["p99_s"] / bound
        step_cdf(ax, times, style, f"{label}: p50 {times[len(times) // 2]:.2f}, p99 {p99:.2f} ·T_min")
    ax.axvline(1.0, color="grey", linestyle=":", label="T_min")
    ax.set_xlabel("completion time per host (·T_min)")
    ax.set_ylabel("fraction of hosts done")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{after['peers']} hosts, {after['blob_bytes'] / (1 << 20):.0f} MiB blob: before and after")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_service_ms(text: str) -> tuple[float, dict[str, float]]:
    """'0.3' or 'register=0.4,sync=0.25,seed=0.2,leave=0.1' (or '0.3,sync=0.25'): the
    default service time and the per-type ones, in ms."""
    default = 0.0
    by_type: dict[str, float] = {}
    for i, part in enumerate(p.strip() for p in text.split(",")):
        name, eq, value = part.rpartition("=")
        try:
            ms = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: want MS or TYPE=MS") from None
        if ms < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a service time cannot be negative")
        if not eq:
            if i:
                raise argparse.ArgumentTypeError(f"{part!r}: only the first value may be bare (the default)")
            default = ms
        elif name not in SERVICE_TYPES:
            raise argparse.ArgumentTypeError(f"{name!r}: request types are {', '.join(SERVICE_TYPES)}")
        else:
            by_type[name] = ms
    return default, by_type


def simulate(config: SimConfig) -> tuple[dict[str, Any], Simulation]:
    started = time.perf_counter()
    cpu = time.process_time()
    sim = Simulation(config)
    try:
        sim.run()
    finally:
        if config.trace_out is not None:
            sim.trace.close()
    result = sim.result(time.perf_counter() - started)
    result["cpu_s"] = round(time.process_time() - cpu, 1)
    return result, sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--blob-size", default="1GiB")
    parser.add_argument("--peer-rate", default="100MiB", help="upload and download per host, bytes/s")
    parser.add_argument("--peer-upload", default=None, help="upload per host (default: --peer-rate)")
    parser.add_argument("--peer-download", default=None, help="download per host (default: --peer-rate)")
    parser.add_argument("--origin-rate", default="1GiB", help="origin upload, bytes/s")
    parser.add_argument("--start-spread", type=float, default=0.2, help="hosts start within this many seconds")
    parser.add_argument("--tick", type=float, default=0.005, help="seconds between rate recomputations")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--sites", type=int, default=0, help="split the hosts into this many sites (0: none)")
    parser.add_argument("--site-uplink-rate", default="50MiB", help="each site's WAN link, each way, bytes/s")
    parser.add_argument("--site-wan-fetchers", type=int, default=1, help="peers per site fetching from outside")
    parser.add_argument(
        "--no-site-aware", action="store_true", help="the same sites with the scheduler's site rule off"
    )
    parser.add_argument(
        "--scheduler-service-ms",
        type=parse_service_ms,
        default=(0.0, {}),
        metavar="MS | TYPE=MS,...",
        help="model the scheduler as one core taking this long per request (0: answers at once, free); "
        "per request type as register=0.4,sync=0.25,seed=0.2,leave=0.1 (a bare number first is the "
        "time of the types not named)",
    )
    parser.add_argument(
        "--trace-out",
        type=Path,
        default=None,
        help="write every request the scheduler receives (time, host, type, wire message) to this file, "
        "for benchmarks.load --replay; recorded with the scheduler free, so times are when each was sent",
    )
    parser.add_argument(
        "--no-peer-news",
        action="store_true",
        help="children learn parents' pieces only from syncs every 0.2 s (the policy before peer news)",
    )
    parser.add_argument(
        "--scheduler-patience-s",
        type=float,
        default=None,
        help="how long a peer waits for a scheduler that answers its liveness probe (default: PeerConfig's; "
        "0: it gives up at scheduler_timeout_s, the policy before the probe)",
    )
    parser.add_argument("--concurrent-pieces", type=int, default=None, help="the peers' (default: PeerConfig's)")
    parser.add_argument("--per-parent-pieces", type=int, default=None, help="the peers' (default: PeerConfig's)")
    parser.add_argument("--upload-slots", type=int, default=0, help="each peer's (0: from its upload rate)")
    parser.add_argument("--seed-upload-slots", type=int, default=0, help="the seed's (0: from the origin rate)")
    parser.add_argument("--candidate-parents", type=int, default=None, help="the scheduler's (default: its config's)")
    parser.add_argument("--max-time", type=float, default=3600.0, help="stop the simulation at this simulated time")
    parser.add_argument("--out", type=Path, required=True, help="directory for result.json, report.md, cdf.png")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="an earlier run's result.json: also plot both runs' completion CDFs (cdf-before-after.png)",
    )
    args = parser.parse_args(argv)
    service_ms, service_ms_by_type = args.scheduler_service_ms
    if args.trace_out is not None and (service_ms or service_ms_by_type):
        parser.error("--trace-out records with the scheduler free: leave out --scheduler-service-ms")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.quiet:
        log.setLevel(logging.INFO)
    rate = parse_size(args.peer_rate)
    peer_limits = {
        k: v
        for k, v in (
            ("concurrent_pieces", args.concurrent_pieces),
            ("per_parent_pieces", args.per_parent_pieces),
            ("upload_slots", args.upload_slots or None),
            ("scheduler_patience_s", args.scheduler_patience_s),
        )
        if v is not None
    }
    scheduler = SchedulerConfig(site_wan_fetchers=args.site_wan_fetchers)
    if args.candidate_parents is not None:
        scheduler = dataclasses.replace(scheduler, candidate_parents=args.candidate_parents)
    config = SimConfig(
        peers=args.peers,
        blob_bytes=parse_size(args.blob_size),
        peer_upload_bps=parse_size(args.peer_upload) if args.peer_upload else rate,
        peer_download_bps=parse_size(args.peer_download) if args.peer_download else rate,
        origin_bps=parse_size(args.origin_rate),
        start_spread_s=args.start_spread,
        tick_s=args.tick,
        seed=args.seed,
        max_time_s=args.max_time,
        scheduler=scheduler,
        peer=PeerConfig(**peer_limits),
        seed_upload_slots=args.seed_upload_slots,
        sites=args.sites,
        site_uplink_bps=parse_size(args.site_uplink_rate) if args.sites else float("inf"),
        site_aware=not args.no_site_aware,
        scheduler_service_s=service_ms / 1000,
        scheduler_service_s_by_type={k: v / 1000 for k, v in service_ms_by_type.items()},
        trace_out=args.trace_out,
        peer_news=not args.no_peer_news,
    )
    result, _ = simulate(config)
    result["command"] = shlex.join([".venv/bin/python", "-m", "benchmarks.simulate", *(argv or sys.argv[1:])])
    write_results(args.out, result)
    bound = result["lower_bound_s"]
    for scheme in ("p2p", "direct"):
        r = result[scheme]
        print(
            f"{scheme:6s} p50 {r['p50_s']:9.2f} s ({r['p50_s'] / bound:6.2f}·T_min)  "
            f"p99 {r['p99_s']:9.2f} s ({r['p99_s'] / bound:6.2f}·T_min)  "
            f"origin {r['origin_bytes'] / config.blob_bytes:7.2f}·F"
        )
    if config.sites:
        sites = result["sites"]
        print(
            f"sites  {config.sites} of {sites['hosts_per_site']}, site-aware {'on' if config.site_aware else 'off'}: "
            f"bytes into each site max {sites['bytes_in_max_F']:.3f}·F (mean {sites['bytes_in_mean_F']:.3f}·F); "
            f"p99 {result['p2p']['p99_s']:.2f} s = {sites['p99_over_site_bound']:.2f}·bound "
            f"(site bound {sites['site_lower_bound_s']:.2f} s), {sites['p99_over_staged_bound']:.2f}·staged bound "
            f"({sites['site_staged_bound_s']:.2f} s)"
        )
    if "scheduler_server" in result:
        server = result["scheduler_server"]
        service = ", ".join(
            [f"{server['service_ms']:g} ms"] * (not server["service_ms_by_type"] or server["service_ms"] > 0)
            + [f"{kind} {ms:g} ms" for kind, ms in server["service_ms_by_type"].items()]
        )
        print(
            f"scheduler {service} per request, one core: {server['requests']} requests "
            f"({server['requests_per_s']:.0f}/s), utilisation mean {server['utilisation_mean']:.0%} "
            f"peak {server['utilisation_peak']:.0%}; latency p50 {server['latency_p50_ms']:.1f} ms, "
            f"p99 {server['latency_p99_ms']:.1f} ms, max {server['latency_max_ms']:.1f} ms"
        )
        for kind, figures in server["by_type"].items():
            print(
                f"  {kind:8s} {figures['requests']} requests, latency p50 {figures['latency_p50_ms']:.1f} ms, "
                f"p99 {figures['latency_p99_ms']:.1f} ms"
            )
        plot_utilisation(args.out / "scheduler.png", server["utilisation"], service)
    limits = result["peer_limits"]
    plot_idle(
        args.out / "idle.png",
        result["idle_upload"],
        f"{config.peers} hosts, {limits['upload_slots']} upload slots, {limits['concurrent_pieces']} pieces in flight: "
        "where the upload goes",
    )
    if args.before is not None:
        plot_before_after(args.out / "cdf-before-after.png", json.loads(args.before.read_text()), result)
    print(
        f"scheduler asked {result['registers'] + result['syncs']} times by the peers "
        f"({(result['registers'] + result['syncs']) / config.peers:.2f} per host: "
        f"{result['registers']} registers, {result['syncs']} syncs); "
        f"{result['scheduler_timeouts']} timed out (after {config.peer_waits_s():g} s), "
        f"{result['p2p']['back_to_source']} hosts back to source"
    )
    print(
        f"T_min {bound:.2f} s; {result['p2p']['hosts_complete']}/{config.peers} hosts done; "
        f"ran {result['runtime_s']:.0f} s ({result['cpu_s']:.0f} s CPU); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
